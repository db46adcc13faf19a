"""`rayssd serve`: answer detection requests over HTTP with Ray Serve, tracked in MLflow.

Also runs as ``python -m jobs.serve --model URI`` (add ``--address auto`` for a running cluster).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import threading
import time
from typing import Any

from jobs.options import run_job

DESCRIPTION = """Serve a trained model over HTTP with Ray Serve: POST /detect takes an image
(raw JPEG/PNG/WebP/BMP body or a multipart upload; ?score_threshold=&max_detections=) and
answers JSON boxes in the image's own pixels, scores, labels and class names. GET /healthz,
GET /model, GET /stats, OpenAPI at /docs. A FastAPI ingress decodes and checks requests
(413 over the byte or pixel limit, 415 other types, 400/422 bad images) and sends the
requests that wait together to a separate detector deployment in one call (--max-batch-size,
--batch-wait-ms), which scales on its own (--replicas N or --autoscale MIN:MAX). --name and
--route-prefix put several models side by side on one cluster. MODEL is a checkpoint file (or a folder holding
checkpoint.pt), runs:/RUN_ID/PATH, models:/NAME@ALIAS or models:/NAME/VERSION; an alias is
resolved once at start. The deployment's life is one MLflow run (experiment rayssd-serve):
the model version served as params, request counts, errors by status, p50/p95/p99 latency
and batch sizes as metrics every --metrics-every seconds. Stop with Ctrl-C."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="URI", help="checkpoint path or MLflow model URI")
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


def _settings(args: argparse.Namespace, serve_cfg):
    from pipelines.serve.settings import ServeSettings

    return ServeSettings.from_config(
        serve_cfg,
        name=args.name,
        route_prefix=args.route_prefix,
        host=args.host,
        port=args.port,
        replicas=args.replicas,
        autoscale=_autoscale(args.autoscale),
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=None if args.batch_wait_ms is None else args.batch_wait_ms / 1000.0,
        max_request_bytes=None if args.max_request_mb is None else int(args.max_request_mb * 1024 * 1024),
        max_image_pixels=args.max_image_pixels,
        ingress_replicas=args.ingress_replicas,
        detector_cpus=args.detector_cpus,
        ingress_cpus=args.ingress_cpus,
    )


def _autoscale(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    low, sep, high = text.partition(":")
    if not sep or not low.strip().isdigit() or not high.strip().isdigit():
        raise ValueError(f"--autoscale {text!r}: expected MIN:MAX replicas, e.g. 1:4")
    return int(low), int(high)


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ValueError(
                f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port"
            ) from None


def run(args: argparse.Namespace, stop: threading.Event | None = None) -> dict[str, Any]:
    """Deploy, log the MLflow run and block until Ctrl-C, --duration or `stop` is set."""
    import ray

    from pipelines.serve import deployments as serving
    from pipelines.serve.stats import PUSH_INTERVAL_S
    from pipelines.track.models import load_model
    from ssd import config as C

    if args.metrics_every <= 0 or (args.duration is not None and args.duration <= 0):
        raise ValueError("--metrics-every and --duration must be > 0 seconds")
    _settings(args, C.ServeConfig())  # argument errors before the model is even read
    model = load_model(args.model, tracking_uri=args.tracking_uri)  # so does a bad model
    settings = _settings(args, model.cfg.serve)
    if not ray.is_initialized():
        if not args.address:
            _check_port_free(settings.host, settings.port)  # a new local Ray cannot be serving there
        ray.init(
            address=args.address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING
        )
    label = f"{model.name} v{model.version}" if model.name else model.uri
    print(f"deploying {label} ({model.cfg.name}, {model.cfg.model.image_size}px) ...", flush=True)
    url = settings.url()
    metrics = _RunMetrics(_start_run(args, model, settings, url))  # a failed start is a FAILED run
    status, started = "FINISHED", False
    try:
        serving.start(model, settings, tracking_uri=args.tracking_uri)
        started = True
        print(f"serving {label} at {url}  (API docs: {url}/docs)")
        raw = "-H 'Content-Type: image/jpeg' --data-binary @a.jpg"
        print(f"  curl -X POST '{url}/detect?score_threshold=0.3' {raw}")
        print(f"  curl -X POST {url}/detect -F file=@a.jpg", flush=True)
        _serve_until_stopped(args, settings.name, metrics, stop or threading.Event())
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        raise
    finally:
        summary = None
        if started:
            time.sleep(2 * PUSH_INTERVAL_S)  # the replicas' last numbers reach the board
            summary = serving.stats(app=settings.name)  # totals over the deployment's life
            metrics.log(summary)
        metrics.tracker.end(status)
        serving.shutdown(settings.name)
    return {"url": url, "model": label, "run_id": metrics.tracker.run_id, "stats": summary}


class _RunMetrics:
    """The serve run's metrics, one step per report."""

    def __init__(self, tracker) -> None:
        self.tracker = tracker
        self.step = 0

    def log(self, summary: dict[str, Any] | None) -> None:
        from pipelines.serve.stats import flat_metrics

        if summary is not None:
            self.tracker.log_metrics(flat_metrics(summary), step=self.step)
            self.step += 1


def _start_run(args: argparse.Namespace, model, settings, url: str):
    from dataclasses import asdict

    from pipelines.track.tracker import Tracker, tracking_uri

    tags = {
        "rayssd.job": "serve",
        "rayssd.model_uri": model.uri,
        "rayssd.url": url,
        "rayssd.app": settings.name,
    }
    if model.version:
        tags["rayssd.model_version"] = f"{model.name}/{model.version}"
    tracker = Tracker.start(
        uri=tracking_uri(args.tracking_uri),
        experiment=args.experiment,
        run_name=f"serve-{model.name or model.cfg.name}" + (f"-v{model.version}" if model.version else ""),
        tags=tags,
    )
    tracker.log_params(
        {
            "model.uri": model.uri,
            "model.name": model.name,
            "model.version": model.version,
            "model.run_id": model.run_id,
            "model.config": model.cfg.name,
            **{f"serve.{k}": v for k, v in asdict(settings).items()},
        }
    )
    return tracker


def _serve_until_stopped(
    args: argparse.Namespace, app: str, metrics: _RunMetrics, stop: threading.Event
) -> None:
    """Log the metrics of the requests since the last report every --metrics-every seconds;
    Ctrl-C stops."""
    from pipelines.serve import deployments as serving

    deadline = time.monotonic() + args.duration if args.duration else float("inf")
    cursor = serving.stats(app=app)["cursor"]
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            stop.wait(min(args.metrics_every, max(0.0, deadline - time.monotonic())))
            summary = serving.stats(after=cursor, app=app)  # every sample in exactly one report
            cursor = summary["cursor"]
            metrics.log(summary)
    except KeyboardInterrupt:
        print("stopping", flush=True)


def main(argv: list[str] | None = None) -> None:
    run_job("serve", DESCRIPTION, add_arguments, run, argv)


if __name__ == "__main__":
    main()
