"""How every benchmark hands over its result: printed, and optionally kept as Markdown."""

from __future__ import annotations

import platform

from ssd.layout import cpu_isa, cpu_name


def publish(header: str, table: str, markdown: str | None) -> None:
    """Print the machine line and the table; with `markdown`, also write both to that file."""
    print(header)
    print(table)
    if markdown:
        with open(markdown, "w", encoding="utf-8") as f:
            f.write(header + "\n\n" + table + "\n")


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
