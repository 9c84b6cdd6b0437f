"""Shared fixtures: the project's shared test data and small generated slides."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

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


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str) -> None:
    """Poll ``predicate`` until true; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def storescu_push(port: int, folder: Path, calling_ae: str = "SCANNER1") -> subprocess.CompletedProcess[str]:
    """DCMTK storescu as the scanner: -R -xy (both needed for JPEG WSI), a folder recursively."""
    tool = require_tool("storescu")
    return subprocess.run(
        [
            tool,
            "-aet",
            calling_ae,
            "-aec",
            "IHC_ADAPTER",
            "-R",
            "-xy",
            "+sd",
            "+r",
            "127.0.0.1",
            str(port),
            str(folder),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A throw-away certificate and key for ``localhost`` / 127.0.0.1 (openssl)."""
    openssl = require_tool("openssl")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert)),
            *("-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def ct_image(path: Path) -> Path:
    """A tiny CT image: DICOM, but not a whole-slide image."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CT"
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.SamplesPerPixel, ds.PixelRepresentation = 15, 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.zeros((4, 4), np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


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
