"""`rayssd tune`: arguments → `TuneOptions` → `pipelines.train.tune.tune`, a hyperparameter
search on Ray Tune whose trials are `rayssd train` runs.

Also runs as ``ray job submit --working-dir . -- python -m jobs.tune --data ... --preset ...``.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from jobs.options import add_config_arguments, config_from_args, run_job
from pipelines.train.tune import TuneOptions, tune

DESCRIPTION = """Search hyperparameters on Ray Tune. Each trial is a real `rayssd train` run (the
same Ray Data pipeline, Ray Train loop, checkpoints and MLflow logging) of the preset with the
trial's values, evaluated on the val split every epoch; ASHA stops weak trials at epoch rungs
(--grace-epochs, --reduction-factor). Trials run side by side as the cluster holds them (one
training worker each; fractional CPUs on a laptop, a GPU each on a cluster; --max-concurrent
caps it). --search KEY=SPEC (repeatable) with SPEC uniform(a,b), loguniform(a,b), randint(a,b),
choice(v1,v2,...) or a value, e.g. train.lr=loguniform(1e-4,1e-2) train.batch_size=choice(8,16,32)
train.loc_weight=uniform(0.5,2); without --search: train.lr around the preset's, train.loc_weight,
train.neg_pos_ratio and train.warmup_epochs. The search is one MLflow run (experiment
rayssd-tune) with each trial as a child run; it ends with the trial table, a plot of mAP against
epochs and the best trial's final model, registered as --register-as through the champion gate
(the alias moves only if val mAP beats the champion's and no class's AP drops by more than
--max-class-drop). --resume --name NAME continues an interrupted search."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        required=True,
        metavar="SOURCE",
        help="COCO .json, YOLO .yaml or VOC root (path or URI), or a folder of rayssd prepare output",
    )
    parser.add_argument(
        "--val-data", metavar="SOURCE", help="separate validation source (default: the source's val split)"
    )
    add_config_arguments(parser)
    parser.add_argument("--trials", type=int, default=8, metavar="N", help="trials to run (default: 8)")
    parser.add_argument(
        "--max-concurrent",
        type=int,
        metavar="K",
        help="trials at a time (default: as many as the cluster's CPUs or GPUs hold)",
    )
    parser.add_argument(
        "--search",
        action="append",
        default=[],
        metavar="KEY=SPEC",
        help="a config key and its search space (repeatable; default: the preset's space)",
    )
    parser.add_argument(
        "--time-budget-s", type=float, metavar="S", help="stop starting and running trials after S seconds"
    )
    parser.add_argument(
        "--grace-epochs",
        type=int,
        default=1,
        metavar="N",
        help="ASHA: epochs every trial runs before it may be stopped (default: 1)",
    )
    parser.add_argument(
        "--reduction-factor",
        type=int,
        default=2,
        metavar="F",
        help="ASHA: 1 in F trials goes on at each rung (default: 2)",
    )
    parser.add_argument(
        "--gpus-per-trial",
        type=float,
        metavar="G",
        help="GPUs per trial (default: 1 when the Ray cluster has GPUs, else 0)",
    )
    parser.add_argument("--name", help="search name (default: tune-PRESET-YYYYmmdd-HHMMSS)")
    parser.add_argument(
        "--storage",
        default="rayssd-runs",
        help="where the search, its trials' checkpoints and the best model are kept: a local folder "
        "(default: ./rayssd-runs) or a bucket URI (s3://BUCKET/runs, gs://...), as for rayssd train",
    )
    parser.add_argument("--resume", action="store_true", help="continue search --name where it stopped")
    parser.add_argument(
        "--experiment", default="rayssd-tune", help="MLflow experiment (default: rayssd-tune)"
    )
    parser.add_argument(
        "--register-as", help="MLflow registered model name (default: rayssd-PRESET); 'none' to skip"
    )
    parser.add_argument(
        "--max-class-drop",
        type=float,
        default=0.05,
        metavar="D",
        help="champion gate: the most a class's AP may drop against the champion's (default: 0.05)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the search's sampling (default: 0)")
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)",
    )


def options(args: argparse.Namespace) -> TuneOptions:
    """The parsed arguments, typed."""
    return TuneOptions(
        data=args.data,
        cfg=config_from_args(args),
        val_data=args.val_data,
        trials=args.trials,
        max_concurrent=args.max_concurrent,
        search=tuple(args.search),
        time_budget_s=args.time_budget_s,
        grace_epochs=args.grace_epochs,
        reduction_factor=args.reduction_factor,
        storage=args.storage,
        name=args.name,
        resume=args.resume,
        experiment=args.experiment,
        register_as=args.register_as,
        max_class_drop=args.max_class_drop,
        gpus_per_trial=args.gpus_per_trial,
        seed=args.seed,
        address=args.address,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = tune(options(args))
    print(out["table"])
    best = out["best"]
    if best is not None:
        print(f"best trial {best['trial']}: final val mAP {best['final_map']:.4f}; model {out['checkpoint']}")
    if out.get("mlflow_run_id"):
        print(f"MLflow run {out['mlflow_run_id']} at {out['mlflow_uri']} (each trial a child run)")
    reg = out.get("registered")
    if reg is not None:
        from pipelines.track.registry import format_gate

        state = "now champion" if reg.champion else f"champion stays version {reg.previous_champion}"
        print(f"registered models:/{reg.name}/{reg.version} ({reg.metric} {reg.value:.3f}; {state})")
        print(format_gate(reg.gate))
    return out


def main(argv: list[str] | None = None) -> None:
    run_job("tune", DESCRIPTION, add_arguments, run, argv)


if __name__ == "__main__":
    main()
