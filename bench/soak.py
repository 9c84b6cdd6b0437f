"""Soak test of ``ihc-adapter serve``: push N slides by C-STORE, watch memory, count losses.

    python bench/soak.py --slides 50 [--size 1024]
    python bench/soak.py --hours 3 --interval-s 5     # a long, paced soak

Starts the service as a subprocess on loopback (its own spool in a temporary
folder), pushes copies of a synthetic slide, each under new Study/Series/
SOP Instance UIDs, with the project's own SCU, waits until every series is
scored, and reads from /proc the resident memory of the service and its tile
workers together. With ``--hours`` it pushes until that much time has passed
(one slide every ``--interval-s`` seconds, never more than ``--max-pending``
unscored), so the service runs for hours at a realistic rate; a line of
progress (slides, RSS) goes to stderr every ``--report-every`` slides and into
``rss.csv`` beside the service log.
The last line is one JSON object: slides, slides_per_hour, rss_start_mb,
rss_end_mb, rss_max_mb, lost (series pushed but never scored), duplicated
(series scored more than once).
"""

from __future__ import annotations

import argparse
import json
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapter.synth import generate
from bench.proctree import tree_rss_mb
from dicom_io.dimse import Peer, send_files
from pipeline.synth import SynthSpec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _copy_with_new_uids(src: list[Path], dst: Path) -> list[Path]:
    dst.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out = []
    for path in src:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        target = dst / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(target)
        out.append(target)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--slides", type=int, default=20)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--hours", type=float, default=None, help="push until this much time has passed")
    p.add_argument("--interval-s", type=float, default=0.0, help="pause between pushes")
    p.add_argument("--max-pending", type=int, default=8, help="pushed but not yet scored, at most")
    p.add_argument("--report-every", type=int, default=50)
    p.add_argument("--workers", type=int, default=0, help="scoring.workers of the service (0 = all cores, its default)")
    p.add_argument("--timeout-s", type=float, default=3600, help="wait for the last slides at most this long")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ihc-soak-"))
    slide = generate(SynthSpec(width=a.size, height=a.size, seed=5, tile_size=256), work / "slide", formats=("dicom",))
    assert slide.dicom_dir is not None
    source = sorted(slide.dicom_dir.glob("*.dcm"))
    port = _free_port()
    cfg = work / "adapter.toml"
    cfg.write_text(
        f'[paths]\nspool = "{work / "spool"}"\noutput = "{work / "out"}"\n'
        f'[scoring]\nprofile = "ki67"\nworkers = {a.workers}\n'
        f'[scp]\nhost = "127.0.0.1"\nport = {port}\nseries_quiet_seconds = 1.0\nmin_free_disk_mb = 64\n'
        f"[service]\npoll_seconds = 0.2\n"
    )
    log = (work / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "adapter.cli", "serve", "--config", str(cfg)], stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 60
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            if time.monotonic() > deadline:
                raise SystemExit("service did not start")
            time.sleep(0.2)
        rss_start = rss_max = tree_rss_mb(proc.pid)
        series: list[str] = []
        db = work / "spool" / "jobs.db"
        samples = (work / "rss.csv").open("w")
        samples.write("seconds,slides_pushed,slides_finished,rss_mb\n")
        t0 = time.monotonic()

        def finished() -> tuple[int, list[tuple[str, str, int]]]:
            if not db.exists():
                return 0, []
            with sqlite3.connect(db) as con:
                rows = con.execute("SELECT source_key, state, attempts FROM jobs").fetchall()
            return sum(1 for _, s, _ in rows if s in ("done", "failed", "quarantined")), rows

        i = 0
        while (i < a.slides) if a.hours is None else (time.monotonic() - t0 < a.hours * 3600):
            while len(series) - finished()[0] >= a.max_pending:
                time.sleep(0.2)
            files = _copy_with_new_uids(source, work / "push" / str(i))
            series.append(str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID))
            results = send_files(files, Peer("127.0.0.1", port, "IHC_ADAPTER"))
            assert all(r.ok for r in results)
            for f in files:  # the service holds its own durable copy now
                f.unlink()
            i += 1
            if i % a.report_every == 0:
                rss = tree_rss_mb(proc.pid)
                rss_max = max(rss_max, rss)
                n_finished = finished()[0]
                seconds = time.monotonic() - t0
                samples.write(f"{seconds:.0f},{i},{n_finished},{rss:.1f}\n")
                samples.flush()
                print(f"{seconds:8.0f} s  pushed {i}  finished {n_finished}  RSS {rss:.0f} MB", file=sys.stderr)
            time.sleep(a.interval_s)
        drain_deadline = time.monotonic() + a.timeout_s
        while True:
            n_finished, rows = finished()
            if n_finished >= len(series) or time.monotonic() > drain_deadline:
                break
            time.sleep(0.5)
        elapsed = time.monotonic() - t0
        rss_end = tree_rss_mb(proc.pid)
        rss_max = max(rss_max, rss_end)
        samples.close()
    finally:
        proc.terminate()
        proc.wait(60)
        print(f"work folder: {work}", file=sys.stderr)
    done = {k.split(":", 1)[1] for k, s, _ in rows if s == "done"}
    lost = sum(1 for uid in series if uid not in done)
    duplicated = sum(1 for _, _, attempts in rows if attempts > 1)
    print(
        json.dumps(
            {
                "slides": len(series),
                "slide_px": a.size,
                "seconds": round(elapsed, 1),
                "slides_per_hour": round(3600 * len(done) / elapsed, 1),
                "rss_start_mb": round(rss_start, 1),
                "rss_end_mb": round(rss_end, 1),
                "rss_max_mb": round(rss_max, 1),
                "lost": lost,
                "duplicated": duplicated,
            }
        )
    )


if __name__ == "__main__":
    main()
