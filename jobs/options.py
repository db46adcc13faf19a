"""Command-line options every job shares: which config to run with."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from ssd import config as C


def add_config_arguments(parser: argparse.ArgumentParser, default_preset: str = "tiny") -> None:
    """--preset, --config FILE and repeatable --set key.path=value."""
    parser.add_argument(
        "--preset",
        default=default_preset,
        choices=list(C.PRESETS),
        help=f"starting preset (default: {default_preset})",
    )
    parser.add_argument("--config", metavar="FILE", help="YAML file applied on top of the preset")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, e.g. --set train.lr=0.01 (repeatable)",
    )


def config_from_args(args: argparse.Namespace) -> C.Config:
    """Preset, then the YAML file, then the overrides; raises ConfigError naming the field."""
    cfg = C.preset(args.preset)
    if args.config:
        cfg = C.load(args.config, base=cfg)
    return C.override(cfg, args.overrides)


def run_job(
    verb: str,
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], Any],
    argv: list[str] | None = None,
) -> None:
    """``python -m jobs.<verb>``: parse, run, and turn bad input into one ``<verb>: error:``
    line and exit status 2 instead of a traceback."""
    parser = argparse.ArgumentParser(prog=f"python -m jobs.{verb}", description=description)
    add_arguments(parser)
    try:
        run(parser.parse_args(argv))
    except (ValueError, FileNotFoundError) as exc:
        print(f"{verb}: error: {exc}", file=sys.stderr)
        sys.exit(2)
