from __future__ import annotations

import pytest

from config.errors import ConfigError
from config.settings import available_profiles, load_settings


def test_every_profile_loads_with_its_compartment() -> None:
    assert available_profiles() == ["er", "her2", "hscore", "ki67", "pdl1", "pr"]
    expected = {
        "hscore": "cell",
        "ki67": "nucleus",
        "er": "nucleus",
        "pr": "nucleus",
        "her2": "membrane",
        "pdl1": "membrane",
    }
    for name, compartment in expected.items():
        s = load_settings(name)
        assert s.profile == name and s.scores.kind == name
        assert s.intensity.compartment == compartment


def test_defaults_are_quPath_like() -> None:
    s = load_settings("hscore")
    assert s.stain.hematoxylin == (0.65111, 0.70119, 0.29049)
    assert s.stain.dab == (0.26917, 0.56824, 0.77759)
    assert s.intensity.thresholds == (0.2, 0.4, 0.6)
    assert s.nuclei.requested_pixel_size_um == 0.5 and s.nuclei.cell_expansion_um == 5.0
    assert s.tiling.tile_size == 512 and s.tissue.min_tile_tissue == 0.01
    assert s.scores.low_tumour_fraction == 0.10


def test_overrides_are_typed_and_nested() -> None:
    s = load_settings("ki67", ["nuclei.threshold=0.2", "stain.background=240", "intensity.single_threshold=0.3"])
    assert s.nuclei.threshold == 0.2 and s.stain.background == 240 and s.intensity.single_threshold == 0.3
    with pytest.raises(Exception, match="frozen"):
        s.nuclei.threshold = 0.5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("nuclei.threshold=-1", r"nuclei\.threshold=-1: .*greater than 0"),
        ("nuclei.thresh=1", r"nuclei\.thresh=1: .*[Ee]xtra"),
        ("intensity.thresholds=[0.5,0.4,0.6]", r"intensity\.thresholds=.*increasing"),
        ("stain.background=300", r"stain\.background"),
        ("nuclei.min_area_um2=500", r"max_area_um2 400.0 must exceed min_area_um2 500"),
        ('segmentation.method="model"', r"needs segmentation\.model"),
        ("threshold", r"--set='threshold': expected key=value"),
    ],
)
def test_bad_values_name_the_parameter(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_settings("ki67", [override])


def test_unknown_profile() -> None:
    with pytest.raises(ConfigError, match=r"profile='cd8': unknown profile; choose from er, her2"):
        load_settings("cd8")


@pytest.mark.parametrize(
    ("profile", "overrides", "pattern"),
    [
        ("her2", [], "the score compartment is the membrane"),
        ("pdl1", [], "the score compartment is the membrane"),
        ("hscore", ["scores.kind=her2"], r"scores\.kind 'her2' is scored from the membrane"),
        ("ki67", ["scores.kind=pdl1"], r"scores\.kind 'pdl1' is scored from the membrane"),
    ],
)
def test_membrane_scores_refuse_unmeasured_membranes(profile: str, overrides: list[str], pattern: str) -> None:
    with pytest.raises(ConfigError, match=r"intensity\.membrane_method='none': " + pattern):
        load_settings(profile, [*overrides, "intensity.membrane_method=none"])


def test_nuclear_profiles_skip_the_membrane() -> None:
    for name in ("ki67", "er", "pr"):
        assert load_settings(name).intensity.membrane_method == "none"
    assert load_settings("her2").intensity.membrane_method == "sectors"
