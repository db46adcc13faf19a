"""`rayssd export`: a trained model (checkpoint or MLflow URI) → one end-to-end ONNX or
TorchScript file (`ssd.export`), checked against the torch detector before it is reported.

Also runs as ``python -m jobs.export --model ... --format onnx --out model.onnx``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from jobs.options import run_job
from pipelines.common import JobError
from pipelines.track.models import load_model
from ssd import export
from ssd.synthetic import make_scene
from ssd.transforms import eval_transform

DESCRIPTION = """Write a trained model as one graph from pixels to detections, for ONNX Runtime,
TensorRT, OpenVINO or LibTorch: input `images` uint8 [B, 3, S, S] RGB (B dynamic, already resized
to the model's S); outputs `boxes` float32 [B, K, 4] xyxy in input pixels, `scores` [B, K],
`labels` int64 [B, K] (0 = padding) and `num_detections` [B], with decoding and per-class NMS
inside. Class names, COCO category ids, image size, thresholds and the config are in the file's
metadata. The file is checked against the torch model on a few built-in scenes before it is
reported. An .onnx file then labels and serves: `rayssd label|serve --model FILE.onnx`.
MODEL is a checkpoint file (or a folder holding checkpoint.pt), runs:/RUN_ID/PATH,
models:/NAME@ALIAS or models:/NAME/VERSION."""

CHECK_IMAGES = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="URI", help="checkpoint path or MLflow model URI")
    parser.add_argument(
        "--format", choices=export.FORMATS, default="onnx", help="graph format (default: onnx)"
    )
    parser.add_argument(
        "--out", metavar="FILE", help="file to write (default: model.onnx or model.pt in this directory)"
    )
    parser.add_argument(
        "--score-threshold",
        type=float,
        metavar="S",
        help="lowest score the graph keeps (default: the model's inference.score_threshold); "
        "runtimes can filter its output higher, never lower",
    )
    parser.add_argument(
        "--max-detections",
        type=int,
        metavar="K",
        help="detections per image, K (default: the model's inference.max_detections)",
    )
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI for runs:/ and models:/ (default: $MLFLOW_TRACKING_URI)",
    )


def check_images(size: int, count: int = CHECK_IMAGES, seed: int = 0) -> np.ndarray:
    """`count` built-in scenes at the model's input: uint8 [count, 3, size, size]."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        pixels, boxes, _ = make_scene(rng, 2 * size, 2 * size)
        resized, _ = eval_transform(pixels, boxes, size)
        images.append(resized.transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(images))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from pipelines.track import engines

    if args.score_threshold is not None and not 0 <= args.score_threshold < 1:
        raise ValueError(f"--score-threshold must be in [0, 1), got {args.score_threshold}")
    if args.max_detections is not None and args.max_detections < 1:
        raise ValueError(f"--max-detections must be at least 1, got {args.max_detections}")
    loaded = load_model(args.model, tracking_uri=args.tracking_uri)
    if loaded.model is None:
        raise ValueError(f"{args.model} is already an exported file; export a checkpoint or an MLflow model")
    out = Path(args.out or f"model{export.SUFFIXES[args.format]}")
    try:
        meta = export.export(
            loaded.model,
            loaded.cfg,
            loaded.dataset,
            out,
            fmt=args.format,
            score_threshold=args.score_threshold,
            max_detections=args.max_detections,
        )
    except RuntimeError as exc:
        raise JobError(str(exc)) from exc
    size = loaded.cfg.model.image_size
    check = engines.compare(out, loaded.model, loaded.cfg, check_images(size))
    mib = out.stat().st_size / 2**20
    print(
        f"wrote {out} ({args.format}, {mib:.1f} MiB): {loaded.label}, {len(loaded.dataset['class_names'])} "
        f"classes; input images uint8 [B, 3, {size}, {size}]; up to {meta['max_detections']} detections "
        f"per image scored above {float(meta['score_threshold']):g}"
    )
    if not check["same_labels"] or check["max_box_diff"] > 1e-3 * size:
        raise JobError(
            f"{out} does not match the torch model on {check['images']} built-in scenes (same labels: "
            f"{check['same_labels']}, largest box difference {check['max_box_diff']:.4f} px)"
        )
    print(
        f"checked on {check['images']} built-in scenes against the torch model: the same "
        f"{check['detections']} labels, boxes within {check['max_box_diff']:.2g} px"
    )
    return {"out": str(out), "metadata": meta, "check": check}


def main(argv: list[str] | None = None) -> None:
    run_job("export", DESCRIPTION, add_arguments, run, argv)


if __name__ == "__main__":
    main()
