"""Keep freed memory in a tile worker's heap instead of handing it back to the system.

Every tile allocates a few dozen images of a megabyte or more and frees them
again. glibc's malloc serves blocks that size with ``mmap`` and returns them
with ``munmap`` (or trims the heap top), so the next tile's images are fresh
pages that the kernel must fault in and zero: measured here, that was a
third of the time of a tile. A worker's working set is the same from tile to
tile, so :func:`keep_freed_memory` raises glibc's mmap and trim thresholds
and the memory is reused instead. Its resident size stays at its largest
tile's need (a few tens of MB), which it would reach anyway.

Only for processes that do nothing but score tiles: a long-running process
that allocates many different sizes would keep more memory than it needs.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

#: ``mallopt`` parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

#: Largest mmap threshold glibc accepts on 64-bit systems (32 MiB).
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve blocks up to 32 MiB from the heap and not to
    trim it. Returns whether it took effect (False where the C library has no
    ``mallopt``, e.g. macOS or musl, which is harmless)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        log.debug("no mallopt in this C library; tile workers keep the default allocator settings")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    if not done:
        log.debug("mallopt refused the thresholds; tile workers keep the default allocator settings")
    return done
