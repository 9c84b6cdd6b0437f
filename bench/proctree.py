"""Process-tree memory from /proc, for the benchmarks (Linux only).

The pipeline's tile workers come from a fork server, so they are not
children of the process that asked for them and ``RUSAGE_CHILDREN`` does not
see them: the benchmarks walk /proc for every descendant instead.
"""

from __future__ import annotations

from pathlib import Path


def descendants(root: int) -> list[int]:
    """Process IDs of every descendant of ``root`` (children, grandchildren, ...)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [root]
    while frontier:
        kids = [pid for pid, ppid in parent.items() if ppid in frontier]
        found += kids
        frontier = kids
    return found


def status_mb(pid: int, field: str) -> float:
    """One memory field of /proc/PID/status (``VmRSS``, ``VmHWM``) in MB; 0 if the process has gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass  # it ended between the listing and the read
    return 0.0


def tree_rss_mb(root: int) -> float:
    """Resident memory of ``root`` and all its descendants together, in MB."""
    return sum(status_mb(pid, "VmRSS") for pid in [root, *descendants(root)])
