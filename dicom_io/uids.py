"""DICOM UID syntax (PS3.5 §9.1): digits and dots, at most 64 characters.

Every path the adapter builds from a UID (spool, results) goes through
:func:`is_uid` first, so a value such as ``../../X`` or ``/tmp/X`` never
becomes a path component.
"""

from __future__ import annotations

import re

#: Components of digits separated by single dots. Leading zeros are tolerated
#: (some scanners write them), anything else is not a UID.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")

MAX_UID_LENGTH = 64


def is_uid(value: object) -> bool:
    """Whether ``value`` is a string of UID syntax and length."""
    return isinstance(value, str) and len(value) <= MAX_UID_LENGTH and _UID.match(value) is not None
