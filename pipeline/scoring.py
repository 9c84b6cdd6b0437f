"""Score formulas, each a small pure function tested against hand-computed values.

Counts are pooled over the whole slide before any ratio is taken, which is
the cell-weighted mean of tile scores (tiles with more cells weigh more).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Any, NotRequired, TypedDict

import numpy as np
import numpy.typing as npt

from config.settings import ScoreSettings


class AlertCode(StrEnum):
    """Why a pathologist must look at a result before accepting it (the ``code`` of each alert)."""

    LITTLE_TISSUE = "LITTLE_TISSUE"
    NO_TUMOUR = "NO_TUMOUR"
    LOW_TUMOUR = "LOW_TUMOUR"
    FEW_TUMOUR_CELLS = "FEW_TUMOUR_CELLS"
    NEAR_CUTOFF = "NEAR_CUTOFF"
    LOW_POSITIVE = "LOW_POSITIVE"
    HER2_EQUIVOCAL = "HER2_EQUIVOCAL"
    UNCERTAIN_CATEGORY = "UNCERTAIN_CATEGORY"
    QC_FAILED = "QC_FAILED"
    PALE_COUNTERSTAIN = "PALE_COUNTERSTAIN"

    @property
    def meaning(self) -> str:
        """One line on what the alert means, as the DICOM SR and the conformance statement give it."""
        return _ALERT_MEANINGS[self]


_ALERT_MEANINGS = {  # at most 64 characters: a DICOM Code Meaning
    AlertCode.LITTLE_TISSUE: "Less tissue than the profile's minimum",
    AlertCode.NO_TUMOUR: "No tumour found; the scores are not valid",
    AlertCode.LOW_TUMOUR: "Tumour a small part of tissue; automated scores overestimate",
    AlertCode.FEW_TUMOUR_CELLS: "Fewer tumour cells than the profile's minimum",
    AlertCode.NEAR_CUTOFF: "Score near a clinical cut-off of the profile",
    AlertCode.LOW_POSITIVE: "ER or PR low positive (1-10 % of tumour cells)",
    AlertCode.HER2_EQUIVOCAL: "HER2 2+ (equivocal): reflex in-situ hybridisation",
    AlertCode.UNCERTAIN_CATEGORY: "95 % interval spans two clinical categories",
    AlertCode.QC_FAILED: "Quality control failed (usable tissue, counterstain); not valid",
    AlertCode.PALE_COUNTERSTAIN: "Pale counterstain: pale negative nuclei may be missed",
}


class Alert(TypedDict):
    """One alert of a result: its code (an :class:`AlertCode` value) and a message for people."""

    code: str
    message: str


#: One compartment's summary in a result (``compartments.tumour`` … in the JSON).
CompartmentSummary = TypedDict(
    "CompartmentSummary",
    {
        "cells": int,
        "negative": int,
        "1+": int,
        "2+": int,
        "3+": int,
        "h_score": float | None,
        "positive_percent": float | None,
        "area_mm2": float,
        "cells_per_mm2": float | None,
        "pixel_h_score": NotRequired[float | None],
    },
)


#: Cell (or pixel) counts of negative, 1+, 2+, 3+.
Counts = Sequence[int] | npt.NDArray[np.integer]


def h_score(counts: Counts) -> float | None:
    """Cell H-score 0–300 = 100·(n1 + 2·n2 + 3·n3) / n; None without cells."""
    n0, n1, n2, n3 = (int(c) for c in counts)
    n = n0 + n1 + n2 + n3
    return 100.0 * (n1 + 2 * n2 + 3 * n3) / n if n else None


def positive_percent(counts: Counts) -> float | None:
    n = int(sum(counts))
    return 100.0 * (n - int(counts[0])) / n if n else None


def allred(counts: Counts) -> dict[str, int]:
    """Allred score: proportion (0–5) + intensity (0–3) = total (0, 2–8).

    Proportion of positive cells: 0 none, 1 <1 %, 2 1–10 %, 3 10–33 %,
    4 33–66 %, 5 >66 %. Intensity: the average class of positive cells,
    rounded (1 weak, 2 intermediate, 3 strong).
    """
    n0, n1, n2, n3 = (int(c) for c in counts)
    n = n0 + n1 + n2 + n3
    pos = n1 + n2 + n3
    if n == 0 or pos == 0:
        return {"proportion": 0, "intensity": 0, "total": 0}
    p = 100.0 * pos / n
    proportion = 1 if p < 1 else 2 if p <= 10 else 3 if p <= 100 / 3 else 4 if p <= 200 / 3 else 5
    intensity = int(np.floor((n1 + 2 * n2 + 3 * n3) / pos + 0.5))
    return {"proportion": proportion, "intensity": intensity, "total": proportion + intensity}


def receptor_category(percent: float | None) -> str | None:
    """ER/PR per ASCO/CAP 2020: positive ≥ 10 %, low positive 1–10 %, negative < 1 %."""
    if percent is None:
        return None
    return "positive" if percent >= 10 else "low positive" if percent >= 1 else "negative"


def her2_category(membrane_class: np.ndarray, complete: np.ndarray, min_percent: float = 0.0) -> dict[str, Any]:
    """HER2 IHC category of tumour cells per ASCO/CAP 2018 (0 split as in the 2023 update).

    ``membrane_class``: 0–3 per tumour cell from membrane DAB; ``complete``:
    the stained fraction of the cell's membrane reaches the completeness
    limit. 3+: complete intense staining in > 10 % of tumour cells; 2+:
    complete weak-to-moderate staining in > 10 %, or complete intense in
    ≤ 10 %; 1+: incomplete faint staining in > 10 %; 0 otherwise, reported
    as *ultralow* when some (≤ 10 %) cells are stained and *null* when none.

    ``min_percent`` is the noise floor of an automated count: a population
    under this share of tumour cells is not "present". The guideline's
    "complete intense in ≤ 10 %" (2+) and "staining in > 0 %" (ultralow)
    describe what a pathologist sees in the tumour, not one misclassified
    cell among 10⁵; below the floor the slide is called as if those cells
    were unstained, and the detail says how many there were.
    """
    n = int(membrane_class.size)
    if n == 0:
        return {"category": None, "zero_subtype": None}
    stained = membrane_class >= 1
    pct = lambda m: 100.0 * float(np.count_nonzero(m)) / n  # noqa: E731
    complete_strong = pct(stained & complete & (membrane_class == 3))
    complete_weak_moderate = pct(stained & complete & (membrane_class < 3))
    any_stained = pct(stained)
    detail = {
        "complete_intense_percent": complete_strong,
        "complete_weak_moderate_percent": complete_weak_moderate,
        "stained_percent": any_stained,
        "noise_floor_percent": min_percent,
    }
    level = int(her2_levels(complete_strong, complete_weak_moderate, any_stained, min_percent))
    category, zero_subtype = HER2_LEVELS[level]
    return {"category": category, "zero_subtype": zero_subtype, **detail}


#: (category, zero subtype) of each level :func:`her2_levels` returns, lowest first.
HER2_LEVELS: tuple[tuple[str, str | None], ...] = (
    ("0", "null"),
    ("0", "ultralow"),
    ("1+", None),
    ("2+", None),
    ("3+", None),
)


def her2_levels(
    complete_strong: np.ndarray | float,
    complete_weak_moderate: np.ndarray | float,
    any_stained: np.ndarray | float,
    min_percent: float,
) -> np.ndarray:
    """Index into :data:`HER2_LEVELS` from the percentages of tumour cells with complete intense,
    complete weak-to-moderate and any membrane staining (the rules of :func:`her2_category`);
    element-wise, so that resampled percentages are categorised in one call."""
    tiny = max(min_percent, 1e-12)
    strong = np.asarray(complete_strong)
    return np.select(
        [
            strong > 10,
            (np.asarray(complete_weak_moderate) + strong > 10) | (strong >= tiny),
            np.asarray(any_stained) > 10,
            np.asarray(any_stained) >= tiny,
        ],
        [4, 3, 2, 1],
        0,
    )


def compartment_summary(classes: np.ndarray, area_mm2: float, pixel_counts: Counts | None = None) -> CompartmentSummary:
    """Counts by class, cell and pixel H-score, % positive, area, cellularity."""
    counts = np.bincount(classes.astype(np.int64), minlength=4)[:4] if classes.size else np.zeros(4, int)
    out: CompartmentSummary = {
        "cells": int(counts.sum()),
        "negative": int(counts[0]),
        "1+": int(counts[1]),
        "2+": int(counts[2]),
        "3+": int(counts[3]),
        "h_score": h_score(counts),
        "positive_percent": positive_percent(counts),
        "area_mm2": float(area_mm2),
        "cells_per_mm2": float(counts.sum() / area_mm2) if area_mm2 > 0 else None,
    }
    if pixel_counts is not None:
        out["pixel_h_score"] = h_score(pixel_counts)
    return out


def profile_scores(
    kind: str,
    tumour_classes: np.ndarray,
    tumour_membrane_class: np.ndarray,
    tumour_membrane_complete: np.ndarray,
    settings: ScoreSettings,
) -> dict[str, Any]:
    """The clinical score(s) of a stain profile, from tumour cells."""
    counts = np.bincount(tumour_classes.astype(np.int64), minlength=4)[:4]
    pos = positive_percent(counts)
    scores: dict[str, Any] = {"h_score": h_score(counts), "positive_percent": pos}
    if kind == "ki67":
        scores["ki67_index_percent"] = pos
        scores["ki67_cutoff_percent"] = settings.ki67_cutoff_percent
        scores["ki67_high"] = None if pos is None else pos >= settings.ki67_cutoff_percent
    elif kind in ("er", "pr"):
        scores["allred"] = allred(counts)
        scores["category"] = receptor_category(pos)
    elif kind == "her2":
        scores["her2"] = her2_category(
            tumour_membrane_class, tumour_membrane_complete, settings.her2_noise_floor_percent
        )
    elif kind == "pdl1":
        n = tumour_membrane_class.size
        scores["tps_percent"] = 100.0 * float(np.count_nonzero(tumour_membrane_class >= 1)) / n if n else None
    return scores


def alerts(
    kind: str,
    tumour_fraction: float,
    tumour_cells: int,
    tissue_mm2: float,
    scores: dict[str, Any],
    settings: ScoreSettings,
) -> list[Alert]:
    """Conditions a pathologist must look at before accepting the result."""
    out: list[Alert] = []

    def add(code: AlertCode, message: str) -> None:
        out.append({"code": code.value, "message": message})

    if tissue_mm2 < settings.min_tissue_mm2:
        add(
            AlertCode.LITTLE_TISSUE,
            f"only {tissue_mm2:.2f} mm² of tissue found (minimum {settings.min_tissue_mm2} mm²)",
        )
    if tumour_cells == 0 or tumour_fraction == 0:
        add(AlertCode.NO_TUMOUR, "no tumour found; the scores are not valid")
    else:
        if tumour_fraction < settings.low_tumour_fraction:
            add(
                AlertCode.LOW_TUMOUR,
                f"tumour is {100 * tumour_fraction:.1f}% of tissue (< {100 * settings.low_tumour_fraction:.0f}%): "
                "automated scores overestimate here; verify by eye",
            )
        if tumour_cells < settings.min_tumour_cells:
            add(
                AlertCode.FEW_TUMOUR_CELLS,
                f"only {tumour_cells} tumour cells scored (minimum {settings.min_tumour_cells})",
            )
    margin = settings.near_cutoff_percent
    if kind == "ki67" and scores.get("ki67_index_percent") is not None:
        k = scores["ki67_index_percent"]
        if abs(k - settings.ki67_cutoff_percent) <= margin:
            add(
                AlertCode.NEAR_CUTOFF,
                f"Ki-67 {k:.1f}% is within {margin}% of the {settings.ki67_cutoff_percent}% cut-off",
            )
    if kind in ("er", "pr") and scores.get("category") is not None:
        p = scores["positive_percent"]
        if scores["category"] == "low positive":
            add(AlertCode.LOW_POSITIVE, f"{kind.upper()} low positive ({p:.1f}% of tumour cells, 1–10%)")
        elif any(abs(p - cut) <= margin for cut in (1.0, 10.0)):
            add(AlertCode.NEAR_CUTOFF, f"{kind.upper()} {p:.1f}% is near the 1% / 10% cut-offs")
    if kind == "her2" and (scores.get("her2") or {}).get("category") == "2+":
        add(AlertCode.HER2_EQUIVOCAL, "HER2 2+ (equivocal): reflex in-situ hybridisation (ISH) testing is indicated")
    return out
