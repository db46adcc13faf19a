"""Online detection on Ray Serve: a FastAPI ingress bound to a batching detector (STYLE §8).

    client ─HTTP─► Serve proxy ─► Ingress (FastAPI, N replicas) ─handle─► Detector (M replicas)

The ingress checks the request, decodes the image and resizes it to the model's input
(`ssd.image.network_input`, as `rayssd evaluate` does), then hands uint8 [3, S, S] and the
original (height, width) to its `pipelines.serve.coalesce.Coalescer`, the one owner of
batching: it sends the requests that queued together to the detector in one call of at most
``max_batch_size`` images, waiting up to ``batch_wait_timeout_s`` for a fuller batch while
other calls are in flight (both retunable through the ingress's ``user_config``). The
detector runs each call through `LoadedModel.detector` (torch, weights in the layout
`ssd.layout` measured faster on this machine, or ONNX Runtime) as it comes. Decoding and
detection scale apart.

HTTP contract (every answer is JSON; errors are ``{"error": message, "status": code}``):

``POST /detect`` — the image as the raw body (``Content-Type`` one of `ACCEPTED_TYPES`;
``application/octet-stream`` or none: the format is read from the bytes) or as the one file
part of a ``multipart/form-data`` body. Query: ``score_threshold`` in [0, 1) (default
`DEFAULT_SCORE_THRESHOLD`), ``max_detections`` in 1..`MAX_DETECTIONS` (default the model's).

* 200 ``boxes`` [[x1, y1, x2, y2], ...] in the uploaded image's pixels as displayed (its EXIF
  orientation applied, as in training), ``scores`` descending, ``labels`` 1..K, ``names``,
  ``category_ids``, ``image`` {width, height}, ``model`` {name, version, uri} and the
  ``score_threshold`` / ``max_detections`` applied;
* 400 empty body, bytes that are no image, a malformed multipart body;
* 413 a body over ``max_request_bytes`` (Content-Length or actual bytes) or an image over
  ``max_image_pixels`` (checked from the header, before decoding);
* 415 a content type, multipart part type or image format outside `ACCEPTED_TYPES`;
* 422 corrupt or truncated image data, a bad query parameter;
* 503 no detector replica answered (one is being replaced): retry.

``GET /healthz`` (200 when a detector replica answers, else 503), ``GET /model`` (name,
version, config, classes, serving settings), ``GET /stats`` (`StatsBoard.summary`), and the
OpenAPI page at ``/docs``.
"""

# No `from __future__ import annotations` here: FastAPI reads the route methods' annotations
# (`request: Request`) after Serve rewrites their signatures, and strings do not resolve there.
import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipelines.serve.coalesce import CallCancelledError, Coalescer
from pipelines.serve.requests import (
    ACCEPTED_TYPES,
    DEFAULT_SCORE_THRESHOLD,
    MAX_DETECTIONS,
    RequestError,
    detect_params,
    image_bytes,
    prepare,
)
from pipelines.serve.settings import DEFAULT_NAME, ServeSettings
from pipelines.serve.stats import Reporter, StatsBoard
from ssd import config as C

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

    from pipelines.track.models import LoadedModel

log = logging.getLogger(__name__)

APP_NAME = DEFAULT_NAME  # the application `rayssd serve` deploys unless given --name
HEALTH_TIMEOUT_S = 5.0
INGRESS_MAX_ONGOING = 128  # the ingress mostly awaits the detector; let it hold many requests
DETECTOR_QUEUE_CALLS = 64  # calls a detector replica accepts (queued behind the one it runs)
# Detector calls an ingress replica keeps in flight per detector replica: one running, the next
# one queued there. Also the autoscaling target: every slot full means every replica is busy.
CALLS_PER_DETECTOR = 2
# A detector replica died, is being replaced, or every replica's queue is full: the client may retry.
UNAVAILABLE = (
    ray.exceptions.RayActorError,
    serve.exceptions.DeploymentUnavailableError,
    serve.exceptions.ReplicaUnavailableError,
    serve.exceptions.BackPressureError,
    CallCancelledError,
)


# --- deployments ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectRequest:
    image: np.ndarray  # uint8 [3, S, S]
    size: tuple[int, int]  # original (height, width), pixels
    score_threshold: float
    max_detections: int


def select(found: dict[str, torch.Tensor], score_threshold: float, max_detections: int) -> dict:
    """One image's detections at a stricter threshold and count, as numpy arrays.

    Equal to running the post-processing with these settings: candidates above a threshold
    are a top-k prefix per class, greedy NMS only lets higher scores suppress lower ones,
    and detections come in descending score order (exact up to ties between equal scores).
    """
    keep = found["scores"] > score_threshold
    return {k: v[keep][:max_detections].numpy() for k, v in found.items()}


@serve.deployment(name="Detector")
class BatchedDetector:
    """The model, once per replica. Each `detect` call carries a list of images (an ingress's
    coalesced requests) and runs through `Detector` as one batch."""

    def __init__(self, model_uri: str, tracking_uri: str | None, threads: int, board: Any) -> None:
        from pipelines.track.models import load_model

        torch.set_num_threads(threads)  # a replica owns its CPUs
        loaded = load_model(model_uri, tracking_uri=tracking_uri)
        self.detector = loaded.detector(threads=threads)
        self.reporter = Reporter(board)
        # Torch runs off the event loop, so the replica keeps taking calls while one runs.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rayssd-detect")

    def ping(self) -> bool:
        return True

    async def detect(self, requests: list[DetectRequest]) -> list[dict[str, np.ndarray]]:
        """Detections of each image: ``boxes`` float32 [K, 4] xyxy original pixels, ``scores``
        float32 [K] descending, ``labels`` int64 [K] in 1..num_classes-1."""
        self.reporter.ensure_running()
        found = await asyncio.get_running_loop().run_in_executor(self._pool, self._run, requests)
        self.reporter.recorder.batch(len(requests))
        return found

    def _run(self, requests: list[DetectRequest]) -> list[dict[str, np.ndarray]]:
        """One `Detector` call on these images (uint8 [B, 3, S, S] once stacked)."""
        images = torch.from_numpy(np.stack([r.image for r in requests]))
        # One call at the loosest settings, then each request's own (see `select`).
        found = self.detector(
            images,
            [r.size for r in requests],
            score_threshold=min(r.score_threshold for r in requests),
            max_detections=max(r.max_detections for r in requests),
        )
        return [select(f, r.score_threshold, r.max_detections) for f, r in zip(found, requests)]


app = FastAPI(
    title="rayssd",
    summary="SSD object detection on Ray Serve",
    description=__doc__.split("HTTP contract", 1)[1].split("\n", 2)[2],
)

_DETECT_OPENAPI = {
    "parameters": [
        {
            "name": "score_threshold",
            "in": "query",
            "required": False,
            "schema": {
                "type": "number",
                "minimum": 0,
                "exclusiveMaximum": 1,
                "default": DEFAULT_SCORE_THRESHOLD,
            },
        },
        {
            "name": "max_detections",
            "in": "query",
            "required": False,
            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_DETECTIONS},
        },
    ],
    "requestBody": {
        "required": True,
        "content": {
            **{t: {"schema": {"type": "string", "format": "binary"}} for t in ACCEPTED_TYPES},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
        },
    },
}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error(422, str(exc.errors()))


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    """Checks, decodes and resizes on this replica; detection goes to the detector handle."""

    def __init__(self, detector: "DeploymentHandle", info: dict[str, Any], board: Any) -> None:
        # Calls go over the gRPC server every Serve replica runs for calls between deployments,
        # not as Ray actor tasks: 1-client latency 35-39 ms against 38-48 ms, 32-client
        # throughput 0.79-0.99 against 0.78-0.89 of the direct call (bench_serve, 2 cores,
        # three rounds each, together with the proxy's gRPC: pipelines.common.LOCAL_RAY_ENV).
        self.detector = detector.options(_by_reference=False)
        self.info = info
        self.limits = info["serving"]
        self.reporter = Reporter(board)
        self.board = board
        # Decoding off the event loop; PIL releases the GIL while it decodes.
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="rayssd-decode")
        replicas = self.limits["autoscale"][1] if self.limits["autoscale"] else self.limits["replicas"]
        self._batches = Coalescer(
            self._send,
            max_items=self.limits["max_batch_size"],
            max_in_flight=CALLS_PER_DETECTOR * max(1, replicas),
            max_wait_s=self.limits["batch_wait_timeout_s"],
        )

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """``{"max_batch_size": int, "batch_wait_timeout_s": float}``: the batches this replica
        sends from its next call on, applied without a restart."""
        self._batches.retune(int(user_config["max_batch_size"]), float(user_config["batch_wait_timeout_s"]))

    async def _send(self, requests: list[DetectRequest]) -> list[dict[str, np.ndarray]]:
        return await self.detector.detect.remote(requests)

    @app.post("/detect", openapi_extra=_DETECT_OPENAPI)
    async def detect(self, request: Request) -> JSONResponse:
        start, status = time.perf_counter(), 500
        self.reporter.ensure_running()
        try:
            body = await self._detect(request)
            status = 200
            return JSONResponse(body)
        except RequestError as exc:
            status = exc.status
            return _error(exc.status, exc.message)
        except UNAVAILABLE as exc:
            status = 503
            log.warning("detector unavailable: %s", exc)
            return _error(503, "no detector replica is available right now (one is restarting); retry")
        except Exception:
            log.exception("detect failed")  # a bug: the client gets JSON, the log the traceback
            return _error(500, "internal error while detecting; see the server log")
        finally:
            self.reporter.recorder.request(status, time.perf_counter() - start)

    async def _detect(self, request: Request) -> dict[str, Any]:
        default_max = self.info["config"]["inference"]["max_detections"]
        threshold, most = detect_params(request.query_params, default_max)
        data = await image_bytes(request, self.limits["max_request_bytes"])
        loop = asyncio.get_running_loop()
        image, (height, width) = await loop.run_in_executor(
            self._pool, prepare, data, self.limits["max_image_pixels"], self.info["input_size"]
        )
        found = await self._batches.submit(DetectRequest(image, (height, width), threshold, most))
        labels = found["labels"].tolist()
        return {
            "boxes": found["boxes"].tolist(),
            "scores": found["scores"].tolist(),
            "labels": labels,
            "names": [self.info["class_names"][k - 1] for k in labels],
            "category_ids": [self.info["category_ids"][k - 1] for k in labels],
            "image": {"width": width, "height": height},
            "model": {k: self.info[k] for k in ("name", "version", "uri")},
            "score_threshold": threshold,
            "max_detections": most,
        }

    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        async def ping() -> bool:
            return await self.detector.ping.remote()

        try:
            await asyncio.wait_for(ping(), HEALTH_TIMEOUT_S)
        except (asyncio.TimeoutError, *UNAVAILABLE):  # not builtin TimeoutError before 3.11
            return _error(503, f"no detector replica answered within {HEALTH_TIMEOUT_S:g} s")
        return JSONResponse({"status": "ok", "model": {k: self.info[k] for k in ("name", "version", "uri")}})

    @app.get("/model")
    async def model(self) -> dict[str, Any]:
        classes = [
            {"label": k, "name": name, "category_id": cid}
            for k, (name, cid) in enumerate(zip(self.info["class_names"], self.info["category_ids"]), 1)
        ]
        keys = ("name", "version", "uri", "run_id", "input_size", "config", "serving")
        return {**{k: self.info[k] for k in keys}, "classes": classes, "accepted_types": list(ACCEPTED_TYPES)}

    @app.get("/stats")
    async def stats(self, window_s: float | None = None) -> dict[str, Any]:
        return await self.board.summary.remote(window_s)


# --- the driver's side ---------------------------------------------------------------------


def model_info(model: "LoadedModel", uri: str, settings: ServeSettings) -> dict[str, Any]:
    """What the ingress tells clients about the model (plain values, JSON-safe)."""
    return {
        "name": model.name,
        "version": model.version,
        "uri": uri,
        "run_id": model.run_id,
        "input_size": model.cfg.model.image_size,
        "config": C.to_dict(model.cfg),
        "class_names": list(model.dataset["class_names"]),
        "category_ids": [int(c) for c in model.dataset["category_ids"]],
        "serving": asdict(settings),
    }


def build_app(model: "LoadedModel", settings: ServeSettings, board: Any, tracking_uri: str | None = None):
    """The Serve application (ingress bound to detector) for a loaded model."""
    from pipelines.track.models import pinned_uri

    uri = pinned_uri(model)  # an alias that moves later must not change what new replicas load
    s = settings
    scaling: dict[str, Any] = {"num_replicas": s.replicas}
    if s.autoscale is not None:
        low, high = s.autoscale
        scaling = {
            "autoscaling_config": {
                "min_replicas": low,
                "initial_replicas": max(low, 1),
                "max_replicas": high,
                # Ongoing requests are the ingresses' calls, each a batch: the replicas are all
                # busy when every call slot is full (Ingress's Coalescer).
                "target_ongoing_requests": CALLS_PER_DETECTOR,
            }
        }
    detector = BatchedDetector.options(
        **scaling,
        # Calls beyond a replica's max_ongoing_requests wait in the caller's router, which
        # retries with backoff of up to 0.5 s (Serve 2.60): the replica idles while they wait.
        # Queue them in the replica instead (several ingress replicas each keep
        # CALLS_PER_DETECTOR calls per detector replica in flight).
        max_ongoing_requests=DETECTOR_QUEUE_CALLS,
        ray_actor_options={"num_cpus": s.detector_cpus},
        logging_config={"enable_access_log": False},  # a line per internal call; the ingress logs requests
    ).bind(uri, tracking_uri, max(1, int(s.detector_cpus)), board)
    return Ingress.options(
        num_replicas=s.ingress_replicas,
        max_ongoing_requests=INGRESS_MAX_ONGOING,
        user_config={"max_batch_size": s.max_batch_size, "batch_wait_timeout_s": s.batch_wait_timeout_s},
        ray_actor_options={"num_cpus": s.ingress_cpus},
    ).bind(detector, model_info(model, uri, settings), board)


def board_name(app: str = APP_NAME) -> str:
    """The stats board actor of application `app`: one per application, so that stopping or
    redeploying one leaves the others' statistics alone."""
    return f"rayssd-serve-stats-{app}"


def stats_board(app: str = APP_NAME, create: bool = False) -> Any:
    """Application `app`'s board actor (created detached and reset with `create`), or None
    when there is none."""
    from pipelines.common import ACTOR_NAMESPACE

    if create:
        board = (
            ray.remote(num_cpus=0)(StatsBoard)
            .options(name=board_name(app), namespace=ACTOR_NAMESPACE, lifetime="detached", get_if_exists=True)
            .remote()
        )
        ray.get(board.reset.remote())
        return board
    try:
        return ray.get_actor(board_name(app), namespace=ACTOR_NAMESPACE)
    except ValueError:
        return None


def start(
    model: "LoadedModel",
    settings: ServeSettings,
    *,
    tracking_uri: str | None = None,
    timeout_s: float = 180.0,
) -> str:
    """Deploy `model` as application ``settings.name`` at ``settings.route_prefix`` on the
    connected Ray cluster and return its URL once ``/healthz`` answers there. Other
    applications keep running. Raises ValueError when it does not answer (e.g. Serve already
    runs on this cluster with another host or port: its HTTP options cannot change)."""
    serve.start(http_options={"host": settings.host, "port": settings.port})
    board = stats_board(settings.name, create=True)
    app = build_app(model, settings, board, tracking_uri)
    serve.run(app, name=settings.name, route_prefix=settings.route_prefix)
    url = settings.url()
    wait_until_healthy(url, timeout_s)
    return url


def deploy(
    model_uri: str,
    *,
    name: str | None = None,
    route_prefix: str | None = None,
    host: str | None = None,
    port: int | None = None,
    replicas: int = 1,
    autoscale: tuple[int, int] | None = None,
    max_batch_size: int | None = None,
    batch_wait_timeout_s: float | None = None,
    max_request_bytes: int | None = None,
    max_image_pixels: int | None = None,
    ingress_replicas: int = 1,
    detector_cpus: float = 1.0,
    ingress_cpus: float = 0.5,
    tracking_uri: str | None = None,
) -> str:
    """Load `model_uri` (`pipelines.track.models.load_model`), deploy it and return the URL; returns
    once it answers. Settings left None come from the model's own ``serve`` config."""
    from pipelines.track.models import load_model

    model = load_model(model_uri, tracking_uri=tracking_uri)
    settings = ServeSettings.from_config(
        model.cfg.serve,
        name=name,
        route_prefix=route_prefix,
        host=host,
        port=port,
        replicas=replicas,
        autoscale=autoscale,
        max_batch_size=max_batch_size,
        batch_wait_timeout_s=batch_wait_timeout_s,
        max_request_bytes=max_request_bytes,
        max_image_pixels=max_image_pixels,
        ingress_replicas=ingress_replicas,
        detector_cpus=detector_cpus,
        ingress_cpus=ingress_cpus,
    )
    return start(model, settings, tracking_uri=tracking_uri)


def wait_until_healthy(url: str, timeout_s: float) -> None:
    import requests

    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            response = requests.get(f"{url}/healthz", timeout=HEALTH_TIMEOUT_S + 2)
            if response.status_code == 200 and response.json().get("status") == "ok":
                return
            last = f"HTTP {response.status_code}: {response.text[:200]}"
        except requests.RequestException as exc:
            last = type(exc).__name__
        time.sleep(0.5)
    raise ValueError(
        f"the application did not answer healthy at {url}/healthz within {timeout_s:g} s ({last}); "
        "if Serve already runs on this cluster with another host or port, use those or shut it down"
    )


def stats(
    window_s: float | None = None, after: list | None = None, app: str = APP_NAME
) -> dict[str, Any] | None:
    """`StatsBoard.summary` of application `app`, or None when it is not deployed."""
    board = stats_board(app)
    return None if board is None else ray.get(board.summary.remote(window_s, after))


def shutdown(app: str = APP_NAME) -> None:
    """Delete application `app` and its stats board; stop Serve when no application is left."""
    if app in serve.status().applications:
        serve.delete(app)
    if not serve.status().applications:
        serve.shutdown()
    board = stats_board(app)
    if board is not None:
        ray.kill(board)
