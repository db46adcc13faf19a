"""`rayssd serve` on a real local Ray with real HTTP: a tiny model registered in a real MLflow
server is served by alias; answers equal the model called directly, concurrent requests are
batched, every bad input gets its status and a JSON error, a killed detector replica is
replaced, and the deployment's MLflow run names the version served."""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
from PIL import Image, ImageOps

from jobs import serve as serve_job
from pipelines.serve.deployments import select
from pipelines.serve.requests import DEFAULT_SCORE_THRESHOLD
from pipelines.serve.stats import PUSH_INTERVAL_S, StatsBoard, flat_metrics
from pipelines.track.models import load_model
from pipelines.track.registry import log_model
from pipelines.track.tracker import Tracker
from ssd import checkpoint, export
from ssd import config as C
from ssd.detector import Detector
from ssd.model import build_ssd
from ssd.transforms import eval_transform
from tests.ports import free_port
from tests.ssd.test_image import corrupt_png

REGISTERED = "serve-test"
EXPERIMENT = "test-serve"
MAX_REQUEST_BYTES = 256 * 1024  # --max-request-mb 0.25
MAX_IMAGE_PIXELS = 250_000
BATCH = 4
CLASSES = {"class_names": ["a", "b"], "category_ids": [3, 5]}
QUERY = {"score_threshold": "0.05", "max_detections": "20"}


def _encoded(pixels: np.ndarray, fmt: str, orientation: int = 1) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation  # EXIF Orientation, as a phone writes it
    Image.fromarray(pixels).save(buf, fmt, exif=exif)
    return buf.getvalue()


def _scene(seed: int, height: int, width: int) -> np.ndarray:
    """Smooth blobs on noise: uint8 [H, W, 3] (JPEG keeps it recognisable)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, (height, width, 3)).astype(np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, height - 20), rng.integers(0, width - 20)
        pixels[y : y + rng.integers(10, height // 2), x : x + rng.integers(10, width // 2)] = rng.integers(
            100, 255, 3
        )
    return pixels


IMAGES = {
    "jpeg": (_encoded(_scene(0, 150, 200), "JPEG"), "image/jpeg"),
    "png": (_encoded(_scene(1, 311, 97), "PNG"), "image/png"),
    "webp": (_encoded(_scene(2, 64, 64), "WEBP"), "image/webp"),
    # Stored 200 wide and 150 high, shown turned a quarter: 150 wide and 200 high.
    "upright phone jpeg": (_encoded(_scene(3, 150, 200), "JPEG", orientation=6), "image/jpeg"),
    # Over twice the input on both sides: decoded at half scale, answered in its own pixels.
    "large jpeg": (_encoded(_scene(4, 420, 560), "JPEG"), "image/jpeg"),
}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> str:
    """A tiny 2-class SSD with seeded random weights, as an inference checkpoint file."""
    cfg = C.override(C.preset("tiny"), ["model.num_classes=3"])
    torch.manual_seed(0)
    ckpt = checkpoint.make_checkpoint(
        build_ssd(cfg).eval(), cfg, CLASSES, epoch=1, step=1, metrics={"map": 0.5}
    )
    return str(checkpoint.save(checkpoint.for_inference(ckpt), tmp_path_factory.mktemp("serve-model")))


@pytest.fixture(scope="module")
def champion(mlflow_server, model_file) -> str:
    """The model registered as REGISTERED version 1 holding @champion; returns its alias URI."""
    tracker = Tracker.start(uri=mlflow_server, experiment="test-serve-train", run_name="to-serve")
    outcome = log_model(tracker, model_file, register_as=REGISTERED)
    tracker.end()
    assert outcome is not None and (outcome.version, outcome.champion) == ("1", True)
    return f"models:/{REGISTERED}@champion"


class Server:
    """`jobs.serve.run` in a thread, as `rayssd serve` runs it; `stop()` ends it like Ctrl-C."""

    def __init__(self, argv: list[str]) -> None:
        parser = argparse.ArgumentParser()
        serve_job.add_arguments(parser)
        self.args = parser.parse_args(argv)
        prefix = "" if self.args.route_prefix == "/" else self.args.route_prefix
        self.url = f"http://127.0.0.1:{self.args.port}{prefix}"
        self.result: dict | None = None
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.result = serve_job.run(self.args, stop=self._stop)
        except BaseException as exc:
            self.error = exc

    def start(self, timeout_s: float = 240.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self._thread.is_alive():
            try:
                if requests.get(f"{self.url}/healthz", timeout=10).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1.0)
        raise AssertionError(f"server did not come up: {self.error!r}")

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(timeout=120)
        assert not self._thread.is_alive() and self.error is None, self.error
        return self.result


@pytest.fixture(scope="module")
def server(ray_local, mlflow_server, champion):
    s = Server(
        [
            *("--model", champion, "--tracking-uri", mlflow_server, "--experiment", EXPERIMENT),
            *("--port", str(free_port()), "--max-batch-size", str(BATCH), "--batch-wait-ms", "50"),
            *(
                "--max-request-mb",
                str(MAX_REQUEST_BYTES / 2**20),
                "--max-image-pixels",
                str(MAX_IMAGE_PIXELS),
            ),
            *("--detector-cpus", "0.5", "--ingress-cpus", "0.25", "--metrics-every", "1"),
        ]
    )
    s.start()
    yield s
    if s._thread.is_alive():
        s.stop()


def _direct(model_file: str, data: bytes, threshold: float, most: int) -> dict[str, np.ndarray]:
    """The oracle: decode with PIL, resize with `eval_transform`, one `Detector` call at batch 1
    with the detector replica's settings (one torch thread, the weight layout `ssd.layout`
    chose for it: the session's layout cache is shared)."""
    loaded = load_model(model_file)
    size = loaded.cfg.model.image_size
    shown = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).size  # (W, H) as displayed
    with Image.open(io.BytesIO(data)) as image:
        image.draft(None, (size, size))  # a JPEG at libjpeg's scale that keeps both sides >= size
        pixels = np.array(ImageOps.exif_transpose(image).convert("RGB"))  # [h, w, 3] shown
    resized, _ = eval_transform(pixels, np.zeros((0, 4), np.float32), size)
    images = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))[None]  # [1, 3, S, S]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        detector = Detector(loaded.model, loaded.cfg, channels_last=None)
        [found] = detector(images, [shown[::-1]], threshold, most)
    finally:
        torch.set_num_threads(threads)
    return {k: v.numpy() for k, v in found.items()}


def _assert_equal_to_direct(answer: dict, expected: dict[str, np.ndarray]) -> None:
    assert answer["labels"] == expected["labels"].tolist()
    np.testing.assert_allclose(answer["boxes"], expected["boxes"].reshape(-1, 4), atol=1e-3)
    np.testing.assert_allclose(answer["scores"], expected["scores"], atol=1e-5)
    assert answer["names"] == [CLASSES["class_names"][k - 1] for k in answer["labels"]]
    assert answer["category_ids"] == [CLASSES["category_ids"][k - 1] for k in answer["labels"]]


def _detect(url: str, data: bytes, content_type: str, **kwargs) -> requests.Response:
    return requests.post(
        f"{url}/detect", data=data, headers={"Content-Type": content_type}, timeout=60, **kwargs
    )


# --- without a server ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_selecting_from_loose_detections_equals_detecting_strictly(model_file, seed):
    loaded = load_model(model_file)
    detector = Detector(loaded.model, loaded.cfg)
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (3, 3, 128, 128), dtype=torch.uint8, generator=generator)  # [B, 3, S, S]
    sizes = [(150, 200), (300, 97), (64, 64)]
    loose = detector(images, sizes, score_threshold=0.01, max_detections=200)
    for threshold, most in ((0.3, 200), (0.05, 5), (0.4, 1), (0.99, 10)):
        strict = detector(images, sizes, score_threshold=threshold, max_detections=most)
        for got, want in zip((select(d, threshold, most) for d in loose), strict):
            for key in ("boxes", "scores", "labels"):
                assert np.array_equal(got[key], want[key].numpy()), (threshold, most, key)


def test_stats_board_sums_replicas_and_keeps_a_dead_ones_counts():
    board = StatsBoard()
    now = time.time()
    a = {"requests": 3, "status:200": 2, "status:413": 1, "batch_size:2": 1}
    b = {"requests": 2, "status:200": 2, "batch_size:1": 2}
    board.push("a", {"counts": a, "latencies": [(now, 0.010), (now, 0.030)], "batches": [(now, 2)]})
    board.push("b", {"counts": b, "latencies": [(now, 0.02), (now - 100, 0.5)], "batches": [(now, 1)] * 2})
    summary = board.summary(window_s=10)
    assert (summary["requests"], summary["errors"], summary["batches"]) == (5, 1, 3)
    assert summary["status"] == {"200": 4, "413": 1} and summary["batch_sizes"] == {"1": 2, "2": 1}
    assert summary["latency_ms"]["p50"] == pytest.approx(20.0)  # the 500 ms sample is outside the window
    assert summary["batch_size_mean"] == pytest.approx(4 / 3) and summary["batch_size_max"] == 2
    metrics = flat_metrics(summary)
    assert metrics["status_413"] == 1 and metrics["requests_per_s"] == pytest.approx(0.3)
    assert board.summary()["latency_ms"]["p99"] > 400  # no window: every kept sample
    cursor = summary["cursor"]
    board.push(
        "a", {"counts": {**a, "requests": 4, "status:200": 3}, "latencies": [(now, 0.04)], "batches": []}
    )
    since = board.summary(after=cursor)  # only what arrived after the cursor
    assert (
        since["requests"] == 6 and since["answered"] == 1 and since["latency_ms"]["p50"] == pytest.approx(40)
    )
    assert since["batch_size_mean"] is None and board.summary(after=since["cursor"])["answered"] == 0


# --- the served application ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(IMAGES))
def test_raw_and_multipart_uploads_equal_the_direct_model_call(server, model_file, kind):
    data, content_type = IMAGES[kind]
    expected = _direct(model_file, data, 0.05, 20)
    assert len(expected["labels"]) > 0  # the comparison is not empty == empty
    raw = _detect(server.url, data, content_type, params=QUERY)
    multipart = requests.post(
        f"{server.url}/detect", files={"file": (f"x.{kind}", data, content_type)}, params=QUERY, timeout=60
    )
    for response in (raw, multipart):
        assert response.status_code == 200, response.text
        answer = response.json()
        _assert_equal_to_direct(answer, expected)
        height, width = np.array(ImageOps.exif_transpose(Image.open(io.BytesIO(data)))).shape[:2]
        assert answer["image"] == {"width": width, "height": height}  # as shown
        assert answer["model"] == {"name": REGISTERED, "version": "1", "uri": f"models:/{REGISTERED}/1"}
        assert (answer["score_threshold"], answer["max_detections"]) == (0.05, 20)


@pytest.mark.slow
def test_defaults_are_the_serving_threshold_and_the_models_max_detections(server, model_file):
    data, content_type = IMAGES["jpeg"]
    answer = _detect(server.url, data, content_type).json()
    assert (answer["score_threshold"], answer["max_detections"]) == (DEFAULT_SCORE_THRESHOLD, 200)
    _assert_equal_to_direct(answer, _direct(model_file, data, DEFAULT_SCORE_THRESHOLD, 200))


def _batch_sizes(url: str) -> dict[int, int]:
    return {int(k): v for k, v in requests.get(f"{url}/stats", timeout=30).json()["batch_sizes"].items()}


def _settled_batch_sizes(url: str) -> dict[int, int]:
    """The counts once no earlier request is still to be reported (two reads a push apart
    agree): a batch of an earlier test reported late would count as this call's."""
    counts = _batch_sizes(url)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(2 * PUSH_INTERVAL_S)
        again = _batch_sizes(url)
        if again == counts:
            break
        counts = again
    return counts


def _concurrently(url: str, images: list[tuple[bytes, str]]) -> tuple[list, dict[int, int]]:
    """POST `images` from one client each, released together; the responses and the detector
    batches (size: count) the replicas reported for them."""
    before = _settled_batch_sizes(url)
    barrier = threading.Barrier(len(images))

    def send(item):
        barrier.wait()
        return _detect(url, *item, params=QUERY)

    with ThreadPoolExecutor(len(images)) as pool:
        responses = list(pool.map(send, images))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # replicas report every PUSH_INTERVAL_S
        after = _batch_sizes(url)
        new = {size: after.get(size, 0) - before.get(size, 0) for size in after}
        if sum(size * n for size, n in new.items()) >= len(images):
            break
        time.sleep(0.5)
    assert sum(size * n for size, n in new.items()) >= len(images), new
    return responses, {size: n for size, n in new.items() if n > 0}


@pytest.mark.slow
def test_concurrent_requests_are_batched_and_still_exact(server, model_file):
    images = [IMAGES["jpeg"], IMAGES["png"]] * 8  # 16 concurrent clients
    responses, batches = _concurrently(server.url, images)
    assert [r.status_code for r in responses] == [200] * len(images)
    expected = {t: _direct(model_file, d, 0.05, 20) for d, t in (IMAGES["jpeg"], IMAGES["png"])}
    for (_, content_type), response in zip(images, responses):
        _assert_equal_to_direct(response.json(), expected[content_type])
    assert max(batches) > 1, batches  # batched, not one by one
    assert max(batches) <= BATCH


@pytest.mark.slow
def test_the_ingress_retunes_its_batches_from_a_new_user_config(server):
    """Serve hands a changed ``user_config`` to the live ingress replicas' `reconfigure` (a
    config file or RayService edit does that without a restart); here the same call reaches
    the running replica through its handle. Its next batches follow the new limit."""
    from ray import serve

    from pipelines.serve.deployments import APP_NAME

    ingress = serve.get_deployment_handle("Ingress", app_name=APP_NAME)
    ingress.reconfigure.remote({"max_batch_size": 1, "batch_wait_timeout_s": 0.0}).result()
    try:
        responses, batches = _concurrently(server.url, [IMAGES["jpeg"]] * 8)
        assert [r.status_code for r in responses] == [200] * 8
        assert batches == {1: 8}, batches  # one image per detector call
    finally:
        ingress.reconfigure.remote({"max_batch_size": BATCH, "batch_wait_timeout_s": 0.05}).result()
    responses, batches = _concurrently(server.url, [IMAGES["jpeg"]] * 8)
    assert max(batches) > 1, batches  # back to the deployed limit
    assert max(batches) <= BATCH


def _multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "b0undary") -> bytes:
    lines = []
    for name, content_type, payload in parts:
        disposition = f'form-data; name="{name}"' + ('; filename="f"' if content_type else "")
        head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
        head += f"Content-Type: {content_type}\r\n" if content_type else ""
        lines.append(head.encode() + b"\r\n" + payload + b"\r\n")
    return b"".join(lines) + f"--{boundary}--\r\n".encode()


def _chunks(size: int):
    for _ in range(size // 65536):
        yield b"\xff" * 65536


GIF = _encoded(np.zeros((8, 8, 3), np.uint8), "GIF")
CORRUPT_PNG = corrupt_png(_scene(5, 64, 80))
TOO_MANY_PIXELS = _encoded(np.zeros((500, 600, 3), np.uint8), "PNG")  # 300k pixels, a few KB
MULTIPART = "multipart/form-data; boundary=b0undary"
BAD_INPUTS = {
    # name: (content type, body, query, expected status, words in the error)
    "empty body": ("image/jpeg", b"", {}, 400, "empty"),
    "empty body, no type": (None, b"", {}, 400, "empty"),
    "text": ("text/plain", b"hello", {}, 415, "text/plain"),
    "gif": ("image/gif", GIF, {}, 415, "image/gif"),
    "gif sent as bytes": ("application/octet-stream", GIF, {}, 415, "GIF"),
    "not an image": ("image/png", b"\x00not an image at all" * 10, {}, 400, "not an image"),
    "truncated jpeg": ("image/jpeg", IMAGES["jpeg"][0][:1500], {}, 422, "truncated"),
    "corrupt png": ("image/png", CORRUPT_PNG, {}, 422, "corrupt"),
    "multipart without a file": (MULTIPART, _multipart([("note", None, b"hi")]), {}, 400, "no file part"),
    "multipart text file": (MULTIPART, _multipart([("file", "text/plain", b"hi")]), {}, 415, "text/plain"),
    "multipart without boundary": ("multipart/form-data", b"--x\r\n", {}, 400, "boundary"),
    "too many bytes": ("image/jpeg", b"\xff" * (MAX_REQUEST_BYTES + 1), {}, 413, f"{MAX_REQUEST_BYTES}"),
    "too many pixels": ("image/png", TOO_MANY_PIXELS, {}, 413, "600x500"),
    "threshold not a number": ("image/jpeg", IMAGES["jpeg"][0], {"score_threshold": "abc"}, 422, "[0, 1)"),
    "threshold of 1": ("image/jpeg", IMAGES["jpeg"][0], {"score_threshold": "1"}, 422, "score_threshold"),
    "no detections": ("image/jpeg", IMAGES["jpeg"][0], {"max_detections": "0"}, 422, "max_detections"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_its_status_and_a_json_error_and_the_server_stays_healthy(server, case):
    content_type, body, query, status, words = BAD_INPUTS[case]
    headers = {"Content-Type": content_type} if content_type else {}
    response = requests.post(f"{server.url}/detect", data=body, headers=headers, params=query, timeout=60)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["status"] == status and words in response.json()["error"], response.json()
    assert requests.get(f"{server.url}/healthz", timeout=30).json()["status"] == "ok"


@pytest.mark.slow
def test_a_streamed_body_over_the_limit_is_refused_without_content_length(server):
    response = requests.post(
        f"{server.url}/detect", data=_chunks(4 * MAX_REQUEST_BYTES), headers={"Content-Type": "image/jpeg"}
    )
    assert response.status_code == 413 and "exceeds the limit" in response.json()["error"]
    assert _detect(server.url, *IMAGES["png"]).status_code == 200


@pytest.mark.slow
def test_unknown_routes_and_methods_answer_json(server):
    for response, status in (
        (requests.get(f"{server.url}/nothing", timeout=30), 404),
        (requests.get(f"{server.url}/detect", timeout=30), 405),
    ):
        assert response.status_code == status and response.json()["status"] == status


@pytest.mark.slow
def test_model_and_openapi_describe_what_is_served(server):
    model = requests.get(f"{server.url}/model", timeout=30).json()
    assert (model["name"], model["version"], model["uri"]) == (REGISTERED, "1", f"models:/{REGISTERED}/1")
    assert model["classes"] == [
        {"label": 1, "name": "a", "category_id": 3},
        {"label": 2, "name": "b", "category_id": 5},
    ]
    assert model["config"]["name"] == "tiny" and model["input_size"] == 128
    assert model["serving"]["max_batch_size"] == BATCH and model["serving"]["host"] == "127.0.0.1"
    assert model["serving"]["max_request_bytes"] == MAX_REQUEST_BYTES
    assert requests.get(f"{server.url}/docs", timeout=30).status_code == 200
    spec = requests.get(f"{server.url}/openapi.json", timeout=30).json()
    body = spec["paths"]["/detect"]["post"]["requestBody"]["content"]
    assert {"image/jpeg", "image/png", "multipart/form-data"} <= set(body)


def _detector_replicas() -> set[str]:
    import ray

    return {
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::rayssd#Detector#")
    }


@pytest.mark.slow
def test_a_killed_detector_replica_is_replaced_and_requests_succeed_again(server, model_file):
    import ray

    [name] = _detector_replicas()
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    data, content_type = IMAGES["jpeg"]
    statuses, deadline = [], time.monotonic() + 150
    while time.monotonic() < deadline:
        response = _detect(server.url, data, content_type, params=QUERY)
        statuses.append(response.status_code)
        if response.status_code == 200:
            break
        assert response.status_code == 503 and response.json()["status"] == 503, response.text
        time.sleep(1.0)
    assert statuses[-1] == 200, statuses
    _assert_equal_to_direct(response.json(), _direct(model_file, data, 0.05, 20))
    assert _detector_replicas() and name not in _detector_replicas()
    assert requests.get(f"{server.url}/healthz", timeout=30).status_code == 200


def _serve_run(mlflow_server: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    [run] = client.search_runs([experiment.experiment_id])
    return client, run


@pytest.mark.slow
def test_the_deployment_is_an_mlflow_run_naming_the_version_served(server, mlflow_server):
    assert _detect(server.url, *IMAGES["jpeg"]).status_code == 200
    client, run = _serve_run(mlflow_server)
    params = run.data.params
    assert (params["model.name"], params["model.version"]) == (REGISTERED, "1")
    assert params["model.uri"] == f"models:/{REGISTERED}@champion" and params["serve.max_batch_size"] == "4"
    assert run.data.tags["rayssd.model_version"] == f"{REGISTERED}/1"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # metrics come every --metrics-every second
        history = client.get_metric_history(run.info.run_id, "requests")
        if (
            history
            and history[-1].value > 0
            and "latency_p99_ms" in client.get_run(run.info.run_id).data.metrics
        ):
            break
        time.sleep(1.0)
    assert history and history[-1].value > 0
    assert {"errors", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms"} <= set(
        client.get_run(run.info.run_id).data.metrics
    )


@pytest.mark.slow
def test_a_second_application_serves_an_onnx_export_beside_the_first_and_stops_alone(
    server, model_file, mlflow_server, tmp_path
):
    """The second application serves `rayssd export`'s ONNX file of the first's model on ONNX
    Runtime: the same answers (labels, scores within 1e-5, boxes within 1e-3 of the image size)."""
    from ray import serve

    from pipelines.serve import deployments as serving

    def first_requests() -> int:
        return serving.stats(app=serving.APP_NAME)["requests"]

    assert _detect(server.url, *IMAGES["jpeg"]).status_code == 200
    ckpt = checkpoint.load(model_file)
    onnx_file = tmp_path / "model.onnx"
    export.export(*checkpoint.build_model(ckpt), ckpt["dataset"], onnx_file)
    second = Server(
        [
            *("--model", str(onnx_file), "--tracking-uri", mlflow_server),
            *("--experiment", f"{EXPERIMENT}-second"),
            *("--name", "second", "--route-prefix", "/second", "--port", str(server.args.port)),
            *("--detector-cpus", "0.5", "--ingress-cpus", "0.25", "--metrics-every", "1"),
        ]
    )
    second.start()
    try:
        assert second.url == f"{server.url}/second"
        answer = _detect(second.url, *IMAGES["jpeg"])
        assert answer.status_code == 200, answer.text
        for kind in ("jpeg", "large jpeg"):
            data, content_type = IMAGES[kind]
            got = _detect(second.url, data, content_type, params=QUERY).json()
            want = _direct(model_file, data, 0.05, 20)
            assert got["labels"] == want["labels"].tolist() and len(got["labels"]) > 0
            np.testing.assert_allclose(got["scores"], want["scores"], atol=1e-5)
            side = max(got["image"]["width"], got["image"]["height"])
            np.testing.assert_allclose(got["boxes"], want["boxes"].reshape(-1, 4), atol=1e-3 * side)
        assert requests.get(f"{second.url}/model", timeout=30).json()["serving"]["name"] == "second"
        assert _detect(server.url, *IMAGES["jpeg"]).status_code == 200  # the first still answers at /
        assert {"rayssd", "second"} <= set(serve.status().applications)
    finally:
        result = second.stop()  # waits for the replicas' last statistics
    assert result["stats"]["requests"] == 3  # its own three requests only: each application has its board
    assert "second" not in serve.status().applications and "rayssd" in serve.status().applications
    assert serving.stats(app="second") is None
    before = first_requests()
    assert before >= 2
    assert _detect(server.url, *IMAGES["png"]).status_code == 200
    deadline = time.monotonic() + 30
    while first_requests() <= before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert first_requests() == before + 1  # the first's statistics went on, not reset


@pytest.mark.slow
def test_stopping_ends_the_run_and_removes_the_application(server, mlflow_server):
    from ray import serve

    assert _detect(server.url, *IMAGES["png"]).status_code == 200
    assert _detect(server.url, b"", "image/png").status_code == 400
    result = server.stop()
    _, run = _serve_run(mlflow_server)
    assert run.info.status == "FINISHED" and result["run_id"] == run.info.run_id
    final, metrics = result["stats"], run.data.metrics  # the last metrics are the whole life's totals
    assert metrics["requests"] == final["requests"] >= 2 and metrics["errors"] == final["errors"] >= 1
    assert all(metrics[f"status_{code}"] == n for code, n in final["status"].items())
    assert metrics["batches"] == final["batches"] >= 1
    assert "rayssd" not in serve.status().applications


# --- the command line, refusing before Ray starts ------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # as a fresh shell: a new local Ray
    return subprocess.run(
        [sys.executable, "-m", "jobs.serve", *args], capture_output=True, text=True, timeout=120, env=env
    )


def _one_line_error(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, run.stderr
    return errors[0]


def test_cli_refuses_a_missing_model_and_a_bad_autoscale(tmp_path):
    assert "nothing" in _one_line_error(_cli("--model", str(tmp_path / "nothing.pt")))
    assert "MIN:MAX" in _one_line_error(_cli("--model", "x.pt", "--autoscale", "3"))
    assert "not allowed with" in _one_line_error(
        _cli("--model", "x.pt", "--replicas", "2", "--autoscale", "1:2")
    )


def test_cli_refuses_a_port_in_use(model_file):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        error = _one_line_error(_cli("--model", model_file, "--port", str(sock.getsockname()[1])))
    assert "choose another --port" in error and error.startswith("serve: error:")
