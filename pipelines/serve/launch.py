"""The serving stage as `rayssd serve` runs it: deploy, track the deployment's life, stop.

`serve(ServeOptions)` loads the model, deploys the application (`deployments.start`), logs
one MLflow run for its life (the model version served as params, request counts, errors,
latency and batch sizes as metrics every `metrics_every` seconds) and blocks until Ctrl-C,
`duration` or the caller's `stop` event; then it logs the totals and removes the application
(others on the cluster keep running). `jobs/serve.py` only turns arguments into options.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from typing import Any

from pipelines.serve.settings import DEFAULT_NAME, ServeSettings
from ssd import config as C


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """What `rayssd serve` was asked for; None takes the model's ``serve`` config."""

    model: str  # checkpoint path or MLflow model URI (an alias is resolved once, at start)
    name: str = DEFAULT_NAME
    route_prefix: str = "/"
    host: str | None = None
    port: int | None = None
    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) detector replicas
    ingress_replicas: int = 1
    max_batch_size: int | None = None
    batch_wait_s: float | None = None
    max_request_bytes: int | None = None
    max_image_pixels: int | None = None
    detector_cpus: float = 1.0
    ingress_cpus: float = 0.5
    experiment: str = "rayssd-serve"
    metrics_every_s: float = 15.0
    duration_s: float | None = None  # None: until Ctrl-C or `stop`
    tracking_uri: str | None = None
    address: str | None = None

    def settings(self, serve_cfg: C.ServeConfig) -> ServeSettings:
        """The deployment's settings: these options over `serve_cfg`; ValueError naming a bad one."""
        return ServeSettings.from_config(
            serve_cfg,
            name=self.name,
            route_prefix=self.route_prefix,
            host=self.host,
            port=self.port,
            replicas=self.replicas,
            autoscale=self.autoscale,
            max_batch_size=self.max_batch_size,
            batch_wait_timeout_s=self.batch_wait_s,
            max_request_bytes=self.max_request_bytes,
            max_image_pixels=self.max_image_pixels,
            ingress_replicas=self.ingress_replicas,
            detector_cpus=self.detector_cpus,
            ingress_cpus=self.ingress_cpus,
        )


def serve(o: ServeOptions, stop: threading.Event | None = None) -> dict[str, Any]:
    """Deploy, log the MLflow run and block until Ctrl-C, `o.duration_s` or `stop` is set.
    Returns the URL, the model served, the MLflow run id and the totals (``stats``)."""
    from pipelines.common import start_ray
    from pipelines.serve import deployments
    from pipelines.serve.stats import PUSH_INTERVAL_S
    from pipelines.track.models import load_model

    if o.metrics_every_s <= 0 or (o.duration_s is not None and o.duration_s <= 0):
        raise ValueError("--metrics-every and --duration must be > 0 seconds")
    o.settings(C.ServeConfig())  # option errors before the model is even read
    model = load_model(o.model, tracking_uri=o.tracking_uri)  # so does a bad model
    settings = o.settings(model.cfg.serve)
    import ray

    if not ray.is_initialized() and not o.address:
        _check_port_free(settings.host, settings.port)  # a new local Ray cannot be serving there
    start_ray(o.address)
    label = model.label
    print(f"deploying {label} ({model.cfg.name}, {model.cfg.model.image_size}px) ...", flush=True)
    url = settings.url()
    metrics = _RunMetrics(_start_run(o, model, settings, url))  # a failed start is a FAILED run
    status, started = "FINISHED", False
    try:
        deployments.start(model, settings, tracking_uri=o.tracking_uri)
        started = True
        print(f"serving {label} at {url}  (API docs: {url}/docs)")
        raw = "-H 'Content-Type: image/jpeg' --data-binary @a.jpg"
        print(f"  curl -X POST '{url}/detect?score_threshold=0.3' {raw}")
        print(f"  curl -X POST {url}/detect -F file=@a.jpg", flush=True)
        if _serve_until_stopped(o, settings.name, metrics, stop or threading.Event()):
            status = "KILLED"  # Ctrl-C or SIGTERM: stopped, not failed
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        raise
    finally:
        summary = None
        if started:
            time.sleep(2 * PUSH_INTERVAL_S)  # the replicas' last numbers reach the board
            summary = deployments.stats(app=settings.name)  # totals over the deployment's life
            metrics.log(summary)
        metrics.tracker.end(status)
        deployments.shutdown(settings.name)
    return {"url": url, "model": label, "run_id": metrics.tracker.run_id, "stats": summary}


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ValueError(
                f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port"
            ) from None


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


def _start_run(o: ServeOptions, model, settings: ServeSettings, url: str):
    from pipelines.track.tracker import Tracker, tracking_uri

    tags = {**model.lineage_tags("serve"), "rayssd.url": url, "rayssd.app": settings.name}
    tracker = Tracker.start(
        uri=tracking_uri(o.tracking_uri),
        experiment=o.experiment,
        run_name=f"serve-{model.name or model.cfg.name}" + (f"-v{model.version}" if model.version else ""),
        tags=tags,
    )
    tracker.log_params(
        {
            **model.lineage_params(),
            **{f"serve.{k}": v for k, v in dataclasses.asdict(settings).items()},
        }
    )
    return tracker


def _serve_until_stopped(o: ServeOptions, app: str, metrics: _RunMetrics, stop: threading.Event) -> bool:
    """Log the metrics of the requests since the last report every `o.metrics_every_s`, until
    `stop`, --duration, Ctrl-C or SIGTERM; returns whether Ctrl-C or SIGTERM stopped it."""
    from pipelines.serve import deployments

    deadline = time.monotonic() + o.duration_s if o.duration_s else float("inf")
    cursor = deployments.stats(app=app)["cursor"]
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            stop.wait(min(o.metrics_every_s, max(0.0, deadline - time.monotonic())))
            summary = deployments.stats(after=cursor, app=app)  # every sample in exactly one report
            cursor = summary["cursor"]
            metrics.log(summary)
    except KeyboardInterrupt as exc:
        print(f"stopping ({exc or 'Ctrl-C'})", flush=True)
        return True
    return False
