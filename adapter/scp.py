"""DICOM Storage SCP: receive slides by C-STORE, durably, and notice complete series.

Every object is received chunked to disk (pynetdicom's
``STORE_RECV_CHUNKED_DATASET``) into the spool's own ``tmp/`` folder (never
the system's: a transfer cut off leaves patient data nowhere else, and its
file is removed when the association ends), then stored under
``incoming/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` by
:meth:`adapter.spool.Spool.store`, and only then is success returned: an
acknowledged object is on disk.

Statuses: ``0x0000`` stored (also for the same object sent again);
``0xC000`` for an object the SCP cannot understand (not DICOM, empty, no or
malformed UIDs: permanent, a sender must not retry it); ``0x0111`` for a
different object under a SOP Instance UID already held (refused, logged);
``0xA700`` only for what may pass (the disk is full or low, a write failed).

The listener protects itself: the TLS handshake and the whole
A-ASSOCIATE-RQ must arrive within ``scp.handshake_timeout_seconds`` of the
connection, every later read within ``scp.read_timeout_seconds``; a PDU
longer than the maximum we advertise (or 1 MiB before association) closes
the connection; one address holds at most
``scp.max_associations_per_address`` connections; the called AE title must
be ours; and below ``scp.min_free_disk_mb`` of free disk new associations
are rejected as *transient, local limit exceeded*. Refusals are logged.

DICOM has no end-of-series message. A series is complete when no object for
it arrived for ``series_quiet_seconds`` *and* no association that delivered
to it is still open; the timer is re-armed by every C-STORE. Then its headers
are checked (``confirm_series``): a concatenation with instances missing, or
resampled levels without their ORIGINAL base level, keep it waiting for more
(up to ``series_max_wait_seconds`` of silence, then it is handed over anyway).
A late instance for a series already handed over hands it over again.
After a restart, :meth:`StorageSCP.restore` re-arms the series that were
still waiting, so none is forgotten.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, dimse_messages, evt
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from adapter.logs import event
from adapter.spool import Spool, SpoolError, Stored, instance_uids
from config.service import ScpConfig
from dicom_io.wsi_reader import WSI_SOP_CLASS, series_gaps

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"

#: C-STORE statuses (PS3.4 B.2.3, PS3.7 C).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  #: transient: the sender keeps the object and may retry
CANNOT_UNDERSTAND = 0xC000  #: permanent: the object is not a readable dataset with UIDs
DUPLICATE_SOP_INSTANCE = 0x0111  #: permanent: another object is held under this SOP Instance UID

#: Largest PDU read before an association is accepted (an A-ASSOCIATE-RQ with
#: 128 presentation contexts of many transfer syntaxes is well under this).
MAX_REQUEST_PDU = 1 << 20

SeriesCallback = Callable[[str, Path], object]


@dataclass
class _Series:
    folder: Path
    last_store: float
    associations: set[int] = field(default_factory=set)
    instances: int = 0
    handed_over: bool = False
    checked_store: float = -1.0  # last_store when its headers were last checked


class _GuardedSocket(AssociationSocket):
    """pynetdicom's socket with read deadlines and a PDU size limit (set as the class of its instance)."""

    _guard: StorageSCP
    _deadline: float
    _pdu_type: int

    def recv(self, nr_bytes: int) -> bytearray:
        scp = self._guard
        if self.assoc.is_established:
            timeout = scp.config.read_timeout_seconds
            limit = scp.config.max_pdu + 6 if self._pdu_type == 0x04 else MAX_REQUEST_PDU
        else:
            timeout = self._deadline - time.monotonic()
            limit = MAX_REQUEST_PDU
        if timeout <= 0:
            raise TimeoutError("the association request did not arrive in time")
        if nr_bytes > limit:
            scp.refused(self.assoc.requestor.address, f"PDU of {nr_bytes} bytes exceeds the limit of {limit}")
            raise OSError(f"PDU of {nr_bytes} bytes exceeds the limit of {limit}")
        assert self.socket is not None
        self.socket.settimeout(timeout)
        data = super().recv(nr_bytes)
        if nr_bytes == 6 and len(data) == 6:
            self._pdu_type = data[0]
        return data


class _GuardedHandler(RequestHandler):
    """Admission control before pynetdicom sees a connection: address limit, disk guard, TLS
    handshake in this connection's own thread, deadlines and PDU limits on the socket."""

    def handle(self) -> None:
        scp: StorageSCP = self.server.ihc_scp  # type: ignore[attr-defined]
        host = str(self.client_address[0])
        deadline = time.monotonic() + scp.config.handshake_timeout_seconds
        sock: socket.socket = self.request  # type: ignore[assignment]
        with scp.admitting(host) as refusal:
            try:
                sock.settimeout(scp.config.handshake_timeout_seconds)
                if scp.tls is not None:
                    sock = scp.tls.wrap_socket(sock, server_side=True)
                    self.request = sock
                if refusal:
                    scp.refused(host, refusal)
                    _reject_transient(sock, deadline)
                    return
            except (OSError, ssl.SSLError, ValueError) as exc:
                scp.refused(host, f"connection dropped before association: {exc}")
                _close(sock)
                return
            super().handle()

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        guarded = assoc.dul.socket
        assert guarded is not None
        guarded.__class__ = _GuardedSocket
        assert isinstance(guarded, _GuardedSocket)
        guarded._guard = self.server.ihc_scp  # type: ignore[attr-defined]
        guarded._deadline = time.monotonic() + guarded._guard.config.handshake_timeout_seconds
        guarded._pdu_type = 0
        return assoc


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()


def _reject_transient(sock: socket.socket, deadline: float) -> None:
    """Read the A-ASSOCIATE-RQ (bounded in size and time) and answer A-ASSOCIATE-RJ:
    rejected-transient, service-provider (presentation), local-limit-exceeded."""
    try:
        header = _read_exactly(sock, 6, deadline)
        _, _, length = struct.unpack(">BBL", header)
        if length <= MAX_REQUEST_PDU:
            _read_exactly(sock, length, deadline)
            rj = A_ASSOCIATE_RJ()
            rj.result, rj.source, rj.reason_diagnostic = 0x02, 0x03, 0x02
            sock.sendall(rj.encode())
    except (OSError, struct.error):
        pass
    finally:
        _close(sock)


def _read_exactly(sock: socket.socket, n: int, deadline: float) -> bytes:
    data = bytearray()
    while len(data) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out")
        sock.settimeout(remaining)
        chunk = sock.recv(min(n - len(data), 1 << 16))
        if not chunk:
            raise ConnectionError("closed")
        data.extend(chunk)
    return bytes(data)


def _install_spool_tempfiles() -> None:
    """Have pynetdicom write a received dataset into the receiving SCP's spool ``tmp/`` folder
    (it uses the system's temporary folder and keeps the file when a transfer is cut off)."""
    if getattr(dimse_messages.NamedTemporaryFile, "ihc_spool", False):
        return
    default = tempfile.NamedTemporaryFile

    def spool_tempfile(*args: Any, **kwargs: Any) -> Any:
        dul = threading.current_thread()
        assoc = getattr(dul, "assoc", None)
        scp = getattr(getattr(assoc, "_server", None), "ihc_scp", None)
        if scp is None:
            return default(*args, **kwargs)
        kwargs["dir"] = scp.spool.tmp
        handle = default(*args, **kwargs)
        scp.track_tempfile(assoc, Path(handle.name))
        return handle

    spool_tempfile.ihc_spool = True  # type: ignore[attr-defined]
    dimse_messages.NamedTemporaryFile = spool_tempfile  # type: ignore[assignment]


class StorageSCP:
    """The listener; start with :meth:`start`, stop with :meth:`stop`."""

    def __init__(self, config: ScpConfig, spool: Spool, on_series_complete: SeriesCallback):
        self.config = config
        self.spool = spool
        self.incoming = spool.incoming
        self.on_series_complete = on_series_complete
        self._series: dict[str, _Series] = {}
        self._open: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server: Any = None
        self._timer: threading.Thread | None = None
        self._tempfiles: dict[int, set[Path]] = {}
        self._handshaking: dict[str, int] = {}
        self.tls: ssl.SSLContext | None = None
        self.bytes_received = 0
        self.objects_received = 0

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        _config.STORE_RECV_CHUNKED_DATASET = True
        _install_spool_tempfiles()
        self.spool.tmp.mkdir(parents=True, exist_ok=True)
        self.incoming.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=self.config.ae_title)
        ae.maximum_pdu_size = self.config.max_pdu
        ae.maximum_associations = self.config.max_associations
        ae.require_calling_aet = list(self.config.allowed_calling_aes)
        ae.require_called_aet = True
        ae.acse_timeout = self.config.handshake_timeout_seconds
        ae.network_timeout = self.config.idle_timeout_seconds
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
            (evt.EVT_REJECTED, self._rejected),
            (evt.EVT_RELEASED, self._closed),
            (evt.EVT_ABORTED, self._closed),
            (evt.EVT_CONN_CLOSE, self._closed),
        ]
        if self.config.tls is not None:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(str(self.config.tls.certificate), str(self.config.tls.key))
            if self.config.tls.ca is not None:
                tls.load_verify_locations(str(self.config.tls.ca))
                tls.verify_mode = ssl.CERT_REQUIRED
            self.tls = tls
        # TLS is not given to pynetdicom: its server would do every handshake in its one
        # accepting thread; _GuardedHandler does it in the connection's own thread, in bounded time.
        server = ae.make_server(
            (self.config.host, self.config.port),
            evt_handlers=handlers,
            server_class=ThreadedAssociationServer,
            request_handler=_GuardedHandler,
        )
        server.ihc_scp = self  # type: ignore[attr-defined]
        server.daemon_threads = True
        ae._servers.append(server)  # as AE.start_server does: the server's shutdown removes it
        self._server = server
        self._serve_thread = threading.Thread(target=server.serve_forever, name="scp-listener", daemon=True)
        self._serve_thread.start()
        self._timer = threading.Thread(target=self._watch_series, name="series-timer", daemon=True)
        self._timer.start()
        log.info("storage SCP %s listening on %s:%d", self.config.ae_title, self.config.host, self.port)

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        if self._timer is not None:
            self._timer.join(5)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1]) if self._server is not None else self.config.port

    def threads(self) -> dict[str, bool]:
        """Whether the listener and the series timer are alive (for /healthz)."""
        alive = self._server is not None and not self._stop.is_set()
        return {
            "scp-listener": alive and self._serve_thread.is_alive(),
            "series-timer": alive and self._timer is not None and self._timer.is_alive(),
        }

    def restore(self, series: Iterable[tuple[str, Path]]) -> int:
        """Series found in the spool at start-up that were not handed over: each waits its quiet
        time again (more may still come) and is then handed over as if it had just arrived."""
        now = time.monotonic()
        n = 0
        with self._lock:
            for uid, folder in series:
                instances = sum(1 for _ in folder.glob("*.dcm"))
                self._series.setdefault(uid, _Series(folder=folder, last_store=now, instances=instances))
                n += 1
        return n

    # -- admission ---------------------------------------------------------------
    @contextlib.contextmanager
    def admitting(self, host: str) -> Iterator[str | None]:
        """The reason to refuse a connection from ``host`` now (or None); it counts against the
        address's limit while it handshakes."""
        with self._lock:
            active = self._server.active_associations if self._server is not None else []
            established = sum(1 for a in active if a.requestor.address == host)
            waiting = self._handshaking.get(host, 0)
            self._handshaking[host] = waiting + 1
        try:
            limit = self.config.max_associations_per_address
            if established + waiting >= limit:
                yield f"{established + waiting} connections from this address already (limit {limit})"
            else:
                yield self.disk_problem()
        finally:
            with self._lock:
                self._handshaking[host] -= 1
                if not self._handshaking[host]:
                    del self._handshaking[host]

    def disk_problem(self) -> str | None:
        """Why nothing more can be received (the spool's disk is low), or None."""
        free_mb = self.spool.free_bytes() / 2**20
        limit = self.config.min_free_disk_mb
        if free_mb < limit:
            return f"only {free_mb:.0f} MB free on the spool's disk (scp.min_free_disk_mb = {limit})"
        return None

    def refused(self, address: str, reason: str) -> None:
        event(log, "connection_refused", logging.WARNING, address=address, reason=reason)

    # -- handlers (run in association threads) -------------------------------------
    def _opened(self, ev: Any) -> None:
        with self._lock:
            self._open.add(id(ev.assoc))

    def _rejected(self, ev: Any) -> None:
        a = ev.assoc
        calling, called = a.requestor.ae_title, a.acceptor.ae_title
        if a.requestor.primitive is not None and a.requestor.primitive.called_ae_title != self.config.ae_title:
            reason = f"called AE title {a.requestor.primitive.called_ae_title!r} is not {self.config.ae_title!r}"
        elif self.config.allowed_calling_aes and calling not in self.config.allowed_calling_aes:
            reason = f"calling AE title {calling!r} is not allowed"
        else:
            reason = "too many associations or no acceptable presentation context"
        event(
            log,
            "association_rejected",
            logging.WARNING,
            address=a.requestor.address,
            calling_ae=calling,
            called_ae=called,
            reason=reason,
        )

    def _closed(self, ev: Any) -> None:
        with self._lock:
            self._open.discard(id(ev.assoc))
            leftovers = self._tempfiles.pop(id(ev.assoc), set())
        for path in leftovers:  # an object cut off mid-transfer: never acknowledged, removed
            try:
                path.unlink()
                event(log, "partial_transfer_removed", address=ev.assoc.requestor.address)
            except FileNotFoundError:
                pass

    def track_tempfile(self, assoc: Any, path: Path) -> None:
        with self._lock:
            self._tempfiles.setdefault(id(assoc), set()).add(path)

    def _handle_store(self, ev: Any) -> int:
        calling = ev.assoc.requestor.ae_title
        problem = self.disk_problem()
        if problem is not None:
            event(log, "store_refused", logging.WARNING, calling_ae=calling, reason=problem)
            return OUT_OF_RESOURCES
        tmp = Path(ev.dataset_path)
        try:
            series_uid, sop_uid = instance_uids(tmp)
            outcome, path = self.spool.store(tmp, series_uid, sop_uid)
        except SpoolError as exc:  # unreadable, no UIDs, malformed UIDs: retrying cannot help
            event(log, "store_refused", logging.WARNING, calling_ae=calling, reason=str(exc))
            return CANNOT_UNDERSTAND
        except OSError as exc:
            event(log, "store_failed", logging.ERROR, calling_ae=calling, series=series_uid, reason=str(exc))
            return OUT_OF_RESOURCES
        if outcome is Stored.CONFLICT:
            event(
                log,
                "store_refused",
                logging.WARNING,
                calling_ae=calling,
                series=series_uid,
                instance=sop_uid,
                reason="a different object is already held under this SOP Instance UID",
            )
            return DUPLICATE_SOP_INSTANCE
        if outcome is Stored.DUPLICATE:
            event(log, "duplicate_instance", calling_ae=calling, series=series_uid, instance=sop_uid)
        size = path.stat().st_size
        with self._lock:
            state = self._series.setdefault(series_uid, _Series(folder=path.parent, last_store=time.monotonic()))
            state.last_store = time.monotonic()
            state.associations.add(id(ev.assoc))
            if outcome is Stored.NEW:
                state.instances += 1
            if state.handed_over:
                event(log, "late_instance", series=series_uid)
                state.handed_over = False
            self.bytes_received += size
            self.objects_received += 1
        return SUCCESS

    # -- completeness ----------------------------------------------------------------
    def _watch_series(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self._check_series()
            except Exception:  # one bad series must not stop the timer
                log.exception("event=series_check_failed")

    def _check_series(self) -> None:
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
                        event(log, "series_incomplete", logging.WARNING, series=uid, waited_s=round(now - s.last_store))
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
                    event(log, "series_waiting", series=uid, gaps="; ".join(gaps))
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
