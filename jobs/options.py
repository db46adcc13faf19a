"""Command-line options every job shares: which config to run with."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from ssd import config as C

TERMINATED = 143  # 128 + SIGTERM: the status of a job stopped by SIGTERM, as a shell reports it


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


def call_job(label: str, run: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """Run a job and turn its outcome into an exit status, the one mapping every entry point
    uses: 0 done (or the status the job returned, e.g. submit's), 2 bad input (config,
    arguments, data, model: one ``LABEL: error:`` line, no traceback), 1 the work failed
    (`pipelines.common.JobError`), 130 interrupted by Ctrl-C and 143 stopped by SIGTERM (the
    message says how to continue)."""
    from pipelines.common import JobError, stop_on_sigterm, was_terminated

    stop_on_sigterm()
    try:
        result = run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"{label}: error: {exc}", file=sys.stderr)
        return 2
    except JobError as exc:
        print(f"{label}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(f"{label}: {exc or 'interrupted'}", file=sys.stderr)
        return TERMINATED if was_terminated() else 130
    if was_terminated():  # stopped cleanly on SIGTERM (a server): still say so in the status
        print(f"{label}: stopped by SIGTERM", file=sys.stderr)
        return TERMINATED
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def run_job(
    verb: str,
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], Any],
    argv: list[str] | None = None,
) -> None:
    """``python -m jobs.<verb>``: parse, run, exit with `call_job`'s status."""
    parser = argparse.ArgumentParser(prog=f"python -m jobs.{verb}", description=description)
    add_arguments(parser)
    sys.exit(call_job(verb, run, parser.parse_args(argv)))
