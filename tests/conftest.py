"""Shared fixtures: the project's shared test data and small generated slides."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from adapter.synth import SynthOutput, generate
from pipeline.synth import SynthSpec

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def shared_file(name: str) -> Path:
    """A file of ../shared/data, or skip the test when the folder is absent."""
    path = SHARED / name
    if not path.exists():
        pytest.skip(f"shared test data {name} not present")
    return path


def require_tool(name: str) -> str:
    """Path of an external tool; skip when missing, fail in CI (IHC_REQUIRE_TOOLS=1)."""
    found = shutil.which(name)
    # pynetdicom installs its own storescu/echoscu into the venv; DCMTK's live in
    # /usr/bin, and Orthanc in /usr/sbin, which a non-root PATH may lack.
    for folder in ("/usr/bin", "/usr/sbin"):
        if (Path(folder) / name).exists():
            found = str(Path(folder) / name)
            break
    if not found:
        if os.environ.get("IHC_REQUIRE_TOOLS"):
            pytest.fail(f"required tool {name} is not installed")
        pytest.skip(f"{name} not installed")
    return found


SMALL_SPEC = SynthSpec(width=1000, height=760, mpp=0.5, seed=11, tile_size=256)


@pytest.fixture(scope="session")
def small_slide(tmp_path_factory: pytest.TempPathFactory) -> SynthOutput:
    """A 1000x760 synthetic slide written as DICOM, OME-TIFF and SVS (one render)."""
    out = tmp_path_factory.mktemp("synth")
    return generate(SMALL_SPEC, out, workers=1)


ACCURACY_SPECS = {
    "typical": SynthSpec(width=2048, height=2048, mpp=0.5, seed=21, tumour_fraction=0.4),
    "low_tumour": SynthSpec(width=2048, height=2048, mpp=0.5, seed=22, tumour_fraction=0.05),
}


@pytest.fixture(scope="session")
def accuracy_slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SynthOutput]:
    """Two 2048² synthetic slides (40 % and 5 % tumour) as OME-TIFF with truth."""
    out = tmp_path_factory.mktemp("accuracy")
    return {name: generate(spec, out / name, formats=("ome",), workers=2) for name, spec in ACCURACY_SPECS.items()}
