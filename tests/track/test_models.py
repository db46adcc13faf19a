"""pipelines.track.models.load_model: checkpoint paths, and MLflow URIs against a real server."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipelines.track.models import LoadedModel, load_model
from pipelines.track.registry import log_model
from pipelines.track.tracker import Tracker
from ssd import checkpoint
from ssd import config as C
from ssd.model import build_ssd
from tests.ports import free_port
from tests.storage import upload_tree

REGISTERED = "loader-test"


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """(model, checkpoint file) of a tiny 2-class SSD with seeded random weights."""
    cfg = C.override(C.preset("tiny"), ["model.num_classes=3"])
    torch.manual_seed(0)
    model = build_ssd(cfg).eval()
    ckpt = checkpoint.make_checkpoint(
        model,
        cfg,
        dataset={"class_names": ["a", "b"], "category_ids": [3, 5]},
        epoch=1,
        step=1,
        metrics={"map": 0.5},
    )
    path = checkpoint.save(checkpoint.for_inference(ckpt), tmp_path_factory.mktemp("ckpt"))
    return model, path


@pytest.fixture(scope="module")
def registered(mlflow_server, original):
    """A run holding the model (registered as REGISTERED version 1, @champion) and the
    checkpoint as a plain artifact; returns (run id, logged model id)."""
    tracker = Tracker.start(uri=mlflow_server, experiment="test-models", run_name="loader")
    assert tracker.enabled
    outcome = log_model(tracker, str(original[1]), register_as=REGISTERED)
    assert outcome is not None and (outcome.version, outcome.champion) == ("1", True)
    tracker.log_artifact(str(original[1]), "checkpoints")
    tracker.end()
    [output] = tracker.client.get_run(tracker.run_id).outputs.model_outputs
    return tracker.run_id, output.model_id


def _assert_same_outputs(loaded: LoadedModel, model: torch.nn.Module) -> None:
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))  # [B, 3, S, S]
    with torch.inference_mode():
        expected, got = model(images), loaded.model(images)
    assert all(torch.equal(e, g) for e, g in zip(expected, got))
    assert not loaded.model.training
    assert loaded.cfg.name == "tiny" and loaded.cfg.model.num_classes == 3
    assert loaded.dataset["class_names"] == ["a", "b"] and loaded.dataset["category_ids"] == [3, 5]


def test_loads_a_checkpoint_file_and_its_directory(original):
    model, path = original
    for uri in (str(path), str(path.parent), path.as_uri()):
        loaded = load_model(uri)
        _assert_same_outputs(loaded, model)
        assert (loaded.uri, loaded.checkpoint_path) == (uri, str(path))
        assert (loaded.name, loaded.version, loaded.run_id) == (None, None, None)


@pytest.mark.slow
def test_loads_registered_and_logged_models(mlflow_server, original, registered, tmp_path):
    model, _ = original
    run_id, model_id = registered
    expected = {
        f"models:/{REGISTERED}@champion": (REGISTERED, "1"),
        f"models:/{REGISTERED}/1": (REGISTERED, "1"),
        f"models:/{model_id}": (None, None),
        f"runs:/{run_id}/model": (None, None),  # MLflow 3: the run's logged model named "model"
        f"runs:/{run_id}/checkpoints/checkpoint.pt": (None, None),  # a plain run artifact
    }
    for uri, (name, version) in expected.items():
        loaded = load_model(uri, tracking_uri=mlflow_server, cache_dir=str(tmp_path))
        _assert_same_outputs(loaded, model)
        assert (loaded.uri, loaded.name, loaded.version, loaded.run_id) == (uri, name, version, run_id)
        assert loaded.checkpoint_path.startswith(str(tmp_path))


@pytest.mark.slow
def test_a_second_load_uses_the_cache(mlflow_server, registered, tmp_path):
    first = load_model(f"models:/{REGISTERED}/1", tracking_uri=mlflow_server, cache_dir=str(tmp_path))
    again = load_model(f"models:/{REGISTERED}@champion", tracking_uri=mlflow_server, cache_dir=str(tmp_path))
    assert first.checkpoint_path == again.checkpoint_path
    assert len(list(tmp_path.iterdir())) == 1


# --- errors ------------------------------------------------------------------------------


def test_path_errors_say_what_is_missing(tmp_path, original):
    with pytest.raises(FileNotFoundError, match=r"no checkpoint file or directory at .*nope\.pt"):
        load_model(str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError, match=r"no checkpoint\.pt in directory"):
        load_model(str(tmp_path))
    run_dir = tmp_path / "ray-run"
    checkpoint.save(checkpoint.load(original[1]), run_dir / "checkpoint_000001")
    with pytest.raises(FileNotFoundError, match=r"1 subdirectories have one, e\.g\. .*checkpoint_000001"):
        load_model(str(run_dir))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable rayssd checkpoint"):
        load_model(str(garbage))
    other = tmp_path / "other.pt"
    torch.save({"state": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match="not a rayssd checkpoint"):
        load_model(str(other))
    with pytest.raises(ValueError, match="expected a checkpoint path or bucket URI, a runs:/ or a models:/"):
        load_model("ftp:relative/model.pt")


def test_a_model_in_a_bucket_loads_once_and_errors_name_the_uri(bucket, original, tmp_path, monkeypatch):
    """s3:// checkpoints (the file or its folder) through the real S3 API, cached by URI and
    object; a missing object, and an endpoint nobody answers, say which URI in one line."""
    model, path = original
    upload_tree(path.parent, f"{bucket}/runs/r/model")
    for uri in (f"{bucket}/runs/r/model/{checkpoint.FILE_NAME}", f"{bucket}/runs/r/model"):
        loaded = load_model(uri, cache_dir=str(tmp_path / "cache"))
        _assert_same_outputs(loaded, model)
        assert loaded.uri == uri and Path(loaded.checkpoint_path).is_relative_to(tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 1  # one object, one copy
    with pytest.raises(FileNotFoundError, match=f"no checkpoint file .* at {bucket}/runs/other"):
        load_model(f"{bucket}/runs/other", cache_dir=str(tmp_path / "cache"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ValueError, match=f"cannot read {bucket}/runs/r/model"):
        load_model(f"{bucket}/runs/r/model", cache_dir=str(tmp_path / "cache"))


@pytest.mark.slow
def test_registry_errors_list_what_exists(mlflow_server, registered, tmp_path):
    run_id, _ = registered
    kwargs = {"tracking_uri": mlflow_server, "cache_dir": str(tmp_path)}
    with pytest.raises(ValueError, match=f"no registered model 'missing'.*registered models: .*{REGISTERED}"):
        load_model("models:/missing@champion", **kwargs)
    with pytest.raises(ValueError, match=r"has no alias 'staging'.*aliases: @champion \(version 1\)"):
        load_model(f"models:/{REGISTERED}@staging", **kwargs)
    with pytest.raises(ValueError, match=r"has no version '7'.*versions: 1"):
        load_model(f"models:/{REGISTERED}/7", **kwargs)
    with pytest.raises(ValueError, match="no MLflow logged model 'm-0000'"):
        load_model("models:/m-0000", **kwargs)
    with pytest.raises(ValueError, match="no MLflow run '0123'"):
        load_model("runs:/0123/model", **kwargs)
    with pytest.raises(ValueError, match="cannot download"):
        load_model(f"runs:/{run_id}/no/such/file.pt", **kwargs)
    with pytest.raises(ValueError, match="not a model URI"):
        load_model("models:/just-a-name", **kwargs)


def test_store_errors_name_the_store(dead_tracking_uri, tmp_path):
    with pytest.raises(ValueError, match=f"{dead_tracking_uri} is unreachable"):
        load_model("models:/any@champion", tracking_uri=dead_tracking_uri)
    with pytest.raises(FileNotFoundError, match=r"no MLflow database at .*absent\.db"):
        load_model("models:/any/1", tracking_uri=f"sqlite:///{tmp_path}/absent.db")
    assert not (tmp_path / "absent.db").exists()
