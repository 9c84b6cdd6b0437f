"""Speed and memory of the scoring pipeline on a large synthetic slide.

    python bench/pipeline.py                      # 40000² slide (≥ 1 gigapixel of tissue at 0.5 µm/px)
    python bench/pipeline.py --size 8192 8192 --profile hscore
    python bench/pipeline.py --slide my_slide.svs  # any slide instead of a synthetic one
    python bench/pipeline.py --set 'nuclei.method="fast"'  # any setting, as for score

Prints, from one run: the JPEG decode rate of the slide's own tiles (the
ceiling), each stage's MP/s of tiles per core, end-to-end MP/s of tissue
(tissue by the tissue mask; tiles with at least 1 % of it are scored, at the
edge of the tissue only around it)
and of tiles, a naive scikit-image watershed on a sample of the same tiles
and the ratios, and the peak RSS. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.proctree import descendants, status_mb
from config.settings import load_settings
from dicom_io import open_slide
from pipeline.analysis import SlideResult, analyse
from pipeline.slide import Slide
from pipeline.stains import StainMatrix, deconvolve


def _slide(args: argparse.Namespace) -> Path:
    if args.slide:
        return Path(args.slide)
    from adapter.synth import generate
    from pipeline.synth import SynthSpec

    spec = SynthSpec(width=args.size[0], height=args.size[1], seed=1)
    out = Path(args.workdir) / f"synth-{spec.width}x{spec.height}"
    path = out / f"synthetic-{spec.seed}.ome.tif"
    truth = out / "truth" / "truth.json"
    cached = truth.exists() and SynthSpec(**json.loads(truth.read_text())["spec"]) == spec
    if not (path.exists() and cached):
        print(f"generating {spec.width}x{spec.height} synthetic slide in {out} ...", flush=True)
        generate(spec, out, formats=("ome",), workers=args.workers)
    return path


def _decode_mps(path: Path, tiles: int) -> float | None:
    """Single-core decode rate of the slide's level-0 tiles (MP/s), in whatever
    compression a TIFF's tiles have; None for a DICOM series whose tiles are
    not JPEG baseline."""
    if path.is_dir() or path.suffix == ".dcm":
        return _dicom_decode_mps(path, tiles)
    import tifffile

    with tifffile.TiffFile(path) as tf:
        page = tf.series[0].levels[0].keyframe
        fh = tf.filehandle
        offsets, counts = page.dataoffsets, page.databytecounts
        raw = []
        for i in _middle_sample(len(offsets), tiles):
            fh.seek(offsets[i])
            raw.append(fh.read(counts[i]))
        t = time.perf_counter()
        pixels = 0
        for data in raw:
            out = page.decode(data, 0, jpegtables=page.jpegtables)[0]  # SVS tiles share their JPEG tables
            pixels += out.shape[-2] * out.shape[-3] if out.ndim >= 3 else out.size
    return pixels / 1e6 / (time.perf_counter() - t)


def _dicom_decode_mps(path: Path, tiles: int) -> float | None:
    """The same for the largest JPEG baseline instance of a DICOM WSI series
    (its frames are read one by one from the file, not all into memory)."""
    import imagecodecs
    import pydicom
    from pydicom.encaps import generate_frames
    from pydicom.uid import JPEGBaseline8Bit

    files = sorted(path.glob("*.dcm")) if path.is_dir() else [path]
    headers = [(pydicom.dcmread(f, stop_before_pixels=True), f) for f in files]
    levels = [(int(h.get("TotalPixelMatrixColumns", 0)), f) for h, f in headers if h.get("NumberOfFrames")]
    if not levels:
        return None
    largest = max(levels)[1]
    ds = pydicom.dcmread(largest, defer_size=1024)
    if ds.file_meta.TransferSyntaxUID != JPEGBaseline8Bit:
        return None
    n = int(ds.NumberOfFrames)
    wanted = set(_middle_sample(n, tiles).tolist())
    with largest.open("rb") as fh:
        fh.seek(ds.get_item("PixelData", keep_deferred=True).value_tell)
        raw = [frame for i, frame in enumerate(generate_frames(fh, number_of_frames=n)) if i in wanted]
    t = time.perf_counter()
    pixels = sum(imagecodecs.jpeg8_decode(data).shape[0] * int(ds.Columns) for data in raw)
    return pixels / 1e6 / (time.perf_counter() - t)


def _middle_sample(count: int, tiles: int) -> np.ndarray:
    """Up to ``tiles`` indices spread over the middle half of ``count`` tiles (tissue, not glass)."""
    return np.linspace(count // 4, 3 * count // 4, min(tiles, count)).astype(int)


def _baseline(path: Path, mpp: float, tiles: int, tile_size: int) -> float:
    """Naive scikit-image pipeline (threshold → distance → peaks → watershed) on sample tiles, MP/s/core."""
    from scipy import ndimage
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    stains = StainMatrix()
    with open_slide(path) as slide:
        grid = slide.grid(mpp, tile_size)
        cores = list(grid.cores())
        images = [slide.read_at_mpp(mpp, *cores[i])[0] for i in _middle_sample(len(cores), tiles)]
    t = time.perf_counter()
    pixels = 0
    for rgb in images:
        h = deconvolve(rgb, stains)[..., 0]
        fg = ndimage.gaussian_filter(h, 3) > 0.1
        dist = ndimage.distance_transform_edt(fg)
        peaks = peak_local_max(dist, min_distance=6, labels=ndimage.label(fg)[0])
        markers = np.zeros(fg.shape, np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        watershed(-dist, markers, mask=fg)
        pixels += rgb.shape[0] * rgb.shape[1]
    return pixels / 1e6 / (time.perf_counter() - t)


def _write_results(result: SlideResult, slide: Slide, mode: str, workdir: Path) -> tuple[float | None, float, str]:
    """Time writing the result objects (conversion of a non-DICOM source is not counted)."""
    import shutil
    import tempfile

    from dicom_io.convert import convert_to_dicom, identity_from_sidecar
    from dicom_io.results import write_results

    if mode == "none":
        return None, 0.0, ""
    out = Path(tempfile.mkdtemp(prefix="results-", dir=workdir))
    try:
        target = slide
        if mode == "dicom" and slide.format != "dicom":
            converted = workdir / f"{slide.path.parent.name}-{slide.path.stem}-dicom"
            if not converted.exists():
                print(f"converting {slide.path.name} to DICOM WSI for the results benchmark ...", flush=True)
                converted.mkdir(parents=True)
                convert_to_dicom(slide, converted, identity_from_sidecar(None, slide))
            target = open_slide(converted)
        t = time.perf_counter()
        written = write_results(result, target, out)
        seconds = time.perf_counter() - t
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        kinds = ", ".join(sorted(written.dicom) or sorted(written.ome))
        return seconds, rss, kinds
    finally:
        shutil.rmtree(out, ignore_errors=True)


class _WorkerPeakRss:
    """Largest peak RSS (VmHWM) of any descendant process, sampled from /proc.

    The pipeline's workers come from a fork server, so they are not this
    process' children and ``RUSAGE_CHILDREN`` does not see them.
    """

    def __init__(self, period_s: float = 0.25) -> None:
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period_s,), daemon=True)

    def __enter__(self) -> _WorkerPeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self, period_s: float) -> None:
        while not self._stop.wait(period_s):
            for pid in descendants(os.getpid()):
                self.peak_mb = max(self.peak_mb, status_mb(pid, "VmHWM"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, nargs=2, default=(40000, 40000))
    p.add_argument("--slide", help="benchmark this slide instead of a synthetic one")
    p.add_argument("--profile", default="ki67")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting, as for score")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--workdir", default="/tmp/ihc-adapter-bench")
    p.add_argument("--sample-tiles", type=int, default=64)
    p.add_argument(
        "--results",
        choices=("dicom", "native", "none"),
        default="dicom",
        help="time writing the results: DICOM set (a non-DICOM slide is converted first, untimed), "
        "the source's native set, or none",
    )
    a = p.parse_args()

    path = _slide(a)
    settings = load_settings(a.profile, [*a.set, f"tiling.workers={a.workers}"])
    mpp = settings.nuclei.requested_pixel_size_um
    decode = _decode_mps(path, 4 * a.sample_tiles)
    baseline = _baseline(path, mpp, a.sample_tiles, settings.tiling.tile_size)
    rss_before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    opener = functools.partial(open_slide, path)
    t = time.perf_counter()
    with opener() as slide, _WorkerPeakRss() as workers_rss:
        result = analyse(slide, settings, opener=opener, progress=sys.stderr.isatty())
        wall = time.perf_counter() - t
        write_s, write_rss_mb, objects = _write_results(result, slide, a.results, Path(a.workdir))
    tm = result.timings
    # End to end is per MP of tissue (by the tissue mask, within the scored
    # tiles), the target's measure. Stage rates are work rates, per MP of tiles
    # (their cores, margins excluded), like the decode and baseline rates they
    # are compared with: the baseline's tiles are from the middle of the slide.
    tissue_mpx, tiles_mpx = tm["tissue_mpx"], tm["tiles_mpx"]
    stages = {
        name: tiles_mpx / tm[f"tiles_{name}_cpu"] if tm[f"tiles_{name}_cpu"] > 0 else None
        for name in ("read", "deconvolution", "cells", "measure")
    }
    main_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child_mb = workers_rss.peak_mb
    e2e = tissue_mpx / wall
    print(f"slide              {path}")
    print(
        f"tissue             {tissue_mpx:.0f} MP at {mpp} µm/px in {tiles_mpx:.0f} MP of tiles,"
        f" {len(result.cells['x_um'])} cells"
    )
    if decode is None:
        print("JPEG decode        not measured (tiles are not JPEG baseline)")
    else:
        print(f"JPEG decode        {decode:.1f} MP/s per core (ceiling: {decode * a.workers:.1f} MP/s on {a.workers})")
    for name, mps in stages.items():
        print(f"stage {name:<13}{mps:.1f} MP/s of tiles per core" if mps else f"stage {name:<13}-")
    print(
        f"end to end         {e2e:.2f} MP/s of tissue on {a.workers} workers ({wall:.0f} s;"
        f" {tiles_mpx / wall:.2f} MP/s of tiles)"
    )
    print(f"baseline watershed {baseline:.2f} MP/s per core; cell stage / baseline = {stages['cells'] / baseline:.2f}")
    if write_s is not None:
        print(
            f"writing results    {write_s:.1f} s for {objects} = {100 * write_s / wall:.1f}% of the pipeline time;"
            f" RSS after writing {write_rss_mb:.0f} MB"
        )
    print(f"peak RSS           main {main_mb:.0f} MB, largest worker {child_mb:.0f} MB")
    print(
        json.dumps(
            {
                "slide": str(path),
                "profile": a.profile,
                "workers": a.workers,
                "tissue_mpx": round(tissue_mpx, 1),
                "tiles_mpx": round(tiles_mpx, 1),
                "cells": len(result.cells["x_um"]),
                "decode_mps": None if decode is None else round(decode, 2),
                "stage_mps_per_core": {k: round(v, 2) if v else None for k, v in stages.items()},
                "end_to_end_mps": round(e2e, 2),
                "end_to_end_tiles_mps": round(tiles_mpx / wall, 2),
                "baseline_mps": round(baseline, 2),
                "cells_vs_baseline": round(stages["cells"] / baseline, 2) if stages["cells"] else None,
                "end_to_end_tiles_vs_baseline_on_all_cores": round(tiles_mpx / wall / (baseline * a.workers), 2),
                "wall_s": round(wall, 1),
                "write_results_s": None if write_s is None else round(write_s, 2),
                "write_results_percent": None if write_s is None else round(100 * write_s / wall, 2),
                "write_results_objects": objects,
                "peak_rss_mb": round(max(main_mb, rss_before_mb), 1),
                "peak_rss_worker_mb": round(child_mb, 1),
                "peak_rss_total_bound_mb": round(main_mb + a.workers * child_mb, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
