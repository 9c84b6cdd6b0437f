"""The product's name and version, in one place (DICOM Manufacturer, Software Versions, logs)."""

from __future__ import annotations

import socket
import uuid
from functools import cache
from importlib.metadata import PackageNotFoundError, version

#: The product's name: DICOM Manufacturer and the device observer's name in our objects.
SOFTWARE_NAME = "ihc-adapter"


@cache
def software_version() -> str:
    """The installed package's version (``0+unknown`` when run from an uninstalled tree)."""
    try:
        return version(SOFTWARE_NAME)
    except PackageNotFoundError:
        return "0+unknown"


def device_uid(configured: str | None = None) -> str:
    """The Device Observer UID of this installation: ``configured`` (``outputs.device_uid``), else
    a UID derived from the host name (``2.25.`` + a name-based UUID), the same on every run here."""
    if configured:
        return configured
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_DNS, f'{SOFTWARE_NAME}.{socket.getfqdn()}').int}"
