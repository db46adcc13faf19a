"""The registered MLflow model takes encoded images: through `mlflow.pyfunc.load_model` and
MLflow's own scoring server (`mlflow models serve --env-manager local`) it answers each image in
its own pixels, as the torch detector does; a row that is not an image is refused by number."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import torch
from PIL import Image

from benchmarks.bench_scale import real_photographs
from pipelines.data.builtin import write_builtin
from pipelines.track.registry import log_model
from pipelines.track.tracker import Tracker
from ssd import checkpoint
from ssd.detector import Detector
from ssd.image import network_input
from ssd.synthetic import CLASS_NAMES
from tests.conftest import stop_process, wait_for_health
from tests.ports import free_port
from tests.trained_tiny import train_tiny

REGISTERED = "pyfunc-images"
URI = f"models:/{REGISTERED}@champion"
PARAMS = {"score_threshold": 0.05, "max_detections": 20}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[str, list[bytes]]:
    """(checkpoint file, encoded test images): built-in scenes as PNG and JPEG, a crop of a real
    photograph, all of different sizes (none large enough for a reduced JPEG decode)."""
    root = tmp_path_factory.mktemp("builtin")
    write_builtin(root, seed=0, train_images=64, val_images=4, image_size=160)
    ckpt = train_tiny(root, tmp_path_factory.mktemp("trained"))
    images = []
    for k, path in enumerate(sorted((root / "val" / "images").iterdir())[:2]):
        with Image.open(path) as image:
            images.append(_encode(image.convert("RGB"), ("PNG", "JPEG")[k]))
    photo = real_photographs()[0]
    images.append(_encode(photo.crop((40, 60, 340, 260)), "JPEG"))  # 300 x 200
    return ckpt, images


@pytest.fixture(scope="module")
def registered(mlflow_server, trained) -> str:
    tracker = Tracker.start(uri=mlflow_server, experiment="test-pyfunc", run_name="pyfunc")
    assert tracker.enabled
    outcome = log_model(tracker, trained[0], register_as=REGISTERED)
    tracker.end()
    assert outcome is not None and outcome.champion
    return mlflow_server


@pytest.fixture(scope="module")
def scoring_server(registered, tmp_path_factory):
    """`mlflow models serve` of the champion, on 127.0.0.1; yields its URL."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("scoring") / "serve.log"
    command = [
        *(sys.executable, "-m", "mlflow", "models", "serve", "-m", URI, "--env-manager", "local"),
        *("-h", "127.0.0.1", "-p", str(port), "-w", "1"),
    ]
    # It runs `uvicorn` by name: the interpreter's scripts (the venv's bin/) go first on PATH.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered, "PATH": path}
    with open(log_path, "wb") as log_file:
        server = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, server, log_path, timeout_s=120.0)
        yield url
    finally:
        stop_process(server)


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _direct(ckpt_file: str, data: bytes) -> dict[str, torch.Tensor]:
    """The oracle: the checkpoint's model through `Detector` on a full decode of the image."""
    model, cfg = checkpoint.build_model(checkpoint.load(ckpt_file))
    with Image.open(io.BytesIO(data)) as image:
        pixels = np.asarray(image.convert("RGB"))
    images = torch.from_numpy(network_input(pixels, cfg.model.image_size)[None])
    return Detector(model, cfg)(images, [pixels.shape[:2]], **PARAMS)[0]


def _assert_same(got: dict, want: dict[str, torch.Tensor], data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
    assert (got["width"], got["height"]) == (width, height)
    assert list(got["labels"]) == want["labels"].tolist()
    assert list(got["names"]) == [CLASS_NAMES[k - 1] for k in want["labels"].tolist()]
    np.testing.assert_allclose(np.asarray(got["scores"]), want["scores"].numpy(), atol=1e-5)
    boxes = np.asarray(got["boxes"], dtype=np.float32).reshape(-1, 4)
    np.testing.assert_allclose(boxes, want["boxes"].numpy(), atol=1e-3 * max(width, height))


def test_the_registered_model_takes_encoded_images_and_answers_in_their_own_pixels(
    registered, trained, monkeypatch
):
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.types import DataType

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered)
    model = mlflow.pyfunc.load_model(URI)
    signature = model.metadata.signature
    assert signature.inputs.input_names() == ["image"] and signature.inputs.inputs[0].type == DataType.binary
    assert {"boxes", "scores", "labels", "names", "width", "height"} == set(signature.outputs.input_names())
    assert {p.name for p in signature.params} == {"score_threshold", "max_detections"}

    ckpt, images = trained
    answers = model.predict(pd.DataFrame({"image": images}), params=PARAMS)
    assert len(answers) == len(images)
    assert sum(len(a["labels"]) for a in answers) >= len(images)  # not a comparison of empties
    for got, data in zip(answers, images):
        _assert_same(got, _direct(ckpt, data), data)
    [few] = model.predict(pd.DataFrame({"image": images[:1]}), params={**PARAMS, "max_detections": 2})
    assert len(few["labels"]) == 2  # the best two of the same image (batch of 1: float rounding differs)
    np.testing.assert_allclose(few["scores"], answers[0]["scores"][:2], atol=1e-5)

    with pytest.raises(MlflowException, match=r"row 2: not an image"):
        model.predict(pd.DataFrame({"image": [*images[:2], b"\x00 not an image", images[2]]}))
    with pytest.raises(MlflowException, match=r"row 0: PNG image data is corrupt"):
        model.predict(pd.DataFrame({"image": [images[0][: len(images[0]) // 2]]}))
    with pytest.raises(MlflowException, match=r"score_threshold must be a number in \[0, 1\)"):
        model.predict(pd.DataFrame({"image": images[:1]}), params={"score_threshold": 1.5})


def test_mlflow_models_serve_answers_a_json_request_of_base64_images(scoring_server, trained):
    ckpt, images = trained
    body = {
        "dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(d).decode()] for d in images]},
        "params": PARAMS,
    }
    response = requests.post(f"{scoring_server}/invocations", json=body, timeout=120)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == len(images)
    for got, data in zip(predictions, images):
        _assert_same(got, _direct(ckpt, data), data)

    bad = {
        "dataframe_split": {
            "columns": ["image"],
            "data": [[base64.b64encode(images[0]).decode()], [base64.b64encode(b"plain text").decode()]],
        }
    }
    response = requests.post(f"{scoring_server}/invocations", json=bad, timeout=120)
    assert response.status_code == 400
    assert "row 1: not an image" in response.json()["message"]


def test_a_registered_model_logs_its_code_and_checkpoint_only(registered, monkeypatch):
    """Nothing pickled: the logged model holds the model code, the ssd package and the
    checkpoint, and its MLmodel names the code as the loader."""
    import mlflow
    import yaml

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered)  # the registry's too
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=URI))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert mlmodel["flavors"]["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert (local / "pyfunc.py").is_file() and (local / "code" / "ssd" / "image.py").is_file()
    assert (local / "artifacts" / "checkpoint.pt").is_file()
    assert not [f for f in local.rglob("*") if f.suffix in (".pkl", ".pickle", ".cloudpickle")]
