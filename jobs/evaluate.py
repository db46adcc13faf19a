"""`rayssd evaluate`: COCO mAP of a trained model on a labelled dataset, detected on Ray workers.

Also runs as ``ray job submit --working-dir . -- python -m jobs.evaluate --model ... --data ...``.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from jobs.options import run_job
from pipelines.common import start_ray

DESCRIPTION = """Detect every image of a labelled dataset (COCO annotation file or Pascal VOC root,
local path or URI) with a trained model on Ray Data workers and score the detections with
pycocotools: mAP@[.5:.95], mAP@0.5, mAP@0.75 and AP@0.5 per class. MODEL is a checkpoint file
(or a folder holding checkpoint.pt), runs:/RUN_ID/PATH, models:/NAME@ALIAS or models:/NAME/VERSION.
A COCO file's train/val split is the seeded fraction split the model was trained with."""

SPLITS = ("val", "train", "all")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="URI", help="checkpoint path or MLflow model URI")
    parser.add_argument(
        "--data",
        required=True,
        metavar="SOURCE",
        help="COCO annotation .json or Pascal VOC root (path or URI)",
    )
    parser.add_argument(
        "--split",
        choices=SPLITS,
        help="split to evaluate; 'all' for the whole source (default: all of a COCO file, e.g. a val "
        "JSON; val of a VOC root)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=32, metavar="N", help="images per batch (default: 32)"
    )
    parser.add_argument(
        "--workers", type=int, default=2, metavar="N", help="at most N detection workers (default: 2)"
    )
    parser.add_argument("--out", metavar="FILE.json", help="also write the metrics to this JSON file")
    parser.add_argument(
        "--strict", action="store_true", help="fail on the first data problem, naming the file"
    )
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI for runs:/ and models:/ (default: $MLFLOW_TRACKING_URI)",
    )
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)",
    )


def run(args: argparse.Namespace) -> dict[str, Any]:

    from pipelines.label.batch import evaluate_dataset, require_labelled_source
    from pipelines.label.outputs import json_safe
    from pipelines.track.models import load_model

    if args.batch_size < 1 or args.workers < 1:
        raise ValueError(f"--batch-size {args.batch_size} and --workers {args.workers}: expected >= 1 each")
    probe = require_labelled_source(args.data)  # a bad source fails here, before Ray starts; parsed once
    split = args.split or ("all" if probe.kind == "coco" else "val")
    model = load_model(args.model, tracking_uri=args.tracking_uri)  # so does a bad model
    start_ray(args.address)
    print(f"evaluating {_model_name(model)} on {args.data} (split {split})", flush=True)
    metrics = evaluate_dataset(
        probe,
        args.model,
        split=None if split == "all" else split,
        batch_size=args.batch_size,
        workers=(1, args.workers),
        tracking_uri=args.tracking_uri,
        strict=args.strict,
        model=model,
    )
    print(format_table(metrics))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(json_safe(metrics), f, indent=2, sort_keys=True)
        print(f"metrics written to {args.out}")
    return metrics


def _model_name(model: Any) -> str:
    if model.name:
        return f"{model.name} v{model.version}" if model.version else model.name
    return model.uri


def format_table(metrics: dict[str, Any]) -> str:
    """The headline numbers and AP@0.5 per class, one per line."""
    lines = [
        f"{'mAP@[.5:.95]':16s} {metrics['map']:7.4f}",
        f"{'mAP@0.5':16s} {metrics['map50']:7.4f}",
        f"{'mAP@0.75':16s} {metrics['map75']:7.4f}",
    ]
    lines += [f"  AP@0.5 {name:16s} {ap:7.4f}" for name, ap in metrics["per_class50"].items()]
    lines.append(
        f"{metrics['images']} images, {metrics['detections']} detections in {metrics['seconds']:.1f}s "
        f"({metrics['images_per_s']:.1f} images/s)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    run_job("evaluate", DESCRIPTION, add_arguments, run, argv)


if __name__ == "__main__":
    main()
