"""Folder watch: pick up slides dropped into folders, once each file has settled.

A file is settled when its size and modification time have not changed for
``settle_seconds``; temporary names (``*.part``, dot files, …) are ignored.
OME-TIFF / SVS / TIFF files are one slide each (any other file becomes a job
too, and is quarantined with its reason). DICOM files are grouped by
Series Instance UID, copied durably into the spool, and the series is handed
over when none of its files changed for ``settle_seconds`` (a series copied
file by file arrives over time). Files already there at start-up are found
by an initial scan.
"""

from __future__ import annotations

import fnmatch
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from adapter.scp import durable_copy
from config.service import WatchConfig
from dicom_io.sniff import is_dicom_file

log = logging.getLogger(__name__)


@dataclass
class _Seen:
    size: int
    mtime: float
    stable_since: float


class FolderWatcher(FileSystemEventHandler):
    """Calls ``on_file(path)`` for settled slide files and ``on_series(uid, folder, sources)`` for DICOM series."""

    def __init__(
        self,
        config: WatchConfig,
        spool: Path,
        on_file: Callable[[Path], None],
        on_series: Callable[[str, Path, list[Path]], None],
    ):
        self.config = config
        self.incoming = spool / "incoming"
        self.on_file = on_file
        self.on_series = on_series
        self._candidates: dict[Path, _Seen] = {}
        self._handled: dict[Path, tuple[int, float]] = {}
        self._series: dict[str, tuple[float, list[Path]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._observer: Observer | None = None  # type: ignore[valid-type]
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        observer = Observer()
        for folder in self.config.folders:
            folder.mkdir(parents=True, exist_ok=True)
            observer.schedule(self, str(folder), recursive=True)
        observer.start()
        self._observer = observer
        for folder in self.config.folders:  # files already there
            for path in folder.rglob("*"):
                self._note(path)
        self._thread = threading.Thread(target=self._loop, name="folder-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(5)
        if self._thread is not None:
            self._thread.join(5)

    # watchdog callbacks (observer thread)
    def on_created(self, event: FileSystemEvent) -> None:
        self._note(Path(str(event.src_path)))

    def on_modified(self, event: FileSystemEvent) -> None:
        self._note(Path(str(event.src_path)))

    def on_moved(self, event: FileSystemEvent) -> None:
        self._note(Path(str(event.dest_path)))

    def _ignored(self, path: Path) -> bool:
        if self.config.done_folder is not None and self.config.done_folder in path.parents:
            return True
        return any(fnmatch.fnmatch(path.name, pattern) for pattern in self.config.ignore)

    def _note(self, path: Path) -> None:
        if self._ignored(path):
            return
        with self._lock:
            self._candidates.setdefault(path, _Seen(-1, -1.0, time.monotonic()))

    def _loop(self) -> None:
        while not self._stop.wait(0.25):
            self.poll()

    def poll(self) -> None:
        """Check candidates; hand over settled files and quiet series."""
        now = time.monotonic()
        settled: list[Path] = []
        with self._lock:
            for path, seen in list(self._candidates.items()):
                try:
                    st = path.stat()
                except FileNotFoundError:
                    del self._candidates[path]
                    continue
                if not path.is_file():
                    del self._candidates[path]
                    continue
                if (st.st_size, st.st_mtime) != (seen.size, seen.mtime):
                    self._candidates[path] = _Seen(st.st_size, st.st_mtime, now)
                elif now - seen.stable_since >= self.config.settle_seconds:
                    del self._candidates[path]
                    if self._handled.get(path) != (st.st_size, st.st_mtime):
                        self._handled[path] = (st.st_size, st.st_mtime)
                        settled.append(path)
        for path in settled:
            self._settled(path, now)
        due = []
        with self._lock:
            for uid, (last, files) in list(self._series.items()):
                pending = any(f in self._candidates for f in files)
                if not pending and now - last >= self.config.settle_seconds:
                    due.append((uid, files))
                    del self._series[uid]
        for uid, files in due:
            self.on_series(uid, self.incoming / uid, files)

    def _settled(self, path: Path, now: float) -> None:
        try:
            if is_dicom_file(path):
                ds = pydicom.dcmread(
                    path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "SOPInstanceUID"]
                )
                uid, sop = str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
                durable_copy(path, self.incoming / uid / f"{sop}.dcm")
                with self._lock:
                    _, files = self._series.get(uid, (now, []))
                    self._series[uid] = (now, [*files, path])
            else:
                # TIFF flavours are slides; anything else becomes a job too, so the
                # operator sees it quarantined with its reason instead of silently ignored.
                self.on_file(path)
        except Exception as exc:  # a broken file must not stop the watcher
            log.warning("%s: cannot be read yet: %s", path, exc)
            self.on_file(path)  # let the job record the failure (quarantine with its reason)
