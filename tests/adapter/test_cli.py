"""The command line: info, synth, demo and clean errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from adapter.cli import main
from adapter.synth import SynthOutput
from tests.conftest import shared_file


def test_info_json_on_real_ki67(capsys: pytest.CaptureFixture[str]) -> None:
    path = shared_file("OS-2-vsi.ome.tif")
    assert main(["info", str(path), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["format"] == "ome-tiff"
    assert d["levels"][0]["width"] == 1445
    assert d["mpp"] == pytest.approx(0.3461, abs=1e-4)


def test_info_text_lists_levels_and_identifiers(small_slide: SynthOutput, capsys: pytest.CaptureFixture[str]) -> None:
    assert small_slide.dicom_dir
    assert main(["info", str(small_slide.dicom_dir)]) == 0
    out = capsys.readouterr().out
    assert "format      dicom" in out
    assert "1000 x 760" in out and "0.5000 µm/px" in out and "JPEG Baseline" in out
    assert "study_instance_uid" in out and "SYNTH-11" in out


def test_info_needs_mpp_then_accepts_it(capsys: pytest.CaptureFixture[str]) -> None:
    path = shared_file("boxes.tiff")
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ihc-adapter: error: ") and "boxes.tiff" in err and "--mpp" in err
    assert "Traceback" not in err
    assert main(["info", str(path), "--mpp", "0.5"]) == 0


def test_info_on_broken_file_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(shared_file("bad/broken.svs"))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "broken.svs" in err


def test_synth_cli_and_bad_parameter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        ["synth", str(tmp_path / "s"), "--size", "300", "200", "--formats", "ome", "--workers", "1", "--low-tumour"]
    )
    assert rc == 0
    truth = json.loads((tmp_path / "s" / "truth" / "truth.json").read_text())
    assert truth["spec"]["tumour_fraction"] == 0.05
    assert (tmp_path / "s" / "synthetic-0.ome.tif").exists()
    assert not (tmp_path / "s" / "dicom").exists()
    assert main(["synth", str(tmp_path / "t"), "--jpeg-quality", "500"]) == 2
    assert "jpeg_quality" in capsys.readouterr().err
    assert main(["synth", str(tmp_path / "t"), "--formats", "png"]) == 2
    assert "formats" in capsys.readouterr().err


def test_synth_cli_sets_any_generator_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--set FIELD=VALUE`` reaches every generator field (artefacts with their truth masks); an
    unknown field is refused by name."""
    args = ["synth", str(tmp_path / "s"), "--size", "512", "512", "--formats", "ome", "--workers", "1"]
    assert main([*args, "--set", "debris=2", "--set", "colour_cast=[1.0, 0.95, 1.05]"]) == 0
    truth = json.loads((tmp_path / "s" / "truth" / "truth.json").read_text())
    assert truth["spec"]["debris"] == 2 and truth["spec"]["colour_cast"] == [1.0, 0.95, 1.05]
    assert (tmp_path / "s" / "truth" / "debris.png").exists()
    assert main(["synth", str(tmp_path / "t"), "--set", "bubble=1"]) == 2
    assert "synth --set='bubble=1'" in capsys.readouterr().err


def test_console_script_demo_runs(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "adapter.cli", "demo", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "size        2048 x 2048" in run.stdout and "format      dicom" in run.stdout
    assert "3/3 acknowledged" in run.stdout and "done: profile ki67" in run.stdout
    assert "ground truth: tumour fraction" in run.stdout
    for kind in ("seg", "sr", "viewer_sr", "ann"):
        assert f"DICOM {kind}" in run.stdout
    [result] = list((tmp_path / "results").rglob("result.json"))
    assert json.loads(result.read_text())["profile"] == "ki67"


@pytest.mark.parametrize("fmt", ["dicom", "ome", "svs"])
def test_score_every_format(
    fmt: str, small_slide: SynthOutput, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = {"dicom": small_slide.dicom_dir, "ome": small_slide.ome_tiff, "svs": small_slide.svs}[fmt]
    out = tmp_path / "r.json"
    assert main(["score", str(path), "--profile", "ki67", "--json", str(out), "--workers", "1"]) == 0
    j = json.loads(out.read_text())
    assert j["profile"] == "ki67" and j["compartments"]["tumour"]["cells"] > 50
    assert "ki67_index_percent" in j["scores"]
    assert "H-score" in capsys.readouterr().out


def test_score_same_result_from_every_format(small_slide: SynthOutput, tmp_path: Path) -> None:
    results = []
    for path in (small_slide.dicom_dir, small_slide.ome_tiff, small_slide.svs):
        out = tmp_path / "r.json"
        assert main(["score", str(path), "--profile", "hscore", "--json", str(out), "--workers", "1"]) == 0
        results.append(json.loads(out.read_text())["compartments"])
    assert results[0] == results[1] == results[2]


def test_score_bad_setting_and_profile(small_slide: SynthOutput, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["score", str(small_slide.ome_tiff), "--set", "nuclei.sigma_um=-2"]) == 2
    assert "nuclei.sigma_um=-2" in capsys.readouterr().err
    assert main(["score", str(small_slide.ome_tiff), "--profile", "nope"]) == 2
    assert "unknown profile" in capsys.readouterr().err


def test_score_real_ki67(tmp_path: Path) -> None:
    path = shared_file("OS-2-vsi.ome.tif")
    out = tmp_path / "os2.json"
    assert main(["score", str(path), "--profile", "ki67", "--json", str(out), "--workers", "1"]) == 0
    j = json.loads(out.read_text())
    # A Ki-67 stained tumour: hundreds of nuclei, a minority of them brown.
    assert 500 < j["compartments"]["tissue"]["cells"] < 2000
    assert 5 < j["scores"]["ki67_index_percent"] < 40


def test_score_ome_source_with_dicom_results(small_slide: SynthOutput, tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc = main(["score", str(small_slide.ome_tiff), "--profile", "ki67", "--out", str(out), "--dicom", "--workers", "1"])
    assert rc == 0
    outputs = json.loads((out / "result.json").read_text())["outputs"]
    assert {"seg", "sr", "viewer_sr", "ann"} <= set(outputs)
    assert (out / "source-dicom").is_dir()
