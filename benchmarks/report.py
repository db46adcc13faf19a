"""How every benchmark hands over its result: printed, and optionally kept as Markdown."""

from __future__ import annotations

import platform
from pathlib import Path


def publish(header: str, table: str, markdown: str | None) -> None:
    """Print the machine line and the table; with `markdown`, also write both to that file."""
    print(header)
    print(table)
    if markdown:
        with open(markdown, "w", encoding="utf-8") as f:
            f.write(header + "\n\n" + table + "\n")


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), for the machine line of a report."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def cpu_isa() -> str:
    """The widest vector ISA the CPU has, as the figures depend on it: AVX-512 or AVX2, + AMX."""
    try:
        flags = next(
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
        ).split()
    except (OSError, StopIteration):
        return "?"
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return isa + (" + AMX" if "amx_tile" in flags else "")
