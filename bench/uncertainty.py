"""Coverage and width of the 95 % intervals (pipeline.uncertainty) on generator slides.

    python bench/uncertainty.py                       # 50 slides of 1024², then 12 of 2048²
    python bench/uncertainty.py --slides 20 --size 1536

Each slide is drawn with known class proportions (the generator's ``tumour_classes``: the true
Ki-67 index of the tissue is 100 × (1 − the negative share), 65 % by default; every other seed
draws them anew around it) and scored with the Ki-67 profile. Reports how often the interval of
the Ki-67 index covers that truth (the goal: ≥ 90 % of the slides), its mean width, and the mean
width on slides of four times the area (it should about halve: width ∝ 1/√cells). The last line
is one JSON object with ``slides``, ``coverage`` and ``mean_width``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapter.synth import generate
from config.settings import load_settings
from dicom_io import open_slide
from pipeline.analysis import analyse
from pipeline.synth import SynthSpec


def _spec(seed: int, size: int) -> SynthSpec:
    rng = np.random.default_rng(seed)
    negative = float(rng.uniform(0.2, 0.9))
    rest = rng.dirichlet((2.0, 2.0, 1.0)) * (1.0 - negative)
    classes = (negative, *(float(v) for v in rest))
    return SynthSpec(width=size, height=size, seed=seed, tumour_fraction=0.4, tumour_classes=classes)


def run(seeds: range, size: int, workdir: Path) -> list[dict[str, float]]:
    rows = []
    settings = load_settings("ki67", ["tiling.workers=1"])
    for seed in seeds:
        spec = _spec(seed, size)
        out = generate(spec, workdir / f"{size}-{seed}", formats=("ome",), workers=1)
        assert out.ome_tiff
        with open_slide(out.ome_tiff) as slide:
            r = analyse(slide, settings)
        truth = 100.0 * (1.0 - spec.tumour_classes[0])
        assert r.uncertainty is not None
        low, high = r.uncertainty.intervals["ki67_index_percent"]
        rows.append(
            {
                "seed": seed,
                "truth": truth,
                "measured": r.scores["ki67_index_percent"],
                "low": low,
                "high": high,
                "covered": float(low <= truth <= high),
                "tumour_cells": r.compartment_stats["tumour"]["cells"],
                "blocks": r.uncertainty.blocks,
            }
        )
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--slides", type=int, default=50)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--large-slides", type=int, default=12, help="slides of twice the side, for the width")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        small = run(range(1, a.slides + 1), a.size, Path(tmp))
        large = run(range(1001, 1001 + a.large_slides), 2 * a.size, Path(tmp)) if a.large_slides else []
    coverage = float(np.mean([r["covered"] for r in small]))
    width = float(np.mean([r["high"] - r["low"] for r in small]))
    bias = float(np.mean([r["measured"] - r["truth"] for r in small]))
    report = {
        "slides": len(small),
        "size": a.size,
        "coverage": round(coverage, 3),
        "mean_width": round(width, 2),
        "mean_error": round(bias, 2),
        "mean_tumour_cells": round(float(np.mean([r["tumour_cells"] for r in small])), 1),
    }
    if large:
        wide = float(np.mean([r["high"] - r["low"] for r in large]))
        report.update(
            large_slides=len(large),
            large_size=2 * a.size,
            large_coverage=round(float(np.mean([r["covered"] for r in large])), 3),
            large_mean_width=round(wide, 2),
            width_ratio_large_to_small=round(wide / width, 3),
        )
    print(
        f"coverage {coverage:.1%} of {len(small)} slides, mean width {width:.2f} points"
        + (
            f"; at 4x the area: width {report['large_mean_width']} (ratio {report['width_ratio_large_to_small']})"
            if large
            else ""
        )
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
