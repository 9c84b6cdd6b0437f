"""Every score formula against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from config.settings import ScoreSettings
from pipeline import scoring


def test_h_score_and_positive_percent() -> None:
    # 10 cells: 4 negative, 3 weak, 2 moderate, 1 strong -> (3 + 4 + 3) * 100 / 10 = 100
    assert scoring.h_score([4, 3, 2, 1]) == pytest.approx(100.0)
    assert scoring.positive_percent([4, 3, 2, 1]) == pytest.approx(60.0)
    assert scoring.h_score([0, 0, 0, 5]) == 300.0
    assert scoring.h_score([0, 0, 0, 0]) is None


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ([100, 0, 0, 0], (0, 0, 0)),
        ([995, 5, 0, 0], (1, 1, 2)),  # 0.5 % weak
        ([95, 0, 5, 0], (2, 2, 4)),  # 5 % moderate
        ([80, 0, 0, 20], (3, 3, 6)),  # 20 % strong
        ([50, 25, 25, 0], (4, 2, 6)),  # 50 %, mean class 1.5 -> 2
        ([10, 0, 0, 90], (5, 3, 8)),
    ],
)
def test_allred(counts: list[int], expected: tuple[int, int, int]) -> None:
    a = scoring.allred(counts)
    assert (a["proportion"], a["intensity"], a["total"]) == expected


def test_receptor_categories() -> None:
    assert scoring.receptor_category(0.5) == "negative"
    assert scoring.receptor_category(1.0) == "low positive"
    assert scoring.receptor_category(9.9) == "low positive"
    assert scoring.receptor_category(10.0) == "positive"
    assert scoring.receptor_category(None) is None


def _her2(classes: list[int], complete: list[bool]) -> dict:
    return scoring.her2_category(np.array(classes), np.array(complete))


def test_her2_asco_cap_categories() -> None:
    n = 100
    strong_complete = [3] * 11 + [0] * 89
    assert _her2(strong_complete, [True] * n)["category"] == "3+"
    # complete intense in <= 10 % is 2+
    assert _her2([3] * 5 + [0] * 95, [True] * n)["category"] == "2+"
    # complete weak-to-moderate in > 10 %
    assert _her2([2] * 20 + [0] * 80, [True] * 20 + [False] * 80)["category"] == "2+"
    # incomplete faint in > 10 %
    assert _her2([1] * 30 + [0] * 70, [False] * n)["category"] == "1+"
    ultralow = _her2([1] * 5 + [0] * 95, [False] * n)
    assert ultralow["category"] == "0" and ultralow["zero_subtype"] == "ultralow"
    null = _her2([0] * n, [False] * n)
    assert null["category"] == "0" and null["zero_subtype"] == "null"


def test_one_cell_in_100000_does_not_decide_a_her2_case() -> None:
    n = 100_000
    one = np.zeros(n, np.int64)
    one[17] = 3
    complete = np.zeros(n, bool)
    complete[17] = True
    # One complete, intense cell: noise under the 1 % floor (a single cell would make it 2+ without one).
    assert scoring.her2_category(one, complete, 1.0)["category"] == "0"
    assert scoring.her2_category(one, complete, 1.0)["zero_subtype"] == "null"
    assert scoring.her2_category(one, complete, 0.0)["category"] == "2+"
    # 2 % complete intense is a population: equivocal (2+), as ASCO/CAP says for <= 10 %.
    many = np.zeros(n, np.int64)
    many[: 2 * n // 100] = 3
    full = many > 0
    assert scoring.her2_category(many, full, 1.0)["category"] == "2+"
    # Faint incomplete staining: one cell is null, 2 % is ultralow, 11 % is 1+.
    faint = np.zeros(n, np.int64)
    faint[5] = 1
    assert scoring.her2_category(faint, np.zeros(n, bool), 1.0)["zero_subtype"] == "null"
    assert scoring.her2_category(faint, np.zeros(n, bool), 0.0)["zero_subtype"] == "ultralow"
    faint[: 2 * n // 100] = 1
    assert scoring.her2_category(faint, np.zeros(n, bool), 1.0)["zero_subtype"] == "ultralow"
    faint[: 11 * n // 100] = 1
    assert scoring.her2_category(faint, np.zeros(n, bool), 1.0)["category"] == "1+"
    result = scoring.profile_scores("her2", np.zeros(n), one, complete, ScoreSettings())
    assert result["her2"]["category"] == "0" and result["her2"]["noise_floor_percent"] == 1.0


def test_profile_scores_ki67_and_pdl1() -> None:
    s = ScoreSettings()
    k = scoring.profile_scores("ki67", np.array([0, 0, 0, 1, 3]), np.zeros(5), np.zeros(5, bool), s)
    assert k["ki67_index_percent"] == pytest.approx(40.0) and k["ki67_high"] is True
    p = scoring.profile_scores("pdl1", np.zeros(4), np.array([0, 1, 2, 0]), np.zeros(4, bool), s)
    assert p["tps_percent"] == pytest.approx(50.0)


def _codes(**kw) -> list[str]:
    args = {"kind": "hscore", "tumour_fraction": 0.5, "tumour_cells": 1000, "tissue_mm2": 10.0, "scores": {}}
    args.update(kw)
    return [a["code"] for a in scoring.alerts(settings=ScoreSettings(), **args)]


def test_each_alert() -> None:
    assert _codes() == []
    assert _codes(tumour_fraction=0.05) == ["LOW_TUMOUR"]
    assert _codes(tumour_fraction=0.10) == []
    assert _codes(tumour_fraction=0.0, tumour_cells=0) == ["NO_TUMOUR"]
    assert _codes(tumour_cells=20) == ["FEW_TUMOUR_CELLS"]
    assert _codes(tissue_mm2=0.1) == ["LITTLE_TISSUE"]
    assert _codes(kind="her2", scores={"her2": {"category": "2+"}}) == ["HER2_EQUIVOCAL"]
    assert _codes(kind="ki67", scores={"ki67_index_percent": 21.0}) == ["NEAR_CUTOFF"]
    assert _codes(kind="ki67", scores={"ki67_index_percent": 40.0}) == []
    assert _codes(kind="er", scores={"category": "low positive", "positive_percent": 5.0}) == ["LOW_POSITIVE"]
    assert _codes(kind="pr", scores={"category": "positive", "positive_percent": 11.0}) == ["NEAR_CUTOFF"]
