from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from adapter.synth import SynthOutput
from config.errors import ConfigError
from dicom_io import open_slide
from dicom_io.convert import convert_to_dicom, identity_from_sidecar


def test_convert_with_sidecar_round_trip(small_slide: SynthOutput, tmp_path: Path) -> None:
    sidecar = tmp_path / "meta.json"
    sidecar.write_text(
        json.dumps({"patient_name": "Doe^Jane", "patient_id": "P123", "patient_birth_date": "1970-01-02"})
    )
    assert small_slide.svs
    with open_slide(small_slide.svs) as src:
        identity = identity_from_sidecar(sidecar, src)
        convert_to_dicom(src, tmp_path / "dcm", identity, tile_size=256, quality=95)
        original = src.read_region(0, 0, 0, *src.size)
    with open_slide(tmp_path / "dcm") as out:
        assert out.size == (1000, 760) and out.mpp == pytest.approx(0.5)
        assert out.metadata["patient"] == {"name": "Doe^Jane", "id": "P123", "birth_date": "19700102", "sex": "O"}
        converted = out.read_region(0, 0, 0, *out.size)
    # Re-encoded once more as JPEG: close, not identical.
    assert np.abs(converted.astype(int) - original).mean() < 2.0


def test_sidecar_errors_name_the_key(small_slide: SynthOutput, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"patient_nmae": "x"}))
    assert small_slide.svs
    with open_slide(small_slide.svs) as src:
        with pytest.raises(ConfigError, match=r"sidecar=.*unknown keys \['patient_nmae'\]"):
            identity_from_sidecar(bad, src)
        bad.write_text(json.dumps({"patient_birth_date": "1970-13-45"}))
        with pytest.raises(ConfigError, match=r"sidecar\.patient_birth_date='1970-13-45'"):
            identity_from_sidecar(bad, src)


def test_resampled_levels_say_so(small_slide: SynthOutput) -> None:
    """One ORIGINAL image per slide: every level resampled from it is DERIVED\\PRIMARY\\VOLUME\\RESAMPLED."""
    assert small_slide.dicom_dir
    levels = sorted(
        (pydicom.dcmread(p, stop_before_pixels=True) for p in small_slide.dicom_dir.glob("*.dcm")),
        key=lambda ds: -int(ds.TotalPixelMatrixColumns),
    )
    assert len(levels) >= 2
    assert list(levels[0].ImageType) == ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    for ds in levels[1:]:
        assert list(ds.ImageType) == ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
