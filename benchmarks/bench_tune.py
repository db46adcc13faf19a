"""`rayssd tune` against the quickstart's hand-picked settings in the same wall-clock budget.

    python -m benchmarks.bench_tune [--images 2048] [--epochs 12] [--trial-epochs 4]
                                    [--trials 16] [--quick] [--markdown FILE]

On the built-in dataset: --images train images, a val split that `train` and `tune` evaluate
on (tune picks its best trial by it), and a held-out test set written with another seed that
neither sees, on which every final model is scored (`rayssd evaluate`, mAP@0.5). Each run is
the CLI in its own process with its own local Ray, as a user runs it, on the same machine
in turn:

1. hand-picked: `rayssd train` with the quickstart's settings (`jobs.quickstart.SETTINGS`:
   batch 8 per worker, lr 5e-3, warm-up 0.3 epochs, no augmentation), its 2 workers,
   --epochs epochs. Its wall time (start-up, sample preparation and evaluation included) is
   the budget B.
2. tune: `rayssd tune --time-budget-s B` with --trial-epochs epochs per trial, ASHA, up to
   --trials trials over tiny's default space and train.batch_size=choice(8,16,32) (no
   augmentation, as above): the search that replaces the hand-picking. Its best trial's
   model (by val mAP) is scored.
3. untuned, for reference: `rayssd train` with tiny's own settings (batch 32, lr 3e-3, one
   warm-up epoch), the same epochs and workers: what a user gets with neither.

figure: tune's mAP@0.5 / the hand-picked one's, on the held-out set (goal: report; the
issue names none). Two cores run one trial at a time, so the budget buys few trials;
figures need an otherwise idle machine (the header shows the load average). --quick (a smoke
run, a few minutes) uses 256 train / 48 val / 48 test images, 3 epochs, 2 per trial.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

from benchmarks.report import machine, publish
from jobs.quickstart import SETTINGS as QUICKSTART_SETTINGS
from jobs.quickstart import WORKERS
from pipelines.data.builtin import write_builtin
from pipelines.train.search import default_space
from ssd import config as C

PROJECT = Path(__file__).resolve().parents[1]
FULL = {"images": 2048, "val": 200, "test": 500, "epochs": 12, "trial_epochs": 4, "trials": 16}
QUICK = {"images": 256, "val": 48, "test": 48, "epochs": 3, "trial_epochs": 2, "trials": 4}
EXTRA_SPACE = ["train.batch_size=choice(8,16,32)"]  # the hand-picking chose the batch too
TEST_SEED = 1  # the held-out set: scenes neither run trains or selects on


class Run(NamedTuple):
    name: str
    seconds: float
    model: Path
    test_map50: float
    test_map: float
    note: str


def _cli(args: list[str], cwd: Path, env: dict[str, str], log: Path) -> tuple[str, float]:
    """(stdout, wall seconds) of `python -m jobs.cli ARGS`; a failure raises with its log's tail."""
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(
            [sys.executable, "-m", "jobs.cli", *args],
            stdout=subprocess.PIPE,
            stderr=out,
            text=True,
            cwd=cwd,
            env=env,
        )
    seconds = time.perf_counter() - start
    (log.with_suffix(".out")).write_text(done.stdout)
    if done.returncode != 0:
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"rayssd {args[0]} exited {done.returncode}:\n{done.stdout[-2000:]}\n{tail}")
    return done.stdout, seconds


def _score(model: Path, test_json: Path, tmp: Path, env: dict[str, str], name: str) -> dict[str, Any]:
    out = tmp / f"{name}-test.json"
    _cli(
        ["evaluate", "--model", str(model), "--data", str(test_json), "--out", str(out)],
        tmp,
        env,
        tmp / f"{name}-eval.log",
    )
    return json.loads(out.read_text())


def run(p: dict[str, int]) -> tuple[list[Run], list[str], float]:
    """The three runs; returns them, notes and the budget B."""
    with tempfile.TemporaryDirectory(prefix="bench-tune-") as tmp_name:
        tmp = Path(tmp_name)
        write_builtin(tmp / "data", seed=0, train_images=p["images"], val_images=p["val"])
        write_builtin(tmp / "test", seed=TEST_SEED, train_images=1, val_images=p["test"])
        train_json = tmp / "data" / "annotations" / "instances_train.json"
        val_json = tmp / "data" / "annotations" / "instances_val.json"
        test_json = tmp / "test" / "annotations" / "instances_val.json"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray each
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
        common = ["--data", str(train_json), "--val-data", str(val_json), "--storage", str(tmp / "runs")]
        common += ["--register-as", "none"]
        epochs = p["epochs"]
        runs, notes = [], []

        schedule = {"train.epochs": epochs, "train.eval_every": epochs}
        hand = [s for s in QUICKSTART_SETTINGS if s.split("=")[0] not in schedule]
        hand += [f"{k}={v}" for k, v in schedule.items()]
        stdout, budget = _cli(
            ["train", *common, "--name", "hand", "--workers", str(WORKERS), "--quiet", *_sets(hand)],
            tmp,
            env,
            tmp / "hand.log",
        )
        scored = _score(tmp / "runs" / "hand" / "model", test_json, tmp, env, "hand")
        runs.append(
            Run(
                "hand-picked (quickstart settings)",
                budget,
                tmp / "runs" / "hand" / "model",
                scored["map50"],
                scored["map"],
                " ".join(hand),
            )
        )

        cfg = C.preset("tiny")
        space = [f"{k}={v}" for k, v in default_space(cfg).items()] + EXTRA_SPACE
        tune_sets = ["data.augment=false", f"train.epochs={p['trial_epochs']}"]
        args = ["tune", *common, "--name", "search", "--preset", "tiny", "--trials", str(p["trials"])]
        args += ["--time-budget-s", f"{budget:.0f}", *_sets(tune_sets)]
        for spec in space:
            args += ["--search", spec]
        stdout, seconds = _cli(args, tmp, env, tmp / "tune.log")
        table = [line for line in stdout.splitlines() if line.startswith("|")]
        trials = [line for line in table[2:]]
        stopped = sum("| stopped early |" in line for line in trials)
        best = tmp / "runs" / "search" / "best"
        scored = _score(best, test_json, tmp, env, "tune")
        runs.append(
            Run(
                "rayssd tune, best trial",
                seconds,
                best,
                scored["map50"],
                scored["map"],
                f"{len(trials)} trials ({stopped} stopped early) of {p['trial_epochs']} epochs, 1 at a time",
            )
        )
        notes.append("tune's trials:\n\n" + "\n".join(table))

        untuned = ["data.augment=false", f"train.epochs={epochs}", f"train.eval_every={epochs}"]
        stdout, seconds = _cli(
            ["train", *common, "--name", "untuned", "--workers", str(WORKERS), "--quiet", *_sets(untuned)],
            tmp,
            env,
            tmp / "untuned.log",
        )
        scored = _score(tmp / "runs" / "untuned" / "model", test_json, tmp, env, "untuned")
        runs.append(
            Run(
                "untuned (tiny's own settings)",
                seconds,
                tmp / "runs" / "untuned" / "model",
                scored["map50"],
                scored["map"],
                " ".join(untuned),
            )
        )
        notes.insert(0, f"search space: {' '.join(space)}; tune's own settings: {' '.join(tune_sets)}")
    return runs, notes, budget


def _sets(settings: list[str]) -> list[str]:
    return [arg for setting in settings for arg in ("--set", setting)]


def format_table(runs: list[Run]) -> str:
    hand = runs[0]
    lines = [
        "| run | mAP@0.5 (held-out) | mAP@[.5:.95] | wall s | vs hand-picked | goal |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        ratio = f"{r.test_map50 / hand.test_map50:.2f}x" if hand.test_map50 > 0 else "-"
        lines.append(
            f"| {r.name} | {r.test_map50:.3f} | {r.test_map:.3f} | {r.seconds:.0f} | {ratio} | report |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--images", type=int, default=FULL["images"], help="train images (default: %(default)s)"
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=FULL["epochs"],
        help="epochs of the hand-picked and untuned runs (default: %(default)s)",
    )
    parser.add_argument(
        "--trial-epochs",
        type=int,
        default=FULL["trial_epochs"],
        help="epochs per tune trial (default: %(default)s)",
    )
    parser.add_argument(
        "--trials",
        type=int,
        default=FULL["trials"],
        help="at most this many trials; the budget ends the search first (default: %(default)s)",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: 256 images, 3 epochs")
    parser.add_argument("--markdown", help="also write the table to this Markdown file")
    args = parser.parse_args()
    p = (
        dict(QUICK)
        if args.quick
        else {
            **FULL,
            "images": args.images,
            "epochs": args.epochs,
            "trial_epochs": args.trial_epochs,
            "trials": args.trials,
        }
    )
    load_before = os.getloadavg()[0]
    runs, notes, budget = run(p)
    load_after = os.getloadavg()[0]

    header = (
        f"machine: {machine()}; "
        f"preset tiny, built-in data: {p['images']} train / {p['val']} val / {p['test']} held-out "
        f"test images; budget B = {budget:.0f} s (the hand-picked run's wall time, {p['epochs']} "
        f"epochs, {WORKERS} workers); "
        f"load average {load_before:.1f} at the start, {load_after:.1f} at the end"
    )
    body = format_table(runs) + "\n\n" + "\n".join(f"- {r.name}: {r.note}" for r in runs)
    body += "\n\n" + "\n".join(f"- {n}" for n in notes)
    publish(header, body, args.markdown)


if __name__ == "__main__":
    main()
