"""DICOM Storage SCP: receive slides by C-STORE, durably, and notice complete series.

Every object is received chunked to disk (pynetdicom's
``STORE_RECV_CHUNKED_DATASET``), copied into the spool under
``spool/incoming/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` through a
``.part`` file that is fsynced and atomically renamed, and only then is
success returned: an acknowledged object is on disk.

DICOM has no end-of-series message. A series is complete when no object for
it arrived for ``series_quiet_seconds`` *and* no association that delivered
to it is still open; the timer is re-armed by every C-STORE. Then its headers
are checked (``confirm_series``): a concatenation with instances missing, or
resampled levels without their ORIGINAL base level, keep it waiting for more
(up to ``series_max_wait_seconds`` of silence, then it is handed over anyway).
A late instance for a series already handed over hands it over again (the
queue turns that into a re-score, not a duplicate).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt

from config.service import ScpConfig
from dicom_io.wsi_reader import WSI_SOP_CLASS, series_gaps

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
SeriesCallback = Callable[[str, Path], None]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_copy(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` via ``dst.part``, fsync, rename, fsync the folder."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    part = dst.with_name(dst.name + ".part")
    with src.open("rb") as fin, part.open("wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())
    os.replace(part, dst)
    fsync_dir(dst.parent)


@dataclass
class _Series:
    folder: Path
    last_store: float
    associations: set[int] = field(default_factory=set)
    instances: int = 0
    handed_over: bool = False
    checked_store: float = -1.0  # last_store when its headers were last checked


class StorageSCP:
    """The listener; start with :meth:`start`, stop with :meth:`stop`."""

    def __init__(self, config: ScpConfig, spool: Path, on_series_complete: SeriesCallback):
        self.config = config
        self.incoming = spool / "incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.on_series_complete = on_series_complete
        self._series: dict[str, _Series] = {}
        self._open: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server: Any = None
        self._timer: threading.Thread | None = None
        self.bytes_received = 0
        self.objects_received = 0

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        _config.STORE_RECV_CHUNKED_DATASET = True
        ae = AE(ae_title=self.config.ae_title)
        ae.maximum_pdu_size = self.config.max_pdu
        ae.require_calling_aet = list(self.config.allowed_calling_aes)
        ae.add_supported_context(VERIFICATION)
        if self.config.accept_other_storage:
            for cx in AllStoragePresentationContexts:
                if cx.abstract_syntax is not None:
                    ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        else:
            ae.add_supported_context(WSI_SOP_CLASS, ALL_TRANSFER_SYNTAXES)
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, lambda event: 0x0000),
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_ESTABLISHED, self._opened),
            (evt.EVT_RELEASED, self._closed),
            (evt.EVT_ABORTED, self._closed),
            (evt.EVT_CONN_CLOSE, self._closed),
        ]
        tls = None
        if self.config.tls is not None:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(str(self.config.tls.certificate), str(self.config.tls.key))
            if self.config.tls.ca is not None:
                tls.load_verify_locations(str(self.config.tls.ca))
                tls.verify_mode = ssl.CERT_REQUIRED
        self._server = ae.start_server(
            (self.config.host, self.config.port), block=False, evt_handlers=handlers, ssl_context=tls
        )
        self._timer = threading.Thread(target=self._watch_series, name="series-timer", daemon=True)
        self._timer.start()
        log.info("storage SCP %s listening on %s:%d", self.config.ae_title, self.config.host, self.config.port)

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        if self._timer is not None:
            self._timer.join(5)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1]) if self._server is not None else self.config.port

    # -- handlers (run in association threads) -------------------------------------
    def _opened(self, event: Any) -> None:
        with self._lock:
            self._open.add(id(event.assoc))

    def _closed(self, event: Any) -> None:
        with self._lock:
            self._open.discard(id(event.assoc))

    def _handle_store(self, event: Any) -> int:
        try:
            tmp = Path(event.dataset_path)
            ds = pydicom.dcmread(tmp, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "SOPInstanceUID"])
            series_uid, sop_uid = str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
            if not (_UID.match(series_uid) and _UID.match(sop_uid)):
                log.warning("refusing object with malformed UIDs from %s", event.assoc.requestor.ae_title)
                return 0xC000
            folder = self.incoming / series_uid
            durable_copy(tmp, folder / f"{sop_uid}.dcm")
        except Exception:
            log.exception("C-STORE could not be stored")
            return 0xA700  # out of resources: the sender keeps the object and may retry
        size = (folder / f"{sop_uid}.dcm").stat().st_size
        with self._lock:
            state = self._series.setdefault(series_uid, _Series(folder=folder, last_store=time.monotonic()))
            state.last_store = time.monotonic()
            state.associations.add(id(event.assoc))
            state.instances += 1
            if state.handed_over:
                log.info("late instance for series %s: it will be re-scored", series_uid)
                state.handed_over = False
            self.bytes_received += size
            self.objects_received += 1
        return 0x0000

    # -- completeness ----------------------------------------------------------------
    def _watch_series(self) -> None:
        while not self._stop.wait(0.2):
            due: list[tuple[str, Path]] = []
            to_check: list[tuple[str, Path, float]] = []
            now = time.monotonic()
            with self._lock:
                for uid, s in list(self._series.items()):
                    quiet = now - s.last_store >= self.config.series_quiet_seconds
                    busy = bool(s.associations & self._open)
                    if not s.handed_over and quiet and not busy:
                        if s.checked_store != s.last_store:
                            to_check.append((uid, s.folder, s.last_store))
                        elif now - s.last_store >= self.config.series_max_wait_seconds:
                            log.warning("event=series_incomplete series=%s waited=%.0fs", uid, now - s.last_store)
                            s.handed_over = True
                            due.append((uid, s.folder))
                    elif s.handed_over and now - s.last_store > 10 * self.config.series_quiet_seconds:
                        # Forget it; a later instance starts a new entry and a re-score.
                        del self._series[uid]
            for uid, folder, stamp in to_check:
                # Header reads, outside the lock: stores go on meanwhile.
                gaps = series_gaps(folder.glob("*.dcm")) if self.config.confirm_series else []
                with self._lock:
                    s = self._series[uid]
                    if s.last_store != stamp or s.handed_over:
                        continue  # more arrived meanwhile: look again when it is quiet
                    s.checked_store = stamp
                    if gaps:
                        log.info("event=series_waiting series=%s gaps=%s", uid, "; ".join(gaps))
                        continue
                    s.handed_over = True
                    due.append((uid, folder))
            for uid, folder in due:
                try:
                    self.on_series_complete(uid, folder)
                except Exception:
                    log.exception("handing over series %s failed", uid)
                    with self._lock:
                        self._series[uid].handed_over = False
