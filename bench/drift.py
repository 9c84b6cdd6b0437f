"""How far a real slide's Ki-67 index moves under the colour differences between scanners.

    python bench/drift.py                       # ../shared/data/OS-2-vsi.ome.tif
    python bench/drift.py --slide my_ki67.ome.tif --profile ki67

No second scanner's copy of a slide is at hand, so its colour differences are simulated on the
real one (:mod:`pipeline.synth.scanner`): white balance (per-channel gains ±6 %), tone curve
(gamma 0.85 and 1.15), colour saturation (±15 %), slightly softer optics (Gaussian σ 0.5 px)
and all of them together. Each
copy is written losslessly (deflate) at the slide's µm/px and scored with the profile's
defaults, then again with per-slide stain estimation (``stain.estimate = true``). Prints each
copy's index and, per mode, the spread (largest minus smallest, original included) and the
standard deviation; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config.settings import load_settings
from dicom_io import open_slide
from dicom_io.tiff_writer import write_rgb_ome_tiff
from pipeline.analysis import analyse
from pipeline.synth.scanner import SCANNER_DIFFERENCES, apply


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = Path(__file__).resolve().parents[1]
    p.add_argument("--slide", default=str(here.parent / "shared" / "data" / "OS-2-vsi.ome.tif"))
    p.add_argument("--profile", default="ki67")
    p.add_argument("--score", default="ki67_index_percent", help="the result's score to compare")
    args = p.parse_args()
    with open_slide(args.slide) as slide:
        level = slide.levels[0]
        pixels = slide.read_region(0, 0, 0, level.width, level.height)
        mpp = level.mpp_x
    modes = {"defaults": ["tiling.workers=1"], "stain estimation": ["tiling.workers=1", "stain.estimate=true"]}
    scores: dict[str, dict[str, float]] = {mode: {} for mode in modes}
    with tempfile.TemporaryDirectory() as tmp:
        copies = {"original": write_rgb_ome_tiff(pixels, mpp, Path(tmp) / "original.ome.tif")}
        for i, (name, transform) in enumerate(SCANNER_DIFFERENCES.items()):
            copies[name] = write_rgb_ome_tiff(apply(transform, pixels), mpp, Path(tmp) / f"copy{i}.ome.tif")
        for mode, overrides in modes.items():
            settings = load_settings(args.profile, overrides)
            for name, path in copies.items():
                with open_slide(path) as copy:
                    scores[mode][name] = float(analyse(copy, settings).scores[args.score])
                print(f"{mode:<17} {name:<22} {args.score} {scores[mode][name]:.2f}", flush=True)
    summary: dict[str, object] = {"slide": args.slide, "profile": args.profile, "score": args.score}
    for mode, values in scores.items():
        v = np.array(list(values.values()))
        key = mode.replace(" ", "_")
        summary[f"{key}_spread"] = round(float(v.max() - v.min()), 2)
        summary[f"{key}_sd"] = round(float(v.std(ddof=1)), 2)
        summary[f"{key}_scores"] = {k: round(x, 2) for k, x in values.items()}
        print(f"{mode}: spread {v.max() - v.min():.2f} points, SD {v.std(ddof=1):.2f}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
