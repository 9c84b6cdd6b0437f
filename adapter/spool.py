"""The spool: received DICOM objects, durably on disk before anyone is told "stored".

Layout under ``paths.spool``::

    incoming/<SeriesInstanceUID>/<SOPInstanceUID>.dcm   one file per instance
    tmp/                                                transfers in progress

Every path is built from UIDs checked by :func:`dicom_io.uids.is_uid` and
resolved under ``incoming/`` (a value such as ``../../X`` or ``/tmp/X`` is
refused, whoever sent it). An instance is written to a uniquely named
``*.part`` file, fsynced, then moved to its final name only if no file holds
that name yet, and the folder is fsynced: an acknowledged object is on disk,
two transfers of one SOP Instance UID never share a temporary file, and a
different object under a UID already held is refused instead of replacing it.

At start-up :meth:`Spool.prepare` removes what an interrupted transfer left
(``tmp/*`` and ``*.part``); those objects were never acknowledged.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import pydicom

from config.errors import IhcAdapterError
from dicom_io.uids import is_uid

log = logging.getLogger(__name__)


class SpoolError(IhcAdapterError):
    """An object cannot be placed in the spool (bad UID, path outside the spool)."""


class Stored(enum.Enum):
    """What :meth:`Spool.store` did with an object."""

    NEW = "new"  #: written under its UID
    DUPLICATE = "duplicate"  #: the same bytes were already held: nothing written
    CONFLICT = "conflict"  #: a different object is held under this SOP Instance UID: refused


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def instance_uids(path: Path) -> tuple[str, str]:
    """``(SeriesInstanceUID, SOPInstanceUID)`` of a DICOM object, read without its pixels; a
    :class:`SpoolError` when they cannot be read (:meth:`Spool.store` checks their syntax)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "SOPInstanceUID"])
        return str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
    except Exception as exc:  # not a data set, empty, truncated, no UIDs: pydicom raises many types
        raise SpoolError(f"no readable Series/SOP Instance UIDs: {exc}") from exc


def file_digest(path: Path, size: int | None = None) -> str | None:
    """SHA-256 of a file's bytes (hex), or of its first ``size`` bytes (None when it is shorter)."""
    h = hashlib.sha256()
    read = 0
    with path.open("rb") as fh:
        while size is None or read < size:
            chunk = fh.read(1 << 20 if size is None else min(1 << 20, size - read))
            if not chunk:
                break
            h.update(chunk)
            read += len(chunk)
    if size is not None and read < size:
        return None
    return h.hexdigest()


def same_bytes(a: Path, b: Path) -> bool:
    """Whether two files hold the same bytes (sizes first, then content)."""
    if a.stat().st_size != b.stat().st_size:
        return False
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            ca, cb = fa.read(1 << 20), fb.read(1 << 20)
            if ca != cb:
                return False
            if not ca:
                return True


def folder_fingerprint(paths: Iterable[Path]) -> str:
    """A cheap fingerprint of files: names, sizes and modification times.

    It changes when a file is added, removed, grows or is rewritten; used to
    notice a slide that changed while it was being scored.
    """
    h = hashlib.sha256()
    for path in sorted(paths):
        st = path.stat()
        h.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def content_key(paths: Iterable[Path]) -> str:
    """SHA-256 over the files' names and contents: the same series sent twice has the same key."""
    h = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        h.update(f"{path.name}\0{file_digest(path)}\n".encode())
    return f"sha256:{h.hexdigest()}"


class Spool:
    """The spool folder; thread-safe (one lock orders the final renames)."""

    def __init__(self, root: Path):
        self.root = root
        self.incoming = root / "incoming"
        self.tmp = root / "tmp"
        self._lock = threading.Lock()

    def prepare(self) -> int:
        """Create the folders and remove leftovers of interrupted transfers; returns how many."""
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        removed = 0
        for leftover in [*self.tmp.iterdir(), *self.incoming.glob("*/*.part")]:
            try:
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover)
                else:
                    leftover.unlink()
                removed += 1
            except OSError as exc:
                log.warning("event=spool_cleanup_failed path=%s reason=%s", leftover, exc)
        return removed

    # -- paths -----------------------------------------------------------------------
    def series_folder(self, series_uid: str) -> Path:
        if not is_uid(series_uid):
            raise SpoolError(f"Series Instance UID {series_uid[:80]!r} is not a DICOM UID")
        return self._inside(self.incoming / series_uid)

    def instance_path(self, series_uid: str, sop_uid: str) -> Path:
        """``incoming/<series>/<sop>.dcm``, refusing anything that is not a UID or leaves the spool."""
        if not is_uid(sop_uid):
            raise SpoolError(f"SOP Instance UID {sop_uid[:80]!r} is not a DICOM UID")
        return self._inside(self.series_folder(series_uid) / f"{sop_uid}.dcm")

    def _inside(self, path: Path) -> Path:
        root = self.incoming.resolve()
        resolved = path.resolve()
        if resolved != root and root not in resolved.parents:
            raise SpoolError(f"{path} resolves to {resolved}, outside the spool {root}")
        return path

    def series(self) -> Iterator[tuple[str, Path]]:
        """``(series UID, folder)`` of every series folder in the spool holding at least one instance."""
        if not self.incoming.is_dir():
            return
        for folder in sorted(self.incoming.iterdir()):
            if folder.is_dir() and not folder.is_symlink() and is_uid(folder.name) and any(folder.glob("*.dcm")):
                yield folder.name, folder

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root if self.root.exists() else self.root.parent).free

    # -- storing ---------------------------------------------------------------------
    def store(self, src: Path, series_uid: str, sop_uid: str) -> tuple[Stored, Path]:
        """Copy ``src`` into the spool durably; see :class:`Stored` for the outcomes."""
        dst = self.instance_path(series_uid, sop_uid)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            return (Stored.DUPLICATE if same_bytes(src, dst) else Stored.CONFLICT), dst
        fd, name = tempfile.mkstemp(dir=dst.parent, prefix=f".{sop_uid}.", suffix=".part")
        part = Path(name)
        try:
            with src.open("rb") as fin, os.fdopen(fd, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
                fout.flush()
                os.fsync(fout.fileno())
            with self._lock:
                if dst.exists():  # another transfer of this UID finished first
                    return (Stored.DUPLICATE if same_bytes(part, dst) else Stored.CONFLICT), dst
                os.replace(part, dst)
            fsync_dir(dst.parent)
        finally:
            part.unlink(missing_ok=True)
        return Stored.NEW, dst
