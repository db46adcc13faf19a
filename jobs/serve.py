"""`rayssd serve`: arguments → `ServeOptions` → `pipelines.serve.launch.serve`, which answers
detection requests over HTTP with Ray Serve, tracked in MLflow.

Also runs as ``python -m jobs.serve --model URI`` (add ``--address auto`` for a running cluster).
"""

from __future__ import annotations

import argparse
import os
import threading
from typing import Any

from jobs.options import run_job
from pipelines.serve.launch import ServeOptions, serve

DESCRIPTION = """Serve a trained model over HTTP with Ray Serve: POST /detect takes an image
(raw JPEG/PNG/WebP/BMP body or a multipart upload; ?score_threshold=&max_detections=) and
answers JSON boxes in the image's own pixels, scores, labels and class names. GET /healthz,
GET /model, GET /stats, OpenAPI at /docs. A FastAPI ingress decodes and checks requests
(413 over the byte or pixel limit, 415 other types, 400/422 bad images) and sends the
requests that wait together to a separate detector deployment in one call (--max-batch-size,
--batch-wait-ms), which scales on its own (--replicas N or --autoscale MIN:MAX). --name and
--route-prefix put several models side by side on one cluster. MODEL is a checkpoint file (or
a folder holding checkpoint.pt), runs:/RUN_ID/PATH, models:/NAME@ALIAS or models:/NAME/VERSION
(an alias is resolved once at start), or an ONNX file from `rayssd export`, which the detector
replicas run on ONNX Runtime. The deployment's life is one MLflow run (experiment rayssd-serve):
the model version served as params, request counts, errors by status, p50/p95/p99 latency
and batch sizes as metrics every --metrics-every seconds. Stop with Ctrl-C."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        metavar="URI",
        help="checkpoint path, MLflow model URI or ONNX file from rayssd export",
    )
    parser.add_argument(
        "--name",
        default="rayssd",
        help="Serve application name (default: rayssd); applications of other names on the same "
        "cluster keep running, each with its own statistics",
    )
    parser.add_argument(
        "--route-prefix",
        default="/",
        metavar="/PREFIX",
        help="serve under /PREFIX/detect, /PREFIX/healthz, ... (default: /); give each application "
        "on one cluster its own",
    )
    parser.add_argument(
        "--host", help="address to listen on (default: serve.host of the model's config, 127.0.0.1)"
    )
    parser.add_argument(
        "--port", type=int, help="HTTP port (default: serve.port of the model's config, 8000)"
    )
    scaling = parser.add_mutually_exclusive_group()
    scaling.add_argument(
        "--replicas", type=int, default=1, metavar="N", help="detector replicas (default: 1)"
    )
    scaling.add_argument(
        "--autoscale", metavar="MIN:MAX", help="autoscale detector replicas between MIN and MAX"
    )
    parser.add_argument(
        "--ingress-replicas", type=int, default=1, metavar="N", help="decoding ingress replicas (default: 1)"
    )
    parser.add_argument(
        "--max-batch-size", type=int, metavar="N", help="images per detector batch (default: serve config, 8)"
    )
    parser.add_argument(
        "--batch-wait-ms",
        type=float,
        metavar="MS",
        help="longest wait for a batch to fill while other batches run, milliseconds; an idle server "
        "sends at once (default: serve config, 10)",
    )
    parser.add_argument(
        "--max-request-mb",
        type=float,
        metavar="MB",
        help="largest request body, MiB (default: serve config, 10)",
    )
    parser.add_argument(
        "--max-image-pixels", type=int, metavar="N", help="largest image, pixels (default: serve config, 40M)"
    )
    parser.add_argument(
        "--detector-cpus",
        type=float,
        default=1.0,
        help="CPUs (and torch threads) per detector replica (default: 1)",
    )
    parser.add_argument(
        "--ingress-cpus", type=float, default=0.5, help="CPUs per ingress replica (default: 0.5)"
    )
    parser.add_argument(
        "--experiment", default="rayssd-serve", help="MLflow experiment for the run (default: rayssd-serve)"
    )
    parser.add_argument(
        "--metrics-every",
        type=float,
        default=15.0,
        metavar="S",
        help="seconds between MLflow metrics (default: 15)",
    )
    parser.add_argument("--duration", type=float, metavar="S", help="stop after S seconds (default: Ctrl-C)")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI for models:/ URIs and the run (default: $MLFLOW_TRACKING_URI)",
    )
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)",
    )


def options(args: argparse.Namespace) -> ServeOptions:
    """The parsed arguments, typed."""
    return ServeOptions(
        model=args.model,
        name=args.name,
        route_prefix=args.route_prefix,
        host=args.host,
        port=args.port,
        replicas=args.replicas,
        autoscale=_autoscale(args.autoscale),
        ingress_replicas=args.ingress_replicas,
        max_batch_size=args.max_batch_size,
        batch_wait_s=None if args.batch_wait_ms is None else args.batch_wait_ms / 1000.0,
        max_request_bytes=None if args.max_request_mb is None else int(args.max_request_mb * 1024 * 1024),
        max_image_pixels=args.max_image_pixels,
        detector_cpus=args.detector_cpus,
        ingress_cpus=args.ingress_cpus,
        experiment=args.experiment,
        metrics_every_s=args.metrics_every,
        duration_s=args.duration,
        tracking_uri=args.tracking_uri,
        address=args.address,
    )


def _autoscale(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    low, sep, high = text.partition(":")
    if not sep or not low.strip().isdigit() or not high.strip().isdigit():
        raise ValueError(f"--autoscale {text!r}: expected MIN:MAX replicas, e.g. 1:4")
    return int(low), int(high)


def run(args: argparse.Namespace, stop: threading.Event | None = None) -> dict[str, Any]:
    """Deploy, log the MLflow run and block until Ctrl-C, --duration or `stop` is set."""
    return serve(options(args), stop=stop)


def main(argv: list[str] | None = None) -> None:
    run_job("serve", DESCRIPTION, add_arguments, run, argv)


if __name__ == "__main__":
    main()
