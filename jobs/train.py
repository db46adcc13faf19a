"""`rayssd train`: arguments → `TrainOptions` → `pipelines.train.launch` (plan, then run).

Also runs as ``ray job submit --working-dir . -- python -m jobs.train --data ... --preset ...``.
Everything that can be checked without a cluster (config values, the data source, the
run directory, workers against this machine's CPUs) is checked before Ray starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from jobs.options import add_config_arguments, config_from_args, run_job
from pipelines.train.launch import RUN_FILE, Interrupted, Plan, TrainOptions, TrainRunError
from pipelines.train.launch import plan as plan_training
from pipelines.train.launch import run as run_training
from pipelines.train.sanity import FIT_GOAL, SANITY_IMAGES, SANITY_STEPS, fit_lines, sanity_lines

__all__ = ["RUN_FILE", "Interrupted", "TrainRunError", "add_arguments", "main", "options", "plan", "run"]

DESCRIPTION = """Train an SSD with Ray Train: N DDP workers (gloo on CPU, NCCL on GPU), fed by a
Ray Data pipeline that decodes, augments and matches images on CPU workers. SOURCE is a COCO
annotation file, a YOLO dataset YAML, a Pascal VOC root, or a folder of samples written by
`rayssd prepare` (no resizing or matching: CPU workers decode each stored input-sized JPEG
and gather its targets from the stored matches; refused when prepared for another preset or
class list). Without augmentation (data.augment=false) a source is prepared once into
STORAGE/samples/ (data.cache) and every epoch, and every later run on the same data and
preset, reads those samples back. Each epoch is reported and checkpointed
(model, optimiser, step, full config); a lost worker or node restarts the run from the last
checkpoint (--max-failures); --resume continues a stopped run. The val split is evaluated
with COCO mAP every train.eval_every epochs and at the end. Rank 0 logs params, metrics,
pictures and the best checkpoint to MLflow ($MLFLOW_TRACKING_URI, default
sqlite:///mlflow.db); the final model is registered and takes the `champion` alias if its
mAP beats the current champion's and no class's AP drops by more than --max-class-drop (the
decision and per-class deltas are printed and logged on the run)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        required=True,
        metavar="SOURCE",
        help="COCO .json, YOLO .yaml or VOC root (path or URI), or a folder of rayssd prepare output",
    )
    parser.add_argument(
        "--val-data",
        metavar="SOURCE",
        help="separate validation source (e.g. COCO's val JSON, or prepared samples); default: the "
        "source's own val split (VOC ImageSets, prepared val split) or a seeded data.val_fraction "
        "of it (COCO)",
    )
    add_config_arguments(parser)
    parser.add_argument("--workers", type=int, help="training workers (default: train.num_workers)")
    parser.add_argument(
        "--gpus-per-worker", type=float, default=0.0, help="GPUs per worker (default: 0, CPU)"
    )
    parser.add_argument(
        "--cpus-per-worker",
        type=float,
        help="CPUs reserved per training worker (default: 1, or less on a small machine so the data "
        "pipeline keeps some)",
    )
    parser.add_argument("--name", help="run name (default: PRESET-YYYYmmdd-HHMMSS)")
    parser.add_argument(
        "--storage",
        default="rayssd-runs",
        help="where runs keep checkpoints, their record and prepared samples: a local folder (default: "
        "./rayssd-runs) or a bucket URI (s3://BUCKET/runs, gs://...; credentials and endpoint from the "
        "standard variables such as AWS_ENDPOINT_URL). On a cluster: a bucket, or a path every node mounts",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue run --name from its last checkpoint, with its config"
    )
    parser.add_argument(
        "--stop-after-epochs",
        type=int,
        metavar="N",
        help="end this session after N epochs (the run stays resumable with --resume)",
    )
    parser.add_argument("--max-failures", type=int, default=3, help="worker/node failures to recover from")
    parser.add_argument(
        "--keep-checkpoints", type=int, default=2, help="latest checkpoints kept on storage (0: all)"
    )
    parser.add_argument("--experiment", default="rayssd", help="MLflow experiment (default: rayssd)")
    parser.add_argument(
        "--register-as", help="MLflow registered model name (default: rayssd-PRESET); 'none' to skip"
    )
    parser.add_argument(
        "--max-class-drop",
        type=float,
        default=0.05,
        metavar="D",
        help="champion gate: the alias moves to the new version only if its val mAP beats the "
        "champion's and no class's AP drops by more than D (default: 0.05)",
    )
    parser.add_argument(
        "--placement",
        default="PACK",
        choices=["PACK", "SPREAD", "STRICT_SPREAD"],
        help="where workers go: PACK fills nodes, SPREAD / STRICT_SPREAD put them on different nodes",
    )
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster address, e.g. auto or ray://head:10001 (default: $RAY_ADDRESS, else a local Ray)",
    )
    parser.add_argument("--quiet", action="store_true", help="no live progress line, only per-epoch lines")
    parser.add_argument(  # for tests of DDP: every rank posts a digest of its parameters per epoch
        "--param-digests", action="store_true", help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--download-weights",
        action="store_true",
        help="let model.backbone_weights=imagenet download torchvision's ImageNet file into the torch "
        "cache when it is not there (default: never download; the run stops, saying where to put it)",
    )
    parser.add_argument(
        "--sanity",
        type=int,
        nargs="?",
        const=SANITY_IMAGES,
        metavar="N",
        help=f"sanity check instead of a run: fit the first N (default {SANITY_IMAGES}) training images, "
        f"unaugmented, for {SANITY_STEPS} steps, score the model on them and pass at mAP@0.5 >= {FIT_GOAL} "
        "(exit 1 otherwise, saying what it found); nothing is registered",
    )
    parser.add_argument(
        "--summary-json",
        metavar="FILE",
        help="also write the outcome (metrics, epochs, workers, model) as JSON",
    )


def options(args: argparse.Namespace) -> TrainOptions:
    """The parsed arguments, typed."""
    return TrainOptions(
        data=args.data,
        cfg=config_from_args(args),
        val_data=args.val_data,
        config_given=bool(args.overrides or args.config),
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker,
        name=args.name,
        storage=args.storage,
        resume=args.resume,
        stop_after_epochs=args.stop_after_epochs,
        max_failures=args.max_failures,
        keep_checkpoints=args.keep_checkpoints,
        experiment=args.experiment,
        register_as=args.register_as,
        max_class_drop=args.max_class_drop,
        placement=args.placement,
        address=args.address,
        quiet=args.quiet,
        param_digests=args.param_digests,
        sanity=args.sanity,
        download_weights=args.download_weights,
    )


def plan(args: argparse.Namespace) -> Plan:
    """Everything checked before Ray starts (`pipelines.train.launch.plan`); raises ValueError."""
    return plan_training(options(args))


def run(args: argparse.Namespace) -> dict[str, Any] | int:
    """Train (or run the sanity check) as asked; the outcome, or 1 for a failed sanity check."""
    out = run_training(plan(args))
    _print_summary(out)
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(out, indent=2, default=_jsonable))
    if out.get("sanity") is not None and out.get("coverage") is not None:
        passed, lines = sanity_lines(out["metrics"], out["num_fit"], out["coverage"])
        print("\n".join(lines), flush=True)
        if not passed:
            return 1  # the exit status: the check failed
    return out


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return str(value)


def _print_summary(out: dict[str, Any]) -> None:
    m = out["metrics"]
    print(f"run {out['name']}: {out.get('epochs_done', '?')} epochs, loss {m.get('loss', float('nan')):.3f}")
    if "map" in m:
        print(
            f"  val mAP {m['map']:.3f}  mAP@0.5 {m['map50']:.3f}  mAP@0.75 {m.get('map75', float('nan')):.3f}"
        )
    if out.get("sanity") is None:
        for line in fit_lines(m, out.get("num_fit", 0), out.get("coverage")):
            print("  " + line)
    if out.get("checkpoint"):
        print(f"  model checkpoint: {out['checkpoint']}")
    if out.get("mlflow_run_id"):
        print(f"  MLflow run {out['mlflow_run_id']} at {out['mlflow_uri']}")
    reg = out.get("registered")
    if reg is not None:
        state = "now champion" if reg.champion else f"champion stays version {reg.previous_champion}"
        print(f"  registered models:/{reg.name}/{reg.version} ({reg.metric} {reg.value:.3f}; {state})")
        if reg.gate is not None:
            from pipelines.track.registry import format_gate

            print("  " + format_gate(reg.gate).replace("\n", "\n  "))


def main(argv: list[str] | None = None) -> None:
    run_job("train", DESCRIPTION, add_arguments, run, argv)


if __name__ == "__main__":
    main()
