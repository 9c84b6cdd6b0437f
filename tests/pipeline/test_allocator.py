"""Tile workers keep freed memory for the next tile (glibc only)."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# In a fresh interpreter: RSS (MB) while an 8 MB block lives, and after it is freed.
_PROBE = """
import sys
import numpy as np
from pipeline.allocator import keep_freed_memory
tuned = sys.argv[1] == "1" and keep_freed_memory()
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
block = np.ones(8 << 20, np.uint8)
live = rss_mb()
del block
print(tuned, live - rss_mb())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or sys.platform != "linux", reason="glibc's mallopt only")
def test_freed_tile_memory_stays_with_the_worker() -> None:
    def dropped_mb(tuned: bool) -> tuple[str, float]:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE, "1" if tuned else "0"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        flag, mb = done.stdout.split()
        return flag, float(mb)

    # By default glibc hands an 8 MB block straight back to the system ...
    flag, default_drop = dropped_mb(False)
    assert flag == "False" and default_drop > 6
    # ... tuned, it keeps it for the next tile.
    flag, tuned_drop = dropped_mb(True)
    assert flag == "True" and tuned_drop < 1
