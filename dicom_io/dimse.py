"""DIMSE networking helpers (pynetdicom): C-ECHO and C-STORE of files.

Each file is proposed with its exact SOP Class and Transfer Syntax (read
from its meta header, pixel data not read), and sent from disk by path with
pynetdicom's ``STORE_SEND_CHUNKED_DATASET``, so it is streamed in PDU-sized
chunks instead of being decoded into memory.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pynetdicom import AE, _config, build_context

from config.errors import IhcAdapterError

log = logging.getLogger(__name__)

#: pynetdicom accepts at most 128 presentation contexts per association.
MAX_CONTEXTS = 128


class DimseError(IhcAdapterError):
    """A DICOM network peer could not be reached or refused the request."""


@dataclass(frozen=True)
class Peer:
    host: str
    port: int
    ae_title: str


@dataclass(frozen=True)
class StoreResult:
    path: Path
    status: int

    @property
    def ok(self) -> bool:
        return self.status in (0x0000, 0xB000, 0xB006, 0xB007)

    @property
    def permanent(self) -> bool:
        """A refusal that sending again will not change (PS3.4 B.2.3, PS3.7 C): data set does not
        match (0xA9xx), cannot understand (0xCxxx), SOP class not supported, duplicate instance and
        the other 0x01xx failures. Out of resources (0xA7xx), resource limitation (0x0213) and no
        response at all are worth another try."""
        s = self.status
        return not self.ok and s >= 0 and (s & 0xFF00 in (0xA900, 0x0100) or s & 0xF000 == 0xC000)


def tls_context(ca: Path | None = None, certificate: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A client TLS context: the destination verified against ``ca`` (else the system's CAs),
    with our certificate where the destination asks for one."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None)
    if certificate is not None:
        context.load_cert_chain(str(certificate), str(key) if key else None)
    return context


def _describe(path: Path) -> tuple[str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    return str(ds.file_meta.MediaStorageSOPClassUID), str(ds.file_meta.TransferSyntaxUID)


def echo(peer: Peer, calling_ae: str = "IHC_ADAPTER", timeout_s: float = 10.0) -> bool:
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and status.Status == 0
    finally:
        assoc.release()


def send_files(
    paths: Sequence[Path],
    peer: Peer,
    calling_ae: str = "IHC_ADAPTER",
    timeout_s: float = 30.0,
    tls: tuple[ssl.SSLContext, str] | None = None,
) -> list[StoreResult]:
    """C-STORE every file to ``peer`` over one association (one per 128 SOP class / transfer
    syntax pairs); ``tls`` = (client context, name to verify). Raises :class:`DimseError` if no
    association."""
    # Stream each file's encoded dataset in PDU-sized chunks instead of decoding it.
    _config.STORE_SEND_CHUNKED_DATASET = True
    described = [(Path(p), *_describe(Path(p))) for p in paths]
    results: list[StoreResult] = []
    pairs = sorted({(sop, ts) for _, sop, ts in described})
    for start in range(0, len(pairs), MAX_CONTEXTS):
        chunk = set(pairs[start : start + MAX_CONTEXTS])
        ae = AE(ae_title=calling_ae)
        ae.requested_contexts = [build_context(sop, [ts]) for sop, ts in sorted(chunk)]
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls)
        if not assoc.is_established:
            raise DimseError(f"{peer.ae_title}@{peer.host}:{peer.port}: association refused or peer unreachable")
        try:
            for path, sop, ts in described:
                if (sop, ts) not in chunk:
                    continue
                status = assoc.send_c_store(path)
                code = int(status.Status) if status else -1
                if code == -1:
                    log.warning("no C-STORE response for %s (%s)", path, sop)
                results.append(StoreResult(path, code))
        finally:
            assoc.release()
    return results
