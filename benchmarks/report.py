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


def machine() -> str:
    """What a figure was measured on: architecture, CPU model and ISA, cores, torch build, GPU.
    (The same benchmark differs 3-5x between the 2-core machines this project runs on.)"""
    import os

    import torch

    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
    gpu = f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.machine()} {cpu_name()} ({cpu_isa()}), {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({build}), {gpu}"
    )
