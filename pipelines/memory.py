"""Process-level memory settings for CPU workers that build large target tensors.

glibc returns freed blocks above its mmap/trim thresholds to the kernel at once, so every
batch of targets ([B, A, 4] floats, megabytes) is page-faulted in again from zero. On two
cores that costs more than the matching itself (measured in benchmarks/bench_core.py).
Keeping such blocks in the heap removes the faults. Called once per worker process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP_BYTES = 256 * 1024 * 1024


def keep_freed_memory(max_bytes: int = _KEEP_BYTES) -> bool:
    """Ask glibc to keep up to `max_bytes` of freed memory for reuse. False if not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mmap_limit = min(max_bytes, 32 * 1024 * 1024)  # glibc caps the mmap threshold at 32 MiB
        ok = (
            libc.mallopt(_M_MMAP_THRESHOLD, mmap_limit) == 1
            and libc.mallopt(_M_TRIM_THRESHOLD, max_bytes) == 1
        )
    except (OSError, AttributeError) as exc:
        log.debug("mallopt unavailable: %s", exc)
        return False
    return bool(ok)
