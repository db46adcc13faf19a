"""Every benchmark in one run, one table of goals.

    python -m benchmarks [--quick] [--only core,...,scale,tune,accuracy] [--markdown FILE] [--plot FILE]
    rayssd bench ...

Runs each `benchmarks.bench_*` in turn as a child process (so each starts and stops its
own Ray and the next one has the machine), keeps each one's table, and prints:
the machine, every suite's own table, then one table of every figure that has a goal —
rayssd's figure, its baseline measured in the same run, the ratio, the goal and whether
it is met. --markdown writes the same as a Markdown file; --plot draws rayssd/baseline
ratios against their goals as a PNG. --quick passes --quick to every suite (smoke figures
in a few minutes, not for comparison). The scale suite (`benchmarks.bench_scale`, COCO-sized
sets up to 118k images, ~40 min), the tune suite (`benchmarks.bench_tune`, a search
against hand-picked settings in one budget, ~15 min) and the accuracy suite
(`benchmarks.bench_accuracy`, real objects, 2 hours) run only when --only names them.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from benchmarks.report import machine

SUITES = {  # name: (module, extra arguments); in the order they run
    "core": ("benchmarks.bench_core", []),
    "pipeline": ("benchmarks.bench_pipeline", []),
    "train": ("benchmarks.bench_train", []),
    "label": ("benchmarks.bench_label", []),
    "serve": ("benchmarks.bench_serve", []),
    "scale": ("benchmarks.bench_scale", []),  # ~40 min at 118k images: only with --only
    "tune": ("benchmarks.bench_tune", []),  # three training runs of minutes each: only with --only
    "accuracy": ("benchmarks.bench_accuracy", []),  # 8 x 15 min of training: only with --only
}
DEFAULT_SUITES = ("core", "pipeline", "train", "label", "serve")
PROJECT = Path(__file__).resolve().parents[1]
NUMBER = r"(-?[\d.]+)"
# e.g. "throughput at 32 clients / direct batched: 0.52 (goal >= 0.80: NOT met)"
GOAL_LINE = re.compile(
    rf"^(?P<figure>[^|]+?): {NUMBER}( ms)? \(goal (?P<goal>[^:]+): (?P<met>met|NOT met)\)$"
)


class Goal(NamedTuple):
    suite: str
    figure: str
    rayssd: str
    baseline: str
    ratio: str
    goal: str
    met: str


def goals(suite: str, text: str) -> list[Goal]:
    """The figures with a goal in one suite's Markdown: table rows with ratio, goal and met
    columns (a goal of "-", "report" or "reference" is no goal), and "figure: value (goal
    ...: met)" lines."""
    found: list[Goal] = []
    header: list[str] | None = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("|") and line.endswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if header is None or (cells and cells[0] in ("benchmark", "run")):
                header = [c.lower() for c in cells]
                continue
            if set(cells) <= {"---", ""} or not {"ratio", "goal", "met"} <= set(header):
                continue
            row = dict(zip(header, cells))
            if row["goal"] in ("-", "report", "reference", "for reference", ""):
                continue
            baseline = cells[2] if len(cells) > 2 else "-"
            found.append(Goal(suite, cells[0], cells[1], baseline, row["ratio"], row["goal"], row["met"]))
        else:
            header = None if not line else header
            match = GOAL_LINE.match(line)
            if match:
                value = match.group(2) + (match.group(3) or "")
                met = "yes" if match.group("met") == "met" else "NO"
                found.append(
                    Goal(suite, match.group("figure"), value, "(in the figure)", "-", match["goal"], met)
                )
    return found


def goal_table(rows: list[Goal]) -> str:
    lines = ["| suite | figure | rayssd | baseline | ratio | goal | met |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    met = sum(row.met == "yes" for row in rows)
    return "\n".join(lines) + f"\n\n{met} of {len(rows)} goals met."


def run_suite(name: str, quick: bool, out_dir: Path) -> tuple[str, float, int]:
    """(its Markdown, seconds, exit status); its output streams through as it runs."""
    module, extra = SUITES[name]
    markdown = out_dir / f"{name}.md"
    argv = [
        sys.executable,
        "-m",
        module,
        *extra,
        "--markdown",
        str(markdown),
        *(["--quick"] if quick else []),
    ]
    print(f"\n=== {name}: {' '.join(argv[1:])}", flush=True)
    start = time.perf_counter()
    status = subprocess.run(argv, cwd=PROJECT).returncode
    seconds = time.perf_counter() - start
    text = markdown.read_text() if markdown.is_file() else f"(no table: exit status {status})"
    return text, seconds, status


def _ratio(row: Goal) -> float | None:
    """The row's ratio; a figure that is itself a ratio ("a / b") stands for its own."""
    for text, allowed in ((row.ratio, True), (row.rayssd, " / " in row.figure)):
        text = text.rstrip("x")
        if allowed and text.replace(".", "", 1).isdigit():
            return float(text)
    return None


def plot(rows: list[Goal], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = [(r, value) for r in rows if (value := _ratio(r)) is not None]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(ratios) + 1.5))
    names = [f"{r.suite}: {r.figure[:60]}" for r, _ in ratios]
    ax.barh(
        names, [v for _, v in ratios], color=["tab:green" if r.met == "yes" else "tab:red" for r, _ in ratios]
    )
    for i, (r, _) in enumerate(ratios):
        target = re.search(NUMBER, r.goal)
        if target:
            ax.plot([float(target.group(1))] * 2, [i - 0.4, i + 0.4], color="black")
    ax.axvline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log")  # ratios from 0.5x to 16x side by side
    ax.invert_yaxis()
    ax.set_xlabel("rayssd / baseline, log scale (black: goal)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="smoke figures in a few minutes (noisy)")
    parser.add_argument(
        "--only",
        help=f"comma-separated suites of {', '.join(SUITES)} (default: {', '.join(DEFAULT_SUITES)}; "
        "scale, COCO-sized sets up to 118k images, ~40 min, and tune, ~15 min, run only when named)",
    )
    parser.add_argument("--markdown", metavar="FILE", help="also write the report as Markdown")
    parser.add_argument("--plot", metavar="FILE", help="also draw the ratios against their goals (PNG)")


def run(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.only.split(",")] if args.only else list(DEFAULT_SUITES)
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise ValueError(f"--only {','.join(unknown)}: unknown suite; expected some of {', '.join(SUITES)}")
    machine_line = (
        f"machine: {machine()}, Python {platform.python_version()}; "
        f"load average {os.getloadavg()[0]:.1f} at the start"
        + ("; --quick (smoke figures)" if args.quick else "")
    )
    sections, rows, failed = [], [], []
    with tempfile.TemporaryDirectory(prefix="rayssd-bench-") as tmp:
        for name in names:
            text, seconds, status = run_suite(name, args.quick, Path(tmp))
            sections.append(f"## {name} ({seconds:.0f} s)\n\n{text.strip()}")
            rows += goals(name, text)
            if status != 0:
                failed.append(name)
    report = "\n\n".join(
        [f"# rayssd benchmarks\n\n{machine_line}", *sections, "## goals\n\n" + goal_table(rows)]
    )
    print("\n" + report, flush=True)
    if args.markdown:
        Path(args.markdown).write_text(report + "\n")
    if args.plot and rows:
        plot(rows, args.plot)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
