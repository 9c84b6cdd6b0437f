"""95 % intervals for the slide-level scores, and abstention near clinical cut-offs.

Cells in one region of a slide are not independent (a tumour nest stains alike), so the
intervals come from a bootstrap over spatial blocks (``uncertainty.block_um``, 512 µm: a 2×2
group of analysis tiles; halved on a small slide until it has at least 25 blocks, down to
64 µm): each resample draws as many blocks as the slide has, with replacement,
and every score is recomputed from the drawn blocks' pooled counts. The interval is the central
``confidence`` share of the resampled scores. With counts per block precomputed, a thousand
resamples are one matrix product.

Where the interval of a score crosses a clinical cut-off of the profile (the Ki-67 cut-off; ER and
PR at 1 % and 10 %; PD-L1 TPS at 1 % and 50 %), or the HER2 category of more than
``1 - confidence`` of the resamples differs from the reported one, the result says so with an
``UNCERTAIN_CATEGORY`` alert naming both categories, instead of reporting one category as fact.

It also reports the share of scored cells whose DAB lies within ``uncertainty.margin_od`` of a
class threshold: how much the classes depend on the exact cut-off.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from config.settings import Settings
from pipeline.labels import Compartment
from pipeline.scoring import HER2_LEVELS, Alert, AlertCode, her2_levels, receptor_category

#: A slide with fewer blocks than this is cut into smaller ones (down to MIN_BLOCK_UM).
MIN_BLOCKS = 25
MIN_BLOCK_UM = 64.0

#: Clinical cut-offs (percent) of each profile's continuous score, and the score's name.
CUTOFFS: dict[str, tuple[str, tuple[float, ...]]] = {
    "er": ("positive_percent", (1.0, 10.0)),
    "pr": ("positive_percent", (1.0, 10.0)),
    "pdl1": ("tps_percent", (1.0, 50.0)),
}


@dataclass(frozen=True)
class Uncertainty:
    """Intervals of a result's scores and what they say about its categories."""

    #: Score name → (low, high) at ``confidence``: ``tumour.h_score``, ``ki67_index_percent`` …
    intervals: dict[str, tuple[float, float]]
    confidence: float
    blocks: int
    resamples: int
    block_um: float
    #: Percent of scored tumour cells whose DAB lies within the margin of a class threshold.
    near_threshold_percent: float | None
    #: Category → share of resamples giving it (Ki-67 high/low, ER/PR, HER2).
    category_support: dict[str, float] = field(default_factory=dict)
    alerts: list[Alert] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "confidence": self.confidence,
            "blocks": self.blocks,
            "block_um": self.block_um,
            "resamples": self.resamples,
            "near_threshold_percent": self.near_threshold_percent,
            "category_support": self.category_support,
        }


def _interval(values: np.ndarray, confidence: float) -> tuple[float, float] | None:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    tail = 50.0 * (1.0 - confidence)
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def score_intervals(
    cells: dict[str, np.ndarray], dab: np.ndarray, scores: dict[str, Any], settings: Settings
) -> Uncertainty:
    """Block-bootstrap intervals of the scores of a slide's ``cells`` (x_um, y_um, compartment,
    intensity_class, membrane_class, membrane_complete), ``dab`` the value each cell was classed
    by, ``scores`` the reported point scores."""
    u = settings.uncertainty
    scored = np.isin(cells["compartment"], (Compartment.TUMOUR, Compartment.STROMA))
    side = u.block_um
    while True:  # smaller blocks on a small slide, so that the resamples vary
        bx = np.floor(cells["x_um"] / side).astype(np.int64)
        by = np.floor(cells["y_um"] / side).astype(np.int64)
        key = by * (int(bx.max(initial=0)) + 1) + bx
        _, block = np.unique(key[scored], return_inverse=True)
        n_blocks = int(block.max(initial=-1)) + 1
        if n_blocks >= MIN_BLOCKS or side / 2 < MIN_BLOCK_UM:
            break
        side /= 2
    tumour = cells["compartment"][scored] == Compartment.TUMOUR
    cls = cells["intensity_class"][scored].astype(np.int64)
    # Per block: tumour and stroma cells by class, and the HER2 membrane populations of tumour cells.
    columns = np.where(tumour, 0, 4) + cls
    table = np.zeros((n_blocks, 11))
    np.add.at(table, (block, columns), 1.0)
    membrane = cells["membrane_class"][scored].astype(np.int64)
    complete = cells["membrane_complete"][scored].astype(bool)
    stained = membrane >= 1
    np.add.at(table, (block, 8), (tumour & stained & complete & (membrane == 3)).astype(float))
    np.add.at(table, (block, 9), (tumour & stained & complete & (membrane < 3)).astype(float))
    np.add.at(table, (block, 10), (tumour & stained).astype(float))  # also the PD-L1 TPS numerator
    near = None
    if tumour.any():
        thresholds = np.asarray(
            [settings.intensity.single_threshold]
            if settings.intensity.single_threshold is not None
            else settings.intensity.thresholds
        )
        value = dab[scored][tumour]
        near = 100.0 * float((np.abs(value[:, None] - thresholds[None, :]) < u.margin_od).any(axis=1).mean())
    if n_blocks < 2:
        return Uncertainty({}, u.confidence, n_blocks, 0, side, near)
    rng = np.random.default_rng(u.seed)
    weights = rng.multinomial(n_blocks, np.full(n_blocks, 1.0 / n_blocks), size=u.resamples).astype(float)
    sums = weights @ table  # resamples × columns
    intervals: dict[str, tuple[float, float]] = {}

    def summary(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = counts.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            h = 100.0 * (counts[:, 1] + 2 * counts[:, 2] + 3 * counts[:, 3]) / n
            pos = 100.0 * (n - counts[:, 0]) / n
        return h, pos

    per = {"tumour": sums[:, 0:4], "stroma": sums[:, 4:8], "tissue": sums[:, 0:4] + sums[:, 4:8]}
    resampled: dict[str, np.ndarray] = {}
    for name, counts in per.items():
        h, pos = summary(counts)
        resampled[f"{name}.h_score"], resampled[f"{name}.positive_percent"] = h, pos
    n_tumour = sums[:, 0:4].sum(axis=1)
    kind = settings.scores.kind
    if kind == "ki67":
        resampled["ki67_index_percent"] = resampled["tumour.positive_percent"]
    if kind in ("er", "pr"):
        resampled["positive_percent"] = resampled["tumour.positive_percent"]
    with np.errstate(invalid="ignore", divide="ignore"):
        if kind == "pdl1":
            resampled["tps_percent"] = 100.0 * sums[:, 10] / n_tumour
        strong, weak, any_stained = (100.0 * sums[:, k] / n_tumour for k in (8, 9, 10))
    for name, values in resampled.items():
        found = _interval(values, u.confidence)
        if found is not None:
            intervals[name] = found
    support: dict[str, float] = {}
    alerts: list[Alert] = []

    def uncertain(first: str, second: str, why: str) -> None:
        alerts.append({"code": AlertCode.UNCERTAIN_CATEGORY.value, "message": f"{first} or {second}: {why}"})

    conf = f"{100 * u.confidence:.0f} %"
    if kind == "ki67" and "ki67_index_percent" in intervals:
        cut = settings.scores.ki67_cutoff_percent
        low, high = intervals["ki67_index_percent"]
        values = resampled["ki67_index_percent"]
        support = {"high": float(np.mean(values >= cut)), "low": float(np.mean(values < cut))}
        if low < cut <= high:
            uncertain(
                f"Ki-67 high (≥ {cut:g} %)",
                f"low (< {cut:g} %)",
                f"the {conf} interval {low:.1f}–{high:.1f} % crosses the cut-off",
            )
    if kind in CUTOFFS:
        name, cuts = CUTOFFS[kind]
        if name in intervals:
            low, high = intervals[name]
            values = resampled[name]
            if kind in ("er", "pr"):
                categories = np.array([receptor_category(v) for v in values if np.isfinite(v)])
                support = {c: float(np.mean(categories == c)) for c in sorted(set(categories.tolist()))}
            for cut in cuts:
                if low < cut <= high:
                    label = kind.upper() if kind != "pdl1" else "PD-L1 TPS"
                    uncertain(
                        f"{label} ≥ {cut:g} %",
                        f"< {cut:g} %",
                        f"the {conf} interval {low:.1f}–{high:.1f} % crosses the cut-off",
                    )
    if kind == "her2" and (scores.get("her2") or {}).get("category") is not None:
        levels = her2_levels(strong, weak, any_stained, settings.scores.her2_noise_floor_percent)
        labels = [category if subtype is None else f"{category} ({subtype})" for category, subtype in HER2_LEVELS]
        categories = np.asarray(labels)[levels]
        support = {c: float(np.mean(categories == c)) for c in sorted(set(categories.tolist()))}
        reported = scores["her2"]["category"]
        if reported == "0":
            reported = f"0 ({scores['her2']['zero_subtype']})"
        others = {c: s for c, s in support.items() if c != reported and s > 1.0 - u.confidence}
        if others:
            second = max(others, key=lambda c: others[c])
            uncertain(
                f"HER2 {reported}",
                f"HER2 {second}",
                f"{100 * others[second]:.0f} % of block resamples give {second}",
            )
    return Uncertainty(intervals, u.confidence, n_blocks, u.resamples, side, near, support, alerts)
