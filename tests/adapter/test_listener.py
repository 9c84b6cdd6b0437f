"""The listener under abuse, with real peers (pynetdicom, DCMTK, raw sockets), loopback only, bounded in time:
statuses that say permanent or transient, one object per SOP Instance UID, nothing left in /tmp, and no
client can stall it (silent TLS, half-sent requests, oversized PDUs, too many connections, a full disk)."""

from __future__ import annotations

import logging
import os
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config, evt

from adapter.scp import CANNOT_UNDERSTAND, DUPLICATE_SOP_INSTANCE, OUT_OF_RESOURCES, StorageSCP
from adapter.spool import Spool
from config.service import ScpConfig
from dicom_io.wsi_reader import WSI_SOP_CLASS
from tests.adapter.dicom_files import raw_dataset_file, wsi_object
from tests.conftest import require_tool, self_signed_certificate, wait_for
from tests.orthanc import free_port

Listener = tuple[StorageSCP, Spool, list[tuple[str, Path]]]


def _listener(tmp_path: Path, **overrides: Any) -> StorageSCP:
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": free_port(),
        "allowed_calling_aes": ("SCANNER1", "SCANNER2"),
        "series_quiet_seconds": 1.0,
        "handshake_timeout_seconds": 2.0,
        "min_free_disk_mb": 1,
    }
    done: list[tuple[str, Path]] = []
    config = ScpConfig(**(settings | overrides))
    server = StorageSCP(config, Spool(tmp_path / "spool"), lambda u, f: done.append((u, f)))
    server.done = done  # type: ignore[attr-defined]
    return server


@pytest.fixture()
def listener(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[StorageSCP]:
    server = _listener(tmp_path, **getattr(request, "param", {}))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _associate(port: int, calling: str = "SCANNER1", handlers: list[Any] | None = None, timeout_s: float = 10) -> Any:
    _config.STORE_SEND_CHUNKED_DATASET = True  # send files as they are on disk, unparsed
    ae = AE(ae_title=calling)
    ae.add_requested_context(WSI_SOP_CLASS, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    assoc = ae.associate("127.0.0.1", port, ae_title="IHC_ADAPTER", evt_handlers=handlers or [])
    assert assoc.is_established
    return assoc


def _store(port: int, *paths: Path, calling: str = "SCANNER1") -> list[int]:
    assoc = _associate(port, calling)
    try:
        statuses = []
        for path in paths:
            status = assoc.send_c_store(path)
            statuses.append(int(status.Status) if status else -1)
        return statuses
    finally:
        assoc.release()


def _encoded(ds: pydicom.Dataset) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


def _stored(spool: Spool) -> list[Path]:
    return sorted(spool.incoming.rglob("*.dcm"))


def test_unreadable_objects_are_refused_for_good_not_as_out_of_resources(listener: StorageSCP, tmp_path: Path) -> None:
    long_uid = pydicom.Dataset()
    long_uid.SOPClassUID, long_uid.SOPInstanceUID = WSI_SOP_CLASS, "1.2." + "3" * 70
    long_uid.SeriesInstanceUID = generate_uid()
    escape = pydicom.Dataset()
    escape.SOPClassUID, escape.SOPInstanceUID, escape.SeriesInstanceUID = WSI_SOP_CLASS, generate_uid(), "../../../X"
    files = [
        raw_dataset_file(tmp_path / "empty.dcm", b""),
        raw_dataset_file(tmp_path / "garbage.dcm", b"\xff\xfe\x00" + os.urandom(500)),
        raw_dataset_file(tmp_path / "long-uid.dcm", _encoded(long_uid)),
        raw_dataset_file(tmp_path / "escape.dcm", _encoded(escape)),
    ]
    assert _store(listener.port, *files) == [CANNOT_UNDERSTAND] * 4  # 0xC000: a sender must not retry these
    assert _stored(listener.spool) == [] and not (tmp_path / "X").exists()
    assert _store(listener.port, wsi_object(tmp_path / "good.dcm")) == [0x0000]


def test_one_object_per_sop_instance_uid(listener: StorageSCP, tmp_path: Path) -> None:
    uid, series = generate_uid(), generate_uid()
    first = wsi_object(tmp_path / "a.dcm", uid, series, seed=1)
    other = wsi_object(tmp_path / "b.dcm", uid, series, seed=2)
    # The same object again is acknowledged (a sender retrying); a different one under its UID is refused.
    assert _store(listener.port, first, first, other) == [0x0000, 0x0000, DUPLICATE_SOP_INSTANCE]
    [held] = _stored(listener.spool)
    assert pydicom.dcmread(held)[0x00091010].value == pydicom.dcmread(first)[0x00091010].value
    # Two senders at once with different objects under one new UID: one stored, one refused, no mix.
    uid2 = generate_uid()
    big = [wsi_object(tmp_path / f"c{i}.dcm", uid2, series, size=4 << 20, seed=10 + i) for i in range(2)]
    statuses: dict[int, int] = {}

    def send(i: int) -> None:
        statuses[i] = _store(listener.port, big[i], calling=f"SCANNER{i + 1}")[0]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(statuses.values()) == [0x0000, DUPLICATE_SOP_INSTANCE]
    winner = big[next(i for i, s in statuses.items() if s == 0)]
    kept = pydicom.dcmread(listener.spool.instance_path(series, uid2))
    assert kept[0x00091010].value == pydicom.dcmread(winner)[0x00091010].value
    assert not list(listener.spool.incoming.rglob("*.part"))


def test_a_transfer_cut_off_leaves_no_file_anywhere(listener: StorageSCP, tmp_path: Path) -> None:
    big = wsi_object(tmp_path / "big.dcm", size=16 << 20)
    system_tmp = Path(tempfile.gettempdir())
    before = set(system_tmp.glob("tmp*.dcm"))
    sent: list[int] = []
    seen_in_spool: list[int] = []

    def cut(ev: Any) -> None:  # the scanner's connection breaks after a few PDUs of data
        sent.append(1)
        seen_in_spool.append(len(list(listener.spool.tmp.iterdir())))
        if len(sent) == 20:
            ev.assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)

    assoc = _associate(listener.port, handlers=[(evt.EVT_PDU_SENT, cut)])
    try:
        status = assoc.send_c_store(big)
    finally:
        assoc.abort()
    assert not status or status.Status != 0
    assert max(seen_in_spool) == 1  # the partial object was received into the spool's own tmp/ ...
    wait_for(lambda: not list(listener.spool.tmp.iterdir()), 10, "the partial file to be removed")
    assert set(system_tmp.glob("tmp*.dcm")) == before  # ... never into the system's temporary folder
    assert _stored(listener.spool) == []


def _raw(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.settimeout(15)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        while sock.recv(4096):  # an A-ASSOCIATE-RJ may come first
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def _echo(port: int, calling: str = "SCANNER1", called: str = "IHC_ADAPTER") -> subprocess.CompletedProcess[str]:
    tool = require_tool("echoscu")
    return subprocess.run(
        [tool, "-to", "5", "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_half_sent_requests_cannot_hold_the_listener(listener: StorageSCP) -> None:
    # Twelve connections from one address each send ten bytes of an A-ASSOCIATE-RQ and stall.
    stalled = []
    for _ in range(12):
        sock = _raw(listener.port, "127.0.0.2")
        sock.sendall(struct.pack(">BBL", 0x01, 0, 200) + b"\x00\x01\x00\x00")
        stalled.append(sock)
    started = time.monotonic()
    # A scanner elsewhere is served at once: the stalled ones hold at most their address's share.
    run = _echo(listener.port)
    assert run.returncode == 0, run.stdout + run.stderr
    assert time.monotonic() - started < 2.0
    # Every stalled connection is closed by the listener once its handshake time is over.
    for sock in stalled:
        assert _closed_by_peer(sock)
        sock.close()
    assert time.monotonic() - started < 10


def test_an_oversized_pdu_is_refused_unread(listener: StorageSCP) -> None:
    def rss_mb() -> float:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return int(fields["VmRSS"].split()[0]) / 1024

    before = rss_mb()
    sock = _raw(listener.port)
    sock.sendall(struct.pack(">BBL", 0x01, 0, 512 << 20))  # a 512 MB A-ASSOCIATE-RQ announced
    sent = 0
    with pytest.raises(OSError):  # the listener closes the connection instead of reading it
        chunk = b"\0" * (1 << 20)
        while sent < (128 << 20):
            sent += sock.send(chunk)
    sock.close()
    assert sent < (64 << 20)
    assert rss_mb() - before < 64


def test_a_data_pdu_over_the_advertised_maximum_ends_the_association(listener: StorageSCP) -> None:
    assoc = _associate(listener.port, timeout_s=60)  # our side would wait a minute
    limit = listener.config.max_pdu
    raw = assoc.dul.socket.socket
    raw.sendall(struct.pack(">BBL", 0x04, 0, limit + 1000) + b"\0" * 4096)
    wait_for(lambda: not assoc.is_established, 5, "the listener to drop the association")
    assoc.abort()


def test_a_silent_tls_client_does_not_block_others(tmp_path: Path) -> None:
    cert, key = self_signed_certificate(tmp_path)
    server = _listener(tmp_path, tls={"certificate": cert, "key": key}, handshake_timeout_seconds=4.0)
    server.start()
    try:
        silent = _raw(server.port)  # connects, never says hello
        time.sleep(0.3)
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        ae = AE(ae_title="SCANNER1")
        ae.add_requested_context("1.2.840.10008.1.1")
        ae.acse_timeout = ae.network_timeout = 10
        started = time.monotonic()
        assoc = ae.associate("127.0.0.1", server.port, ae_title="IHC_ADAPTER", tls_args=(client, "localhost"))
        assert assoc.is_established and time.monotonic() - started < 2.0
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        assert _closed_by_peer(silent)  # after the handshake timeout
        silent.close()
    finally:
        server.stop()


def test_called_ae_title_is_checked_and_refusals_are_logged(
    listener: StorageSCP, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="adapter.scp"):
        wrong_called = _echo(listener.port, called="SOMEONE_ELSE")
        wrong_calling = _echo(listener.port, calling="INTRUDER")
        wait_for(lambda: len([r for r in caplog.records if "association_rejected" in r.getMessage()]) == 2, 10, "log")
    assert wrong_called.returncode != 0
    assert "Called AE Title Not Recognized" in wrong_called.stdout + wrong_called.stderr
    assert wrong_calling.returncode != 0
    messages = [r.getMessage() for r in caplog.records if "association_rejected" in r.getMessage()]
    assert any("called AE title 'SOMEONE_ELSE'" in m for m in messages)
    assert any("calling AE title 'INTRUDER' is not allowed" in m and "address=127.0.0.1" in m for m in messages)


@pytest.mark.parametrize("listener", [{"min_free_disk_mb": 10**9}], indirect=True)
def test_a_full_disk_refuses_associations_as_transient(listener: StorageSCP, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="adapter.scp"):
        run = _echo(listener.port)
    assert run.returncode != 0
    out = run.stdout + run.stderr
    assert "Rejected Transient" in out and "Local Limit Exceeded" in out
    assert any("connection_refused" in r.getMessage() and "MB free" in r.getMessage() for r in caplog.records)


def test_a_disk_filling_up_mid_association_answers_out_of_resources(
    listener: StorageSCP, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assoc = _associate(listener.port)
    try:
        monkeypatch.setattr(listener.spool, "free_bytes", lambda: 1 << 19)  # half a megabyte left
        status = assoc.send_c_store(wsi_object(tmp_path / "a.dcm"))
        assert int(status.Status) == OUT_OF_RESOURCES  # transient: the scanner keeps it and tries later
    finally:
        assoc.release()
    assert _stored(listener.spool) == []
