"""The model plug-ins end to end on every device here: CPU, and CUDA where present.

    python bench/models.py [--size 4096] [--format pt2|pt] [--workers N]

Scores a synthetic slide with a nucleus model (``nuclei.model``) and a
tumour–stroma model (``segmentation.model``) in place of the built-in
detector and rule, once per device, and checks that the devices agree. The
models are the hand-written rules of :mod:`pipeline.synth.toy_models`, saved
as TorchScript or ``torch.export`` files: the point is the loading, batching
and device placement, not the models. Prints one line per device and, last,
one JSON object: ``cuda`` (whether a GPU was used), per device the wall
time, MP/s of tissue, cells, tumour fraction and Ki-67 index, and ``agree``
(cells within 0.5 %, tumour fraction within 0.005).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapter.synth import generate
from config.settings import load_settings
from dicom_io import open_slide
from pipeline.analysis import analyse
from pipeline.synth import SynthSpec
from pipeline.synth.toy_models import DarknessCompartments, HaematoxylinNuclei, save_exported, save_torchscript


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--format", choices=("pt2", "pt"), default="pt2")
    p.add_argument("--workers", type=int, default=0, help="tiling.workers (0 = all cores)")
    a = p.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = generate(SynthSpec(width=a.size, height=a.size, seed=41), Path(tmp) / "slide", formats=("ome",))
        assert out.ome_tiff
        suffix = f".{a.format}"
        save = save_torchscript if a.format == "pt" else save_exported
        nuclei = save(HaematoxylinNuclei(), Path(tmp) / f"nuclei{suffix}")
        tumour = save(DarknessCompartments(), Path(tmp) / f"tumour{suffix}")
        opener = functools.partial(open_slide, out.ome_tiff)
        for device in devices:
            overrides = [
                f"nuclei.model={json.dumps(str(nuclei))}",
                'nuclei.model_channels="hdab"',
                f'nuclei.device="{device}"',
                'segmentation.method="model"',
                f"segmentation.model={json.dumps(str(tumour))}",
                'segmentation.model_channels="rgb"',
                f'segmentation.device="{device}"',
                f"tiling.workers={a.workers}",
            ]
            with opener() as slide:
                t = time.perf_counter()
                r = analyse(slide, load_settings("ki67", overrides), opener=opener)
                wall = time.perf_counter() - t
            report[device] = {
                "wall_s": round(wall, 2),
                "mps": round(r.timings["tissue_mpx"] / wall, 2),
                "cells": len(r.cells["x_um"]),
                "tumour_fraction": round(r.tumour_fraction, 4),
                "ki67_index_percent": r.scores.get("ki67_index_percent"),
            }
            print(device, json.dumps(report[device]), flush=True)
    cpu = report["cpu"]
    agree = all(
        abs(v["cells"] - cpu["cells"]) <= 0.005 * cpu["cells"]
        and abs(v["tumour_fraction"] - cpu["tumour_fraction"]) <= 0.005
        for v in report.values()
    )
    print(json.dumps({"cuda": "cuda" in report, "format": a.format, "size": a.size, "devices": report, "agree": agree}))


if __name__ == "__main__":
    main()
