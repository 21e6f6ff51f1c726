"""How much memory this process may still use: ``$MODELPRESS_MEMORY_LIMIT``, the container's cgroup
limit, the kernel's ``MemAvailable``, whichever is smallest.

Callers compare an estimate of what they are about to allocate with :func:`available_memory_bytes`
and either refuse in one line (a latency benchmark too large for the machine) or take a path that
needs less (layer-by-layer calibration keeping its layers' weights on disk).

    >>> import os
    >>> os.environ[MEMORY_LIMIT_ENV] = "1.5M"
    >>> available_memory_bytes() <= 1.5 * 2**20
    True
    >>> del os.environ[MEMORY_LIMIT_ENV]
"""
from __future__ import annotations

import os

from .errors import ConfigError

MEMORY_LIMIT_ENV = "MODELPRESS_MEMORY_LIMIT"


def _parse_bytes(text: str) -> int:
    text = text.strip().upper().removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(text[-1:], 1)
    try:
        return int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise ConfigError(f"${MEMORY_LIMIT_ENV}={text!r} is not a size",
                          hint="use bytes or a size such as 512M or 4G") from None


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as fh:
            text = fh.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory_bytes() -> int | None:
    """Bytes this process can still allocate: the smallest of ``$MODELPRESS_MEMORY_LIMIT``, the
    cgroup's limit minus its usage (containers) and the kernel's ``MemAvailable``; None if unknown."""
    known = []
    if os.environ.get(MEMORY_LIMIT_ENV):
        known.append(_parse_bytes(os.environ[MEMORY_LIMIT_ENV]))
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        lim, used = _read_int(limit), _read_int(usage)
        if lim is not None and used is not None and lim < 1 << 60:  # v1 says "no limit" with a huge number
            known.append(max(0, lim - used))
            break
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    known.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    return min(known) if known else None
