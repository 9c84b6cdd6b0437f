"""The service's configuration: one TOML file, validated, with environment overrides.

Environment variables ``IHC_ADAPTER__SECTION__KEY`` override the file
(``IHC_ADAPTER__SCP__PORT=11113``); values are parsed as JSON when they can
be (numbers, booleans, lists), else taken as text. ``ihc-adapter config
check FILE`` prints the result or one line per problem.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from config.errors import ConfigError

ENV_PREFIX = "IHC_ADAPTER__"
_AE = re.compile(r"^[\x20-\x7e]{1,16}$")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _ae_title(value: str) -> str:
    if not _AE.match(value) or value.strip() == "" or "\\" in value:
        raise ValueError(f"AE title {value!r} must be 1-16 printable ASCII characters without backslash")
    return value.strip()


class PathsConfig(_Frozen):
    spool: Path = Field(Path("/data/spool"), description="received objects and the job database")
    output: Path = Field(Path("/data/output"), description="results, one folder per job")

    @property
    def database(self) -> Path:
        return self.spool / "jobs.db"


class ScoringConfig(_Frozen):
    profile: str = Field("hscore", description="stain profile, by name or path to a .toml (see Profiles)")
    overrides: tuple[str, ...] = Field((), description="key=value settings, as for --set")
    workers: int = Field(0, ge=0, description="tile processes per slide; 0 = all cores")


class WatchConfig(_Frozen):
    folders: tuple[Path, ...] = Field((), description="folders watched for slides (DICOM, OME-TIFF, SVS, TIFF)")
    settle_seconds: float = Field(5.0, ge=0, description="size and mtime unchanged this long = file complete")
    after: Literal["leave", "move", "delete"] = Field("leave", description="what happens to a file once scored")
    done_folder: Path | None = Field(None, description="where after = 'move' puts scored files")
    ignore: tuple[str, ...] = Field(
        ("*.part", "*.tmp", "*.partial", ".*", "*~"), description="file name patterns never picked up"
    )
    follow_symlinks: bool = Field(
        False,
        description="read files through symbolic links that lead outside the watch folders (off: such links "
        "are skipped with a warning; links that stay inside are always followed)",
    )

    @model_validator(mode="after")
    def _done(self) -> WatchConfig:
        if self.after == "move" and self.done_folder is None:
            raise ValueError("watch.after = 'move' needs watch.done_folder")
        return self


class TlsConfig(_Frozen):
    """TLS on the listener (DICOM TLS profile)."""

    certificate: Path = Field(..., description="PEM certificate chain of the listener")
    key: Path = Field(..., description="PEM private key of the certificate")
    ca: Path | None = Field(None, description="CA bundle to require and verify client certificates")


class ScpConfig(_Frozen):
    enabled: bool = Field(True, description="run the C-STORE listener")
    ae_title: str = Field("IHC_ADAPTER", description="our AE title; associations calling another are rejected")
    host: str = Field("0.0.0.0", description="address to listen on (127.0.0.1: this machine only)")
    port: int = Field(11112, ge=1, le=65535, description="TCP port of the listener")
    allowed_calling_aes: tuple[str, ...] = Field(
        (), description="calling AE titles accepted; empty = any (a warning at start-up on a non-loopback address)"
    )
    series_quiet_seconds: float = Field(30.0, gt=0, description="a series is complete after this much silence")
    confirm_series: bool = Field(
        True, description="after the silence, check the headers for missing concatenation parts or base level"
    )
    series_max_wait_seconds: float = Field(
        600.0, gt=0, description="a series whose headers still show gaps is scored anyway after this much silence"
    )
    max_pdu: int = Field(
        262144, ge=4096, le=4194304, description="finite maximum PDU we advertise and enforce on what we read"
    )
    max_associations: int = Field(10, ge=1, le=256, description="associations at once, from all senders")
    max_associations_per_address: int = Field(
        4, ge=1, le=256, description="connections at once from one network address (the rest are rejected)"
    )
    handshake_timeout_seconds: float = Field(
        10.0, gt=0, description="TLS handshake and the association request must arrive within this of connecting"
    )
    read_timeout_seconds: float = Field(
        60.0, gt=0, description="a PDU that stalls longer than this mid-read is dropped"
    )
    idle_timeout_seconds: float = Field(120.0, gt=0, description="an association idle longer than this is aborted")
    min_free_disk_mb: float = Field(
        1024.0, ge=0, description="below this much free space on the spool's disk, new objects are refused (0xA700)"
    )
    accept_other_storage: bool = Field(False, description="also accept storage classes other than VL WSI")
    tls: TlsConfig | None = Field(None, description="accept only TLS associations (see scp.tls.*)")

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _ae_title(v)

    @field_validator("allowed_calling_aes")
    @classmethod
    def _aes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_ae_title(a) for a in v)


class DestinationTls(_Frozen):
    ca: Path | None = Field(None, description="CA bundle to verify the destination (default: the system's)")
    certificate: Path | None = Field(None, description="our client certificate, where the destination asks for one")
    key: Path | None = Field(None, description="private key of that certificate")
    server_name: str | None = Field(None, description="name to verify in its certificate (default: host)")


class Destination(_Frozen):
    name: str = Field(..., min_length=1, description="unique name, shown in job listings and logs")
    host: str = Field(..., description="the PACS' address")
    port: int = Field(..., ge=1, le=65535, description="the PACS' DICOM port")
    ae_title: str = Field(..., description="the PACS' AE title (called AE)")
    calling_ae: str = Field("IHC_ADAPTER", description="our AE title towards this destination")
    tls: DestinationTls | None = Field(None, description="send over TLS (DICOM TLS profile)")

    @field_validator("ae_title", "calling_ae")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _ae_title(v)


class ServiceOptions(_Frozen):
    concurrency: int = Field(1, ge=1, le=16, description="slides scored at once")
    poll_seconds: float = Field(1.0, gt=0, description="how often idle workers look for queued jobs")
    log_patient_data: bool = Field(
        False, description="add the patient ID and accession number to each job's 'done' event (off: never logged)"
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="text: 'time level logger event=… key=value'; json: one JSON object per line"
    )
    http_port: int = Field(0, ge=0, le=65535, description="/healthz and /metrics on http_host; 0 = off")
    http_host: str = Field(
        "127.0.0.1", description="address /healthz and /metrics listen on (0.0.0.0 in a container for Prometheus)"
    )
    retry_base_seconds: float = Field(5.0, gt=0, description="first wait before a failed delivery is retried")
    retry_max_seconds: float = Field(3600.0, gt=0, description="longest wait between delivery retries (doubling)")


class RetentionConfig(_Frozen):
    """What is deleted, and when: received series and result folders of finished jobs."""

    keep_days: float | None = Field(
        None,
        gt=0,
        description="delete a finished job's received files and results this long after it ended; "
        "none = keep everything",
    )
    until_delivered: bool = Field(
        True, description="never delete the files of a job with results still waiting to be delivered"
    )
    purge_interval_seconds: float = Field(3600.0, gt=0, description="how often the service purges")


class ServiceConfig(_Frozen):
    paths: PathsConfig = PathsConfig()
    scoring: ScoringConfig = ScoringConfig()
    watch: WatchConfig = WatchConfig()
    scp: ScpConfig = ScpConfig()
    destinations: tuple[Destination, ...] = ()
    service: ServiceOptions = ServiceOptions()
    retention: RetentionConfig = RetentionConfig()

    @model_validator(mode="after")
    def _names(self) -> ServiceConfig:
        names = [d.name for d in self.destinations]
        if len(names) != len(set(names)):
            raise ValueError(f"destination names must be unique: {names}")
        return self


def _env_overrides(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in key[len(ENV_PREFIX) :].split("__") if p]
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, raw, f"{part} is not a section")
        node[path[-1]] = value


def load_service_config(path: Path | None, environ: Mapping[str, str] | None = None) -> ServiceConfig:
    """The config file (if any) plus environment overrides, validated."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError("config", str(path), f"cannot read: {exc.strerror or exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("config", str(path), f"invalid TOML: {exc}") from exc
    _env_overrides(data, os.environ if environ is None else environ)
    try:
        return ServiceConfig(**data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(where, err.get("input"), err["msg"]) from exc
