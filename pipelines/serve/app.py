"""The `rayssd serve` application as a Ray Serve application builder, for Serve config files.

Serve calls `build` with the ``args`` of the config (or of the command line) and deploys the
application it returns: the same ingress and batching detector as `rayssd serve`
(`pipelines.serve.deployments.build_app`), reporting to the same stats board (``GET /stats``).

    serve run pipelines.serve.app:build model=models:/rayssd-tiny@champion max_batch_size=16

On Kubernetes, a KubeRay RayService names it in ``spec.serveConfigV2`` (see deploy/rayservice.yaml)::

    applications:
      - name: rayssd
        route_prefix: /
        import_path: pipelines.serve.app:build
        args: {model: "models:/rayssd-tiny@champion", max_batch_size: 16, autoscale: "1:4"}

Keys of ``args`` (values may be strings, as ``serve run key=value`` passes them): ``model``
(required: a checkpoint path or an MLflow model URI, as for `pipelines.track.models.load_model`;
an alias is resolved once, here), ``tracking_uri`` (default ``$MLFLOW_TRACKING_URI``),
``name`` (the application's name in the Serve config, default ``rayssd``: it names the
application's own stats board) and the `SETTINGS` below, named as `rayssd serve`'s options;
the rest come from the model's own ``serve`` config. HTTP host and port belong to the Serve
config's ``http_options``, the route prefix to its application entry. Unlike `rayssd serve`,
no MLflow run records the deployment: Serve, not a driver, owns its life.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import ray
from ray import serve

from pipelines.serve.deployments import build_app, stats_board
from pipelines.serve.settings import ServeSettings
from pipelines.track.models import load_model
from pipelines.track.tracker import tracking_uri as resolve_tracking_uri

log = logging.getLogger(__name__)


def _whole(value: Any) -> int:
    return int(str(value).strip())  # "4" and 4, but not 4.5 truncated to 4


def _min_max(value: Any) -> tuple[int, int]:
    low, high = value.split(":") if isinstance(value, str) else value
    return _whole(low), _whole(high)


# args key -> (ServeSettings field, conversion, what is expected)
SETTINGS: dict[str, tuple[str, Callable[[Any], Any], str]] = {
    "replicas": ("replicas", _whole, "an integer number of detector replicas"),
    "autoscale": ("autoscale", _min_max, 'detector replicas as "MIN:MAX" or [MIN, MAX]'),
    "ingress_replicas": ("ingress_replicas", _whole, "an integer number of ingress replicas"),
    "max_batch_size": ("max_batch_size", _whole, "an integer number of images per batch"),
    "batch_wait_ms": ("batch_wait_timeout_s", lambda v: float(v) / 1000.0, "milliseconds"),
    "max_request_mb": ("max_request_bytes", lambda v: int(float(v) * 1024 * 1024), "MiB"),
    "max_image_pixels": ("max_image_pixels", _whole, "an integer number of pixels"),
    "detector_cpus": ("detector_cpus", float, "CPUs per detector replica"),
    "ingress_cpus": ("ingress_cpus", float, "CPUs per ingress replica"),
}
KEYS = ("model", "tracking_uri", "name", *SETTINGS)


def settings_overrides(args: dict[str, Any]) -> dict[str, Any]:
    """The `ServeSettings` fields given in `args`; ValueError naming a missing, unknown or bad key."""
    unknown = sorted(set(args) - set(KEYS))
    if unknown:
        raise ValueError(f"serve_app args: unknown key(s) {', '.join(unknown)}; expected {', '.join(KEYS)}")
    if not args.get("model"):
        raise ValueError(
            "serve_app args: 'model' is required: a checkpoint path or an MLflow model URI, "
            "e.g. model=models:/rayssd-tiny@champion"
        )
    overrides = {"name": str(args["name"])} if args.get("name") is not None else {}
    for key, (field, convert, expected) in SETTINGS.items():
        if args.get(key) is None:
            continue
        try:
            overrides[field] = convert(args[key])
        except (TypeError, ValueError):
            raise ValueError(f"serve_app args: {key}={args[key]!r} is not {expected}") from None
    return overrides


def build(args: dict[str, Any]) -> serve.Application:
    """The detection application for Serve's ``args`` (see the module docstring)."""
    overrides = settings_overrides(args)  # refuse bad arguments before reading the model
    tracking = resolve_tracking_uri(args.get("tracking_uri"))  # one store for every replica
    model = load_model(str(args["model"]), tracking_uri=tracking)
    settings = ServeSettings.from_config(model.cfg.serve, **overrides)
    if not ray.is_initialized():
        # `serve run IMPORT_PATH` builds before it connects; connect as it would ($RAY_ADDRESS,
        # else this machine's running cluster, else a new local one) so the board lives there.
        ray.init(logging_level=logging.WARNING)
    log.info("building the rayssd application for %s with %s", model.uri, settings)
    return build_app(model, settings, stats_board(settings.name, create=True), tracking)
