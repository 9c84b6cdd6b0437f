"""Peak memory and speed of writing a large synthetic slide.

    python bench/synth_memory.py --size 40000 40000 --formats dicom

The last line printed is one JSON object: size, seconds, megapixels/s,
peak RSS of the main process and of the largest render worker (MB), and the
sum of the two plus workers as an upper bound of the whole job.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapter.synth import generate
from pipeline.synth import SynthSpec


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, nargs=2, default=(8192, 8192))
    p.add_argument("--formats", default="dicom")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", help="keep the output here (default: temporary, removed)")
    a = p.parse_args()
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="bench-synth-"))
    spec = SynthSpec(width=a.size[0], height=a.size[1], seed=1)
    t0 = time.perf_counter()
    result = generate(spec, out, formats=a.formats.split(","), workers=a.workers)
    seconds = time.perf_counter() - t0
    self_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    size_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    mpx = spec.width * spec.height / 1e6
    if not a.out:
        shutil.rmtree(out, ignore_errors=True)
    print(
        json.dumps(
            {
                "width": spec.width,
                "height": spec.height,
                "formats": a.formats,
                "workers": a.workers,
                "seconds": round(seconds, 1),
                "mpx_per_s": round(mpx / seconds, 2),
                "output_mb": round(size_mb, 1),
                "tumour_cells": result.truth["compartments"]["tumour"]["cells"],
                "peak_rss_main_mb": round(self_mb, 1),
                "peak_rss_worker_mb": round(child_mb, 1),
                "peak_rss_total_bound_mb": round(self_mb + a.workers * child_mb, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
