"""Folder watch: pick up slides dropped into folders, once each file has settled.

A file is settled when its size and modification time have not changed for
``settle_seconds``; temporary names (``*.part``, dot files, …) are ignored.
OME-TIFF / SVS / TIFF files are one slide each (any other file becomes a job
too, and is quarantined with its reason). DICOM files are grouped by
Series Instance UID and stored durably in the spool
(:meth:`adapter.spool.Spool.store`: UIDs checked, paths kept inside the
spool), and the series is handed over when none of its files changed for
``settle_seconds`` (a series copied file by file arrives over time). Files
already there at start-up are found by an initial scan.

Nothing a dropped file can do stops the watcher: a file that cannot be read
(permissions, a symbolic-link loop, a device) or whose UIDs are not UIDs is
reported through ``on_problem`` with its reason, once per version of the
file, and the watch goes on. Symbolic links that lead outside the watch
folders are not followed unless ``watch.follow_symlinks``.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from adapter.logs import event
from adapter.spool import Spool, SpoolError, Stored, instance_uids
from config.service import WatchConfig
from dicom_io.sniff import is_dicom_file

log = logging.getLogger(__name__)


@dataclass
class _Seen:
    size: int
    mtime: float
    stable_since: float


class FolderWatcher(FileSystemEventHandler):
    """Calls ``on_file(path)`` for settled slide files, ``on_series(uid, folder, sources)`` for DICOM
    series and ``on_problem(path, reason)`` for files that cannot be taken."""

    def __init__(
        self,
        config: WatchConfig,
        spool: Spool,
        on_file: Callable[[Path], None],
        on_series: Callable[[str, Path, list[Path]], None],
        on_problem: Callable[[Path, str], None],
    ):
        self.config = config
        self.spool = spool
        self.on_file = on_file
        self.on_series = on_series
        self.on_problem = on_problem
        self._roots = tuple(f.resolve() for f in config.folders)
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
        for folder in self.config.folders:  # files already there (links to folders are not descended)
            for parent, _dirs, names in os.walk(folder, followlinks=False):
                for name in names:
                    self._note(Path(parent) / name)
        self._thread = threading.Thread(target=self._loop, name="folder-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(5)
        if self._thread is not None:
            self._thread.join(5)

    def threads(self) -> dict[str, bool]:
        """Whether the watch loop and the file-system observer are alive (for /healthz)."""
        running = not self._stop.is_set()
        return {
            "folder-watch": running and self._thread is not None and self._thread.is_alive(),
            "watch-observer": running and self._observer is not None and self._observer.is_alive(),
        }

    # watchdog callbacks (observer thread)
    def on_created(self, ev: FileSystemEvent) -> None:
        self._note(Path(str(ev.src_path)))

    def on_modified(self, ev: FileSystemEvent) -> None:
        self._note(Path(str(ev.src_path)))

    def on_moved(self, ev: FileSystemEvent) -> None:
        self._note(Path(str(ev.dest_path)))

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
            try:
                self.poll()
            except Exception:  # a bug must not end the watch: log it and go on
                log.exception("event=watch_poll_failed")

    def _problem(self, path: Path, reason: str) -> None:
        event(log, "file_skipped", logging.WARNING, file=str(path), reason=reason)
        try:
            self.on_problem(path, reason)
        except Exception:
            log.exception("event=problem_report_failed file=%r", str(path))

    def _outside(self, path: Path) -> str | None:
        """Why ``path`` must not be read (a link out of the watch folders, a loop, not a file), or None."""
        try:
            resolved = path.resolve(strict=True)
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symbolic-link loop (Python < 3.13)
            return f"cannot be resolved: {exc}"
        if not self.config.follow_symlinks and not any(
            resolved == root or root in resolved.parents for root in self._roots
        ):
            return f"is a symbolic link to {resolved}, outside the watch folders (watch.follow_symlinks is off)"
        if not resolved.is_file():
            return "is not a regular file"
        return None

    def poll(self) -> None:
        """Check candidates; hand over settled files and quiet series."""
        now = time.monotonic()
        settled: list[Path] = []
        problems: list[tuple[Path, str]] = []
        with self._lock:
            for path, seen in list(self._candidates.items()):
                try:
                    st = path.lstat()
                    if path.is_symlink():
                        why = self._outside(path)
                        if why is not None:
                            del self._candidates[path]
                            if self._handled.get(path) != (st.st_size, st.st_mtime):
                                self._handled[path] = (st.st_size, st.st_mtime)
                                problems.append((path, why))
                            continue
                        st = path.stat()
                except FileNotFoundError:
                    del self._candidates[path]
                    continue
                except OSError as exc:
                    del self._candidates[path]
                    problems.append((path, f"cannot be examined: {exc}"))
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
        for path, why in problems:
            self._problem(path, why)
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
            try:
                self.on_series(uid, self.spool.series_folder(uid), files)
            except Exception:
                log.exception("event=series_handover_failed series=%s", uid)

    def _settled(self, path: Path, now: float) -> None:
        try:
            if not is_dicom_file(path):
                # TIFF flavours are slides; anything else becomes a job too, so the
                # operator sees it quarantined with its reason instead of silently ignored.
                self.on_file(path)
                return
            uid, sop = instance_uids(path)
            outcome, _ = self.spool.store(path, uid, sop)
            if outcome is Stored.CONFLICT:
                self._problem(path, f"a different object is already held under SOP Instance UID {sop}")
                return
            with self._lock:
                _, files = self._series.get(uid, (now, []))
                self._series[uid] = (now, [*files, path])
        except SpoolError as exc:
            self._problem(path, str(exc))
        except OSError as exc:
            self._problem(path, f"cannot be read: {exc}")
        except Exception as exc:  # a broken file must not stop the watcher
            log.exception("event=file_failed file=%r", str(path))
            self._problem(path, f"{type(exc).__name__}: {exc}")
