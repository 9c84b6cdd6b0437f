"""The ``ihc-adapter`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from adapter import logs
from adapter.queue import JobState
from config.errors import ConfigError, IhcAdapterError

log = logging.getLogger(__name__)


def _format_info(d: dict[str, Any]) -> str:
    lines = [
        f"{d['path']}",
        f"  format      {d['format']}",
        f"  size        {d['width']} x {d['height']} px at {d['mpp']:.4f} µm/px "
        f"({d['width'] * d['mpp'] / 1000:.2f} x {d['height'] * d['mpp'] / 1000:.2f} mm)",
        "  levels",
    ]
    for lv in d["levels"]:
        lines.append(
            f"    [{lv['index']}] {lv['width']:>7} x {lv['height']:<7} {lv['mpp_x']:.4f} µm/px"
            f"  tile {lv['tile_width']}x{lv['tile_height']}  {lv['compression']}"
        )
    meta = dict(d["metadata"])
    warnings = meta.pop("warnings", [])
    if meta:
        lines.append("  identifiers")
        for key, value in meta.items():
            if value in (None, "", [], {}):
                continue
            lines.append(f"    {key:<24} {json.dumps(value, ensure_ascii=False)}")
    lines.extend(f"  WARNING: {w}" for w in warnings)
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    from dicom_io import open_slide

    source: Any = args.path[0] if len(args.path) == 1 else args.path
    with open_slide(source, mpp=args.mpp) as slide:
        described = slide.describe()
    if args.json:
        print(json.dumps(described, indent=2, ensure_ascii=False))
    else:
        print(_format_info(described))
    return 0


def _spec_from_args(args: argparse.Namespace) -> Any:
    from pipeline.synth import SynthSpec

    values: dict[str, Any] = {
        "width": args.size[0],
        "height": args.size[1],
        "mpp": args.mpp,
        "seed": args.seed,
        "localisation": args.localisation,
        "stain_jitter_deg": args.stain_jitter,
        "dab_scale_jitter": args.dab_jitter,
        "noise_sigma": args.noise,
        "jpeg_quality": args.jpeg_quality,
    }
    if args.tumour_fraction is not None:
        values["tumour_fraction"] = args.tumour_fraction
    elif args.low_tumour:
        values["tumour_fraction"] = 0.05
    if args.tumour_classes:
        values["tumour_classes"] = tuple(args.tumour_classes)
    for item in args.set or []:
        key, sep, text = item.partition("=")
        if not sep or key not in SynthSpec.model_fields:
            raise ConfigError("synth --set", item, f"give FIELD=VALUE with a field of {sorted(SynthSpec.model_fields)}")
        try:
            values[key] = json.loads(text)
        except json.JSONDecodeError:
            values[key] = text  # a bare word, as --set takes for score
    return SynthSpec(**values)


def cmd_synth(args: argparse.Namespace) -> int:
    from adapter.synth import generate

    spec = _spec_from_args(args)
    out = generate(spec, Path(args.out), formats=args.formats.split(","), workers=args.workers)
    t = out.truth
    print(f"wrote synthetic slide {spec.width}x{spec.height} px at {spec.mpp} µm/px to {out.out_dir}")
    for label, p in (("DICOM WSI", out.dicom_dir), ("OME-TIFF", out.ome_tiff), ("SVS", out.svs)):
        if p:
            print(f"  {label:<10} {p}")
    tum = t["compartments"]["tumour"]
    print(f"  truth      {out.truth_dir}")
    print(
        f"  expected   tumour fraction {t['tumour_fraction']:.3f}, tumour cells {tum['cells']}, "
        f"tumour H-score {tum['h_score'] if tum['h_score'] is None else round(tum['h_score'], 1)}"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Generate a sample DICOM slide, run the service on loopback, push the slide, print the result."""
    import socket
    import time

    from adapter.service import Service
    from adapter.synth import generate
    from config.service import ServiceConfig
    from dicom_io import open_slide
    from dicom_io.dimse import Peer, send_files
    from pipeline.synth import SynthSpec

    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ihc-adapter-demo-"))
    spec = SynthSpec(width=2048, height=2048, seed=7)
    print(f"ihc-adapter demo in {out_dir}")
    print(f"1. generating a {spec.width}x{spec.height} synthetic Ki-67-like slide (DICOM WSI, OME-TIFF, SVS)")
    slide = generate(spec, out_dir / "slide")
    assert slide.dicom_dir is not None
    with open_slide(slide.dicom_dir) as s:
        print(_format_info(s.describe()))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    config = ServiceConfig(
        paths={"spool": out_dir / "spool", "output": out_dir / "results"},
        scoring={"profile": "ki67"},
        scp={
            "host": "127.0.0.1",
            "port": port,
            "ae_title": "IHC_ADAPTER",
            "series_quiet_seconds": 1.0,
            "min_free_disk_mb": 64,
        },
        service={"poll_seconds": 0.2},
    )
    print(f"2. starting the service on 127.0.0.1:{port} (AE IHC_ADAPTER, spool {config.paths.spool})")
    service = Service(config)
    service.start()
    try:
        files = sorted(slide.dicom_dir.glob("*.dcm"))
        print(f"3. pushing {len(files)} instances by C-STORE")
        results = send_files(files, Peer("127.0.0.1", port, "IHC_ADAPTER"), calling_ae="DEMO_SCANNER")
        print(f"   {sum(r.ok for r in results)}/{len(results)} acknowledged")
        print("4. waiting for the series to complete and be scored ...")
        deadline = time.monotonic() + 600
        while not (service.queue.jobs("done") or service.queue.jobs("failed") or service.queue.jobs("quarantined")):
            if time.monotonic() > deadline:
                print("ihc-adapter: error: the demo slide was not scored in 10 minutes", file=sys.stderr)
                return 1
            time.sleep(0.5)
        job = service.queue.jobs()[0]
    finally:
        service.stop()
    if job.state != "done":
        print(f"ihc-adapter: error: job {job.id} {job.state}: {job.reason}", file=sys.stderr)
        return 1
    result = json.loads((Path(str(job.result_dir)) / "result.json").read_text())
    tumour = result["compartments"]["tumour"]
    truth = slide.truth["compartments"]["tumour"]
    print(f"5. job {job.id} done: profile {result['profile']}, tumour fraction {100 * result['tumour_fraction']:.1f}%")
    print(
        f"   tumour cells {tumour['cells']}, Ki-67 index {result['scores']['ki67_index_percent']:.1f}%, "
        f"H-score {tumour['h_score']:.1f}"
    )
    print(
        f"   ground truth: tumour fraction {100 * slide.truth['tumour_fraction']:.1f}%, {truth['cells']} tumour cells, "
        f"Ki-67 index {truth['positive_percent']:.1f}%, H-score {truth['h_score']:.1f}"
    )
    alerts = ", ".join(f"{a['code']} ({a['message']})" for a in result["alerts"]) or "none"
    print(f"   alerts: {alerts}")
    print(f"   results: {Path(str(job.result_dir)) / 'result.json'}")
    for kind, paths in result["outputs"].items():
        if isinstance(paths, list):
            print(f"   DICOM {kind:<9} {Path(paths[0]).parent}")
        else:
            print(f"   {kind:<15} {paths}")
    return 0


def _summary(result: Any) -> str:
    lines = [f"{result.slide['path']}  profile {result.profile}  (segmentation: {result.compartments.method})"]
    lines.append(f"  tumour fraction of tissue  {100 * result.tumour_fraction:.1f}%")
    for name, st in result.compartment_stats.items():
        hs = "-" if st["h_score"] is None else f"{st['h_score']:.1f}"
        pp = "-" if st["positive_percent"] is None else f"{st['positive_percent']:.1f}%"
        lines.append(
            f"  {name:<7} {st['cells']:>8} cells  neg {st['negative']:>7}  1+ {st['1+']:>7}  2+ {st['2+']:>7}"
            f"  3+ {st['3+']:>7}  H-score {hs:>6}  positive {pp:>6}  area {st['area_mm2']:.2f} mm²"
        )
    intervals = result.uncertainty.intervals if result.uncertainty else {}
    for key, value in result.scores.items():
        if key not in ("h_score", "positive_percent"):
            ci = f"  (95 % interval {intervals[key][0]:.1f}–{intervals[key][1]:.1f})" if key in intervals else ""
            lines.append(f"  {key:<26} {json.dumps(value)}{ci}")
    if "tumour.h_score" in intervals:
        low, high = intervals["tumour.h_score"]
        lines.append(f"  {'tumour H-score interval':<26} {low:.1f}–{high:.1f}")
    if result.uncertainty and result.uncertainty.near_threshold_percent is not None:
        near = result.uncertainty.near_threshold_percent
        lines.append(f"  {'near a class threshold':<26} {near:.1f}% of tumour cells")
    for kind, qc in result.qc.items():
        lines.append(
            f"  {'left out by QC: ' + kind:<26} {qc['area_mm2']:.3f} mm² ({qc['percent_of_tissue']:.1f}% of tissue)"
        )
    for e in result.explanations:
        lines.append(
            f"  {e.model + ' model attributions':<26} r = {e.dab_correlation:.2f} with DAB OD, "
            f"{e.hematoxylin_correlation:.2f} with haematoxylin OD ({len(e.tiles)} tiles, integrated gradients)"
        )
    if result.alerts:
        lines.append("  ALERTS (verify by a pathologist):")
        lines.extend(f"    {a['code']}: {a['message']}" for a in result.alerts)
    else:
        lines.append("  no alerts")
    return "\n".join(lines)


def _converted(slide: Any, out: Path, sidecar: str | None) -> Any:
    """Convert a non-DICOM slide into ``out/source-dicom`` and open it."""
    from dicom_io import open_slide
    from dicom_io.convert import convert_to_dicom, identity_from_sidecar

    folder = out / "source-dicom"
    folder.mkdir(parents=True, exist_ok=True)
    convert_to_dicom(slide, folder, identity_from_sidecar(Path(sidecar) if sidecar else None, slide))
    return open_slide(folder)


def cmd_convert(args: argparse.Namespace) -> int:
    from dicom_io import open_slide
    from dicom_io.convert import convert_to_dicom, identity_from_sidecar

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open_slide(args.slide, mpp=args.mpp) as slide:
        identity = identity_from_sidecar(Path(args.sidecar) if args.sidecar else None, slide)
        files = convert_to_dicom(slide, out, identity, quality=args.jpeg_quality)
    print(f"wrote {len(files)} DICOM WSI instance(s) to {out}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    import functools

    from config.settings import load_settings
    from dicom_io import open_slide
    from pipeline.analysis import analyse

    overrides = []
    if args.qupath:
        from config.qupath import qupath_overrides

        overrides += qupath_overrides(args.qupath)
    overrides += list(args.set or [])
    if args.workers is not None:
        overrides.append(f"tiling.workers={args.workers}")
    settings = load_settings(args.profile, overrides)
    if args.qupath and settings.stain.background == "auto":
        # QuPath's white level belongs to the image, not to the protocol (config.qupath).
        print(
            "ihc-adapter: note: --qupath: the white level is the slide's glass (stain.background auto); "
            "QuPath's default H-DAB stains use 255 — add --set stain.background=255 for QuPath's numbers",
            file=sys.stderr,
        )
    source: Any = args.slide[0] if len(args.slide) == 1 else args.slide
    opener = functools.partial(open_slide, source, args.mpp)
    with opener() as slide:
        result = analyse(slide, settings, opener=opener, progress=sys.stderr.isatty())
        written = None
        if args.out:
            from dicom_io.results import write_results

            target = slide
            if args.dicom and slide.format != "dicom":
                target = _converted(slide, Path(args.out), args.sidecar)
            written = write_results(result, target, Path(args.out))
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_json(), indent=2, ensure_ascii=False))
    print(_summary(result))
    if written is not None:
        print(f"  results    {written.json}")
        for kind, paths in written.dicom.items():
            print(f"  DICOM {kind:<4} {len(paths)} file(s) in {paths[0].parent}")
        for kind, path in written.ome.items():
            print(f"  {kind:<10} {path}")
    return 0


def _service_config(args: argparse.Namespace) -> Any:
    from config.service import load_service_config

    return load_service_config(Path(args.config) if args.config else None)


def cmd_serve(args: argparse.Namespace) -> int:
    from adapter.service import Service

    config = _service_config(args)
    logs.configure(logging.DEBUG if args.verbose else logging.INFO, config.service.log_format)
    Service(config).run_forever()
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    config = _service_config(args)
    print(json.dumps(config.model_dump(mode="json"), indent=2))
    from config.settings import load_settings

    load_settings(config.scoring.profile, list(config.scoring.overrides))
    print(f"{args.config or 'environment'}: configuration is valid", file=sys.stderr)
    return 0


def cmd_config_reference(args: argparse.Namespace) -> int:
    from config.reference import reference

    sys.stdout.write(reference())
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from adapter.queue import JobQueue

    config = _service_config(args)
    queue = JobQueue(config.paths.database)
    for job in queue.jobs(args.state):
        deliveries = queue.delivery_states(job.id)
        sent = f" delivered {deliveries.get('sent', 0)}/{sum(deliveries.values())}" if deliveries else ""
        if deliveries.get("rejected"):
            sent += f" rejected {deliveries['rejected']}"
        reason = f"  ({job.reason})" if job.reason else ""
        print(f"{job.id:>6} {job.state:<11} {job.kind:<5} attempts {job.attempts}{sent}  {job.source_key}{reason}")
    print(" ".join(f"{k}={v}" for k, v in queue.counts().items()))
    return 0


def cmd_jobs_purge(args: argparse.Namespace) -> int:
    """Delete received series and results of finished jobs (``retention.keep_days`` or --older-than-days)."""
    from adapter.service import Service

    config = _service_config(args)
    days = args.older_than_days if args.older_than_days is not None else config.retention.keep_days
    if days is None:
        print("ihc-adapter: error: give --older-than-days or set retention.keep_days", file=sys.stderr)
        return 2
    service = Service(config)
    try:
        purged = service.purge(days, dry_run=args.dry_run)
    finally:
        service.queue.close()
    verb = "would purge" if args.dry_run else "purged"
    for job in purged:
        print(f"{verb} job {job.id} ({job.state}, {job.source_key})")
    print(f"{verb} {len(purged)} job(s) older than {days:g} day(s)")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    from adapter.queue import JobQueue

    job = JobQueue(_service_config(args).paths.database).retry(args.job)
    print(f"job {job.id} queued again")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ihc-adapter", description="Hands-free IHC scoring for DICOM/OME slides.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="print a slide's format, levels and identifiers")
    info.add_argument("path", nargs="+", help="slide file, DICOM folder, or DICOM instances of one series")
    info.add_argument("--mpp", type=float, help="µm/px of the finest level, for files that lack it")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=cmd_info)

    synth = sub.add_parser("synth", help="generate a synthetic IHC slide with ground truth")
    synth.add_argument("out", help="output folder")
    synth.add_argument("--size", type=int, nargs=2, metavar=("W", "H"), default=(2048, 2048))
    synth.add_argument("--mpp", type=float, default=0.5)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--tumour-fraction", type=float, help="tumour area / tissue area (default 0.4)")
    synth.add_argument("--low-tumour", action="store_true", help="tumour 5%% of tissue (below the 10%% alert)")
    synth.add_argument("--localisation", choices=("nuclear", "cytoplasmic", "membranous"), default="nuclear")
    synth.add_argument("--tumour-classes", type=float, nargs=4, metavar=("NEG", "1+", "2+", "3+"))
    synth.add_argument("--stain-jitter", type=float, default=0.0, help="degrees of random stain-vector rotation")
    synth.add_argument("--dab-jitter", type=float, default=0.0, help="random ± fraction of DAB strength")
    synth.add_argument("--noise", type=float, default=2.0, help="sensor noise sigma (8-bit units)")
    synth.add_argument("--jpeg-quality", type=int, default=90)
    synth.add_argument("--formats", default="dicom,ome,svs", help="comma-separated: dicom,ome,svs")
    synth.add_argument("--workers", type=int, help="render processes (default: up to 2)")
    synth.add_argument(
        "--set",
        action="append",
        metavar="FIELD=VALUE",
        help="any generator field (JSON value), e.g. bubbles=3, debris=12, folds=2, overexposed=2, "
        "pen_strokes=3, blur_patches=2, counterstain_scale=0.5",
    )
    synth.set_defaults(func=cmd_synth)

    score = sub.add_parser("score", help="score a slide with a stain profile")
    score.add_argument("slide", nargs="+", help="slide file, DICOM folder, or DICOM instances of one series")
    score.add_argument("--profile", default="hscore", help="hscore, ki67, er, pr, her2, pdl1, or a .toml file")
    score.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a setting, e.g. nuclei.threshold=0.2"
    )
    score.add_argument(
        "--qupath",
        metavar="PARAMS",
        help="a QuPath Positive cell detection protocol (its runPlugin line or JSON parameters) to run with "
        "QuPath's detector; --set applies after it",
    )
    score.add_argument("--json", metavar="OUT.json", help="write the full result as JSON")
    score.add_argument("--out", metavar="DIR", help="write results: DICOM SEG/SR/annotations/KOS or OME-TIFF + CSV")
    score.add_argument(
        "--dicom", action="store_true", help="for a non-DICOM slide: convert it to DICOM WSI and write DICOM results"
    )
    score.add_argument("--sidecar", help="JSON/TOML with patient/study/specimen identifiers for --dicom")
    score.add_argument("--mpp", type=float, help="µm/px of the finest level, for files that lack it")
    score.add_argument("--workers", type=int, help="tile processes (default: all cores)")
    score.set_defaults(func=cmd_score)

    convert = sub.add_parser("convert", help="convert a slide to a DICOM WSI series")
    convert.add_argument("slide")
    convert.add_argument("out", help="output folder")
    convert.add_argument("--sidecar", help="JSON/TOML with patient/study/specimen identifiers")
    convert.add_argument("--mpp", type=float, help="µm/px of the finest level, for files that lack it")
    convert.add_argument("--jpeg-quality", type=int, default=90)
    convert.set_defaults(func=cmd_convert)

    serve = sub.add_parser("serve", help="run the hands-free service (C-STORE listener, folder watch, queue)")
    serve.add_argument("--config", help="adapter.toml (environment IHC_ADAPTER__SECTION__KEY overrides)")
    serve.set_defaults(func=cmd_serve)
    cfg = sub.add_parser("config", help="service configuration")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    check = cfg_sub.add_parser("check", help="validate a configuration file and print the result")
    check.add_argument("config", nargs="?")
    check.set_defaults(func=cmd_config_check)
    ref = cfg_sub.add_parser("reference", help="print the configuration reference (docs/configuration.md)")
    ref.set_defaults(func=cmd_config_reference)
    jobs = sub.add_parser("jobs", help="list jobs with their states and reasons; 'jobs purge' deletes old files")
    jobs.add_argument("--config")
    jobs.add_argument("--state", choices=[str(s) for s in JobState])
    jobs.set_defaults(func=cmd_jobs)
    jobs_sub = jobs.add_subparsers(dest="jobs_command")
    purge = jobs_sub.add_parser(
        "purge", help="delete received series and results of jobs that ended long enough ago (the jobs stay listed)"
    )
    purge.add_argument("--config")
    purge.add_argument("--older-than-days", type=float, help="default: retention.keep_days")
    purge.add_argument("--dry-run", action="store_true", help="list what would be deleted")
    purge.set_defaults(func=cmd_jobs_purge)
    retry = sub.add_parser("retry", help="queue a finished (failed, quarantined, superseded or done) job again")
    retry.add_argument("job", type=int)
    retry.add_argument("--config")
    retry.set_defaults(func=cmd_retry)

    demo = sub.add_parser("demo", help="generate a sample slide and show what the adapter reads from it")
    demo.add_argument("--out", help="output folder (default: a new temporary folder)")
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet = logging.INFO if args.command == "serve" else logging.WARNING  # the service logs its events
    logs.configure(logging.DEBUG if args.verbose else quiet)
    try:
        return int(args.func(args))
    except IhcAdapterError as exc:
        print(f"ihc-adapter: error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        print(f"ihc-adapter: error: invalid parameter: {problems}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
