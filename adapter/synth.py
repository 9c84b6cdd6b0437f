"""``ihc-adapter synth``: render a synthetic slide and write it in every format.

Tiles are rendered in row bands (in a process pool when ``workers > 1``),
streamed into one JPEG pyramid, and that pyramid is written as a DICOM WSI
series, a pyramidal OME-TIFF and an SVS, next to the ground truth:

``truth/compartments.png``
    compartment labels (0 background, 1 tumour, 2 stroma, 4 fat: ``pipeline.labels.Compartment``), one pixel
    per ``truth_step_px`` level-0 pixels;
``truth/cells.npz``
    per-cell centroid (level-0 px), compartment, intensity class, DAB OD;
``truth/truth.json``
    the spec and the expected per-compartment counts, H-score, % positive,
    areas and tumour fraction.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dicom_io.pyramid import PyramidBuilder
from dicom_io.sm_image import SlideIdentity, write_sm_series
from dicom_io.tiff_writer import write_ome_tiff, write_svs
from pipeline.labels import Compartment
from pipeline.synth import COMPARTMENT_NAMES, STROMA, TUMOUR, SlideModel, SynthSpec, render_tile

log = logging.getLogger(__name__)

FORMATS = ("dicom", "ome", "svs")

_worker_model: SlideModel | None = None


def _init_worker(spec: SynthSpec, thresholds: tuple[float, float]) -> None:
    global _worker_model  # one model per worker process, built once
    _worker_model = SlideModel(spec, thresholds)


def _render(args: tuple[int, int, int, int]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    assert _worker_model is not None
    t = render_tile(_worker_model, *args)
    return t.pixels, t.cells


@dataclass(frozen=True)
class SynthOutput:
    """Where the generated slide and its ground truth were written."""

    out_dir: Path
    dicom_dir: Path | None
    ome_tiff: Path | None
    svs: Path | None
    truth_dir: Path
    truth: dict[str, Any]


class _InlineExecutor:
    """Runs the render function in this process (workers=1, and tests)."""

    def __init__(self, spec: SynthSpec, thresholds: tuple[float, float]):
        _init_worker(spec, thresholds)

    def map(self, fn: Any, items: Sequence[Any]) -> Iterator[Any]:
        return map(fn, items)

    def shutdown(self) -> None:
        return None


def _bands(
    spec: SynthSpec, executor: Executor | _InlineExecutor
) -> Iterator[tuple[np.ndarray, list[dict[str, np.ndarray]]]]:
    t = spec.tile_size
    for y in range(0, spec.height, t):
        h = min(t, spec.height - y)
        jobs = [(x, y, min(t, spec.width - x), h) for x in range(0, spec.width, t)]
        results = list(executor.map(_render, jobs))
        band = np.concatenate([r[0] for r in results], axis=1)
        yield band, [r[1] for r in results]


def expected_scores(cells: dict[str, np.ndarray], labels: np.ndarray, spec: SynthSpec, step_px: int) -> dict[str, Any]:
    """Ground-truth scores from the cell table and the compartment grid."""
    px_area_mm2 = (step_px * spec.mpp / 1000.0) ** 2
    counts = np.bincount(labels.ravel(), minlength=len(Compartment))
    tissue_px = int(counts[TUMOUR] + counts[STROMA])
    compartments: dict[str, Any] = {}
    for name, sel in (
        ("tumour", cells["compartment"] == TUMOUR),
        ("stroma", cells["compartment"] == STROMA),
        ("tissue", np.ones(cells["compartment"].shape, bool)),
    ):
        n = np.bincount(cells["intensity_class"][sel], minlength=4)
        total = int(n.sum())
        area_px = {"tumour": counts[TUMOUR], "stroma": counts[STROMA], "tissue": tissue_px}[name]
        compartments[name] = {
            "cells": total,
            "negative": int(n[0]),
            "1+": int(n[1]),
            "2+": int(n[2]),
            "3+": int(n[3]),
            "h_score": float(100.0 * (n[1] + 2 * n[2] + 3 * n[3]) / total) if total else None,
            "positive_percent": float(100.0 * (n[1] + n[2] + n[3]) / total) if total else None,
            "area_mm2": float(area_px * px_area_mm2),
        }
    return {
        "compartments": compartments,
        "tumour_fraction": float(counts[TUMOUR] / tissue_px) if tissue_px else 0.0,
        "low_tumour": bool(tissue_px and counts[TUMOUR] / tissue_px < 0.10),
        "fat_area_mm2": float(counts[Compartment.FAT] * px_area_mm2),
    }


def generate(
    spec: SynthSpec,
    out_dir: Path,
    formats: Sequence[str] = FORMATS,
    identity: SlideIdentity | None = None,
    workers: int | None = None,
) -> SynthOutput:
    """Render ``spec`` and write it as the requested formats plus ground truth."""
    unknown = set(formats) - set(FORMATS)
    if unknown:
        from config.errors import ConfigError

        raise ConfigError("formats", sorted(unknown), f"choose from {', '.join(FORMATS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    workers = workers or min(2, os.cpu_count() or 1)
    model = SlideModel(spec)
    truth_dir = out_dir / "truth"
    truth_dir.mkdir(exist_ok=True)
    identity = identity or SlideIdentity(container_identifier=f"SYNTH-{spec.seed}")
    tmp = Path(tempfile.mkdtemp(prefix=".pyramid-", dir=out_dir))
    executor: Executor | _InlineExecutor
    if workers > 1:
        # A fork server, not a fork of this (possibly threaded) process.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["adapter.synth"])
        executor = ProcessPoolExecutor(workers, context, initializer=_init_worker, initargs=(spec, model.thresholds))
    else:
        executor = _InlineExecutor(spec, model.thresholds)
    try:
        builder = PyramidBuilder(spec.width, spec.height, spec.mpp, tmp, spec.tile_size, spec.jpeg_quality)
        cell_parts: list[dict[str, np.ndarray]] = []
        for i, (band, band_cells) in enumerate(_bands(spec, executor)):
            builder.add_band(band)
            cell_parts.extend(band_cells)
            log.debug("band %d/%d", i + 1, math.ceil(spec.height / spec.tile_size))
        levels = builder.finish()
        dicom_dir = ome = svs = None
        name = f"synthetic-{spec.seed}"
        if "dicom" in formats:
            dicom_dir = out_dir / "dicom"
            write_sm_series(levels, dicom_dir, identity)
        if "ome" in formats:
            ome = write_ome_tiff(levels, out_dir / f"{name}.ome.tif", name)
        if "svs" in formats:
            svs = write_svs(levels, out_dir / f"{name}.svs")
    finally:
        executor.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    cells = {k: np.concatenate([c[k] for c in cell_parts]) for k in cell_parts[0]}
    table = {
        "x_px": (cells["x_um"] / spec.mpp).astype(np.float32),
        "y_px": (cells["y_um"] / spec.mpp).astype(np.float32),
        "compartment": cells["compartment"],
        "intensity_class": cells["intensity_class"],
        "dab_od": cells["dab_od"].astype(np.float32),
    }
    np.savez_compressed(truth_dir / "cells.npz", **table)  # type: ignore[arg-type]
    labels = model.truth_labels()
    Image.fromarray(labels).save(truth_dir / "compartments.png")
    artefacts = (
        (spec.pen_strokes, "ink", model.truth_ink),
        (spec.blur_patches, "blur", model.truth_blur),
        (spec.folds, "fold", model.truth_fold),
        (spec.bubbles, "bubble", model.truth_bubble),
        (spec.overexposed, "overexposed", model.truth_overexposed),
        (spec.debris, "debris", model.truth_debris),
    )
    for count, name, truth_mask in artefacts:
        if count:
            Image.fromarray(truth_mask().astype(np.uint8) * 255).save(truth_dir / f"{name}.png")
    truth = {
        "spec": spec.model_dump(),
        "truth_step_px": model.truth_step_px,
        "compartment_labels": {str(k): v for k, v in COMPARTMENT_NAMES.items()},
        "intensity_classes": {"0": "negative", "1": "1+", "2": "2+", "3": "3+"},
        "stain_vectors": {"hematoxylin": model.stain_matrix[0].tolist(), "dab": model.stain_matrix[1].tolist()},
        "dab_scale": model.dab_scale,
        **expected_scores(table, labels, spec, model.truth_step_px),
    }
    (truth_dir / "truth.json").write_text(json.dumps(truth, indent=2))
    return SynthOutput(out_dir, dicom_dir, ome, svs, truth_dir, truth)
