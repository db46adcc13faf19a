"""The `rayssd` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from jobs import data, demo, evaluate, export, label, prepare, quickstart, serve, submit, train, tune
from jobs.options import add_config_arguments, call_job, config_from_args
from ssd import config as C


def _cmd_config(args: argparse.Namespace) -> int:
    print(C.to_yaml(config_from_args(args)), end="")
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    print(f"{'preset':14s} {'backbone':13s} {'input':>6s} {'maps':>5s} {'default boxes':>14s}")
    for name in C.PRESETS:
        cfg = C.preset(name)
        maps, boxes = len(cfg.anchors.feature_maps), cfg.anchors.num_default_boxes()
        print(f"{name:14s} {cfg.model.backbone:13s} {cfg.model.image_size:>5d}px {maps:>5d} {boxes:>14d}")
    return 0


def _bench_module() -> ModuleType | None:
    """`benchmarks/__main__.py` of this checkout (benchmarks are not part of the installed package)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "__main__.py").is_file():
        return None
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import benchmarks.__main__ as bench

    return bench


def _cmd_demo(args: argparse.Namespace) -> int:
    demo.run(args)
    return 0


_JOBS = (
    ("quickstart", quickstart, "the whole system on this machine: data, Ray Train, MLflow, labelling, Serve"),
    ("prepare", prepare, "validate a dataset and cache its matched samples as Parquet (Ray Data)"),
    ("train", train, "train with Ray Train (DDP workers, Ray Data input, checkpoints, MLflow)"),
    ("tune", tune, "search hyperparameters on Ray Tune (trials are train runs, ASHA, one MLflow search)"),
    ("evaluate", evaluate, "COCO mAP of a trained model (checkpoint or MLflow URI) on a labelled dataset"),
    ("label", label, "label images with a trained model on Ray Data (Parquet + COCO results, MLflow run)"),
    ("serve", serve, "serve a model over HTTP with Ray Serve (POST /detect), tracked in MLflow"),
    ("export", export, "write a model as one ONNX or TorchScript graph, pixels to detections (NMS inside)"),
    (
        "submit",
        submit,
        "run one of these jobs on a Ray cluster (Jobs API), follow its log, exit with its status",
    ),
)


def _runner(job: ModuleType) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        code = job.run(args)  # a result for callers, or (submit) the exit status
        return code if isinstance(code, int) else 0

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rayssd",
        description="rayssd: SSD (Single Shot MultiBox Detector) on Ray. "
        "Start with `rayssd quickstart`. Commands: quickstart, data builtin, prepare, train, evaluate, "
        "label, serve, export, submit, demo, config, presets, bench.",
        epilog="Run `rayssd COMMAND --help` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo_parser = sub.add_parser(
        "demo",
        help="train and evaluate the core SSD in one process (no Ray), ~2 min on CPU",
        description="Train a preset from scratch on synthetic scenes and report held-out COCO mAP.",
    )
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(func=_cmd_demo)

    config = sub.add_parser(
        "config",
        help="print a resolved config as YAML",
        description="Resolve preset + YAML file + --set overrides and print the result.",
    )
    add_config_arguments(config)
    config.set_defaults(func=_cmd_config)

    presets = sub.add_parser("presets", help="list the model presets", description="List the model presets.")
    presets.set_defaults(func=_cmd_presets)

    data.register(sub)

    bench = _bench_module()
    if bench is not None:
        bench_parser = sub.add_parser(
            "bench",
            help="run every benchmark and print one table of figures, baselines and goals",
            description=bench.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        bench.add_arguments(bench_parser)
        bench_parser.set_defaults(func=bench.run)

    for name, job, help_text in _JOBS:  # each job module: DESCRIPTION, add_arguments, run
        job_parser = sub.add_parser(name, help=help_text, description=job.DESCRIPTION)
        job.add_arguments(job_parser)
        job_parser.set_defaults(func=_runner(job))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(call_job(f"rayssd {args.command}", args.func, args))


if __name__ == "__main__":
    main()
