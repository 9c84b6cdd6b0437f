"""Block-bootstrap intervals of the scores and abstention near clinical cut-offs."""

from __future__ import annotations

import numpy as np
import pytest

from config.settings import load_settings
from pipeline.labels import Compartment
from pipeline.scoring import AlertCode
from pipeline.uncertainty import score_intervals


def _cells(n: int, positive: float, seed: int = 0, side_um: float = 4000.0, membrane: np.ndarray | None = None) -> dict:
    """Tumour cells spread over a square, each positive (class 1–3) with probability ``positive``."""
    rng = np.random.default_rng(seed)
    pos = rng.random(n) < positive
    cls = np.where(pos, rng.integers(1, 4, n), 0)
    return {
        "x_um": rng.uniform(0, side_um, n),
        "y_um": rng.uniform(0, side_um, n),
        "compartment": np.full(n, Compartment.TUMOUR, np.uint8),
        "intensity_class": cls.astype(np.uint8),
        "membrane_class": (cls if membrane is None else membrane).astype(np.uint8),
        "membrane_complete": np.ones(n, bool),
    }


def _dab(cells: dict) -> np.ndarray:
    return np.choose(cells["intensity_class"], [0.05, 0.3, 0.5, 0.8]).astype(float)


def _run(cells: dict, profile: str, *extra: str) -> tuple:
    settings = load_settings(profile, list(extra))
    cls = cells["intensity_class"]
    pos = 100.0 * np.mean(cls > 0)
    scores = {"ki67_index_percent": pos, "positive_percent": pos}
    return score_intervals(cells, _dab(cells), scores, settings), pos


def test_the_interval_holds_the_score_shrinks_with_cells_and_is_reproducible() -> None:
    small, pos_small = _run(_cells(400, 0.4), "ki67")
    large, _ = _run(_cells(6400, 0.4), "ki67")
    low, high = small.intervals["ki67_index_percent"]
    assert low < pos_small < high and small.blocks >= 25
    w_small, w_large = high - low, np.subtract(*large.intervals["ki67_index_percent"][::-1])
    assert 0.15 < w_large / w_small < 0.4  # 16× the cells: about a quarter of the width
    again, _ = _run(_cells(400, 0.4), "ki67")
    assert again.intervals == small.intervals
    assert {"tumour.h_score", "tumour.positive_percent", "tissue.h_score"} <= set(small.intervals)


def test_binomial_coverage_of_a_known_proportion() -> None:
    """Over 60 slides of 500 cells at a true 30 %, the 95 % interval holds 30 % on most."""
    covered = [
        lo <= 30.0 <= hi
        for lo, hi in (_run(_cells(500, 0.3, seed=s), "ki67")[0].intervals["ki67_index_percent"] for s in range(60))
    ]
    assert np.mean(covered) >= 0.85


def test_a_ki67_interval_across_the_cut_off_makes_the_category_uncertain() -> None:
    near, _ = _run(_cells(600, 0.2, seed=3), "ki67")
    assert near.intervals["ki67_index_percent"][0] < 20 < near.intervals["ki67_index_percent"][1]
    (alert,) = [a for a in near.alerts if a["code"] == AlertCode.UNCERTAIN_CATEGORY]
    assert "Ki-67 high" in alert["message"] and "low" in alert["message"]
    assert 0 < near.category_support["high"] < 1
    far, _ = _run(_cells(600, 0.6, seed=3), "ki67")
    assert not far.alerts and far.category_support["high"] == 1.0


def test_er_near_ten_percent_names_both_categories() -> None:
    u, _ = _run(_cells(500, 0.1, seed=5), "er")
    messages = [a["message"] for a in u.alerts]
    assert any("ER ≥ 10 %" in m and "< 10 %" in m for m in messages), messages
    assert {"positive", "low positive"} <= set(u.category_support)


def test_her2_category_support_and_uncertainty() -> None:
    """About 10 % of tumour cells with complete intense membranes: 3+ or 2+ by resample."""
    rng = np.random.default_rng(7)
    membrane = np.where(rng.random(800) < 0.10, 3, 0)
    cells = _cells(800, 0.0, seed=7, membrane=membrane)
    settings = load_settings("her2")
    share = 100.0 * np.mean(membrane == 3)
    reported = {"category": "3+" if share > 10 else "2+", "zero_subtype": None}
    u = score_intervals(cells, _dab(cells), {"her2": reported}, settings)
    assert {"3+", "2+"} <= set(u.category_support)
    (alert,) = [a for a in u.alerts if a["code"] == AlertCode.UNCERTAIN_CATEGORY]
    assert "HER2 3+" in alert["message"] and "HER2 2+" in alert["message"]


def test_near_threshold_share() -> None:
    cells = _cells(100, 1.0, seed=1)
    cells["intensity_class"][:] = 1
    dab = np.full(100, 0.3)
    dab[:25] = 0.21  # within 0.05 OD of the 0.2 threshold
    u = score_intervals(cells, dab, {"ki67_index_percent": 100.0}, load_settings("ki67"))
    assert u.near_threshold_percent == pytest.approx(25.0)


def test_one_block_gives_no_interval() -> None:
    cells = _cells(50, 0.5, side_um=40.0)
    u, _ = _run(cells, "ki67")
    assert u.intervals == {} and u.blocks == 1
