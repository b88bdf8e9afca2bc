"""How much memory this process may still take, on a host or in a container."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# A container's memory limit and use (cgroup v2, then v1): /proc/meminfo shows the
# host's, so a worker in a pod limited to 8 GiB on a 64 GiB node would size its cache
# for the node and be killed.
CGROUP_FILES = (
    (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")),
    (
        Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
        Path("/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ),
)


def available_ram(
    cgroup_files: tuple[tuple[Path, Path], ...] = CGROUP_FILES, host: int | None = None
) -> int:
    """Bytes this process may still take: the host's available memory (`host`, read
    from the system when None), or what is left under its container's limit when that
    is less."""
    available = _host_available_ram() if host is None else host
    for limit_file, usage_file in cgroup_files:
        try:
            limit, usage = limit_file.read_text().strip(), usage_file.read_text().strip()
        except OSError:
            continue
        if limit.isdigit() and usage.isdigit():  # "max" (v2) or a huge v1 value: none
            available = min(available, max(int(limit) - int(usage), 0))
        break
    return available


def _host_available_ram() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    pages: Any = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 0
    return int(pages) * os.sysconf("SC_PAGE_SIZE")
