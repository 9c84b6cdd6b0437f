"""QuPath Positive cell detection protocols carried over as settings."""

from __future__ import annotations

import pytest

from config.errors import ConfigError
from config.qupath import qupath_overrides
from config.settings import load_settings

LINE = (
    "runPlugin('qupath.imagej.detect.cells.PositiveCellDetection', '{\"detectionImageBrightfield\": "
    '"Hematoxylin OD", "requestedPixelSizeMicrons": 0.5, "backgroundRadiusMicrons": 8.0, '
    '"backgroundByReconstruction": false, "medianRadiusMicrons": 0.5, "sigmaMicrons": 1.5, '
    '"minAreaMicrons": 10.0, "maxAreaMicrons": 400.0, "threshold": 0.1, "maxBackground": 2.0, '
    '"watershedPostProcess": true, "excludeDAB": true, "cellExpansionMicrons": 5.0, "includeNuclei": true, '
    '"smoothBoundaries": true, "makeMeasurements": true, "thresholdCompartment": "Cell: DAB OD max", '
    '"thresholdPositive1": 0.2, "thresholdPositive2": 0.4, "thresholdPositive3": 0.6, "singleThreshold": false}\')'
)


def test_a_runplugin_line_sets_every_parameter() -> None:
    s = load_settings("ki67", qupath_overrides(LINE))
    n, i = s.nuclei, s.intensity
    assert n.method == "qupath" and not n.adaptive_threshold
    assert n.detection_image == "hematoxylin" and n.requested_pixel_size_um == 0.5
    assert (n.background_radius_um, n.background_by_reconstruction, n.median_radius_um) == (8.0, False, 0.5)
    assert (n.sigma_um, n.min_area_um2, n.max_area_um2, n.threshold, n.max_background) == (1.5, 10, 400, 0.1, 2)
    assert n.split_by_shape and n.exclude_dab and n.include_nuclei and n.smooth_boundaries
    assert n.cell_expansion_um == 5.0
    assert (i.compartment, i.statistic, i.thresholds, i.single_threshold) == ("cell", "max", (0.2, 0.4, 0.6), None)


def test_a_groovy_map_and_a_single_threshold() -> None:
    groovy = (
        "runPlugin('qupath.imagej.detect.cells.PositiveCellDetection', ['detectionImageBrightfield': "
        "'Optical density sum', 'threshold': 0.2, 'thresholdPositive1': 0.35, 'singleThreshold': true, ])"
    )
    s = load_settings("hscore", qupath_overrides(groovy))
    assert s.nuclei.detection_image == "od_sum" and s.nuclei.threshold == 0.2
    assert s.intensity.single_threshold == 0.35


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"sigma": 3}', r"qupath\.sigma.*in pixels; give sigmaMicrons"),
        ('{"thresholdCompartment": "Nucleus: Hematoxylin OD mean"}', r"qupath\.thresholdCompartment"),
        ('{"detectionImageBrightfield": "Red"}', r"qupath\.detectionImageBrightfield.*choose from"),
        ('{"cellExpansionMicron": 5}', r"qupath\.cellExpansionMicron.*not a Positive cell detection parameter"),
        ('{"thresholdPositive1": 0.2, "thresholdPositive2": 0.4}', r"give all three thresholds"),
        ("runPlugin('x')", r"no parameter object"),
        ("{threshold: 0.1}", r"not a JSON object or Groovy map"),
    ],
)
def test_what_cannot_be_carried_over_is_named(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        qupath_overrides(text)
