"""`rayssd train` end to end on a real Ray: DDP across nodes, a killed worker, resume,
MLflow against a real server, a dead tracking server, and bad input refused before Ray."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs import train as train_job
from pipelines.data.builtin import write_builtin
from pipelines.data.sources import list_files, resolve_location
from pipelines.train.datasets import open_training_source, training_data
from ssd import checkpoint as ckpt_io
from ssd import config as C
from tests.storage import upload_tree

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def builtin(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("builtin")
    write_builtin(root, seed=0, train_images=128, val_images=24, image_size=160)
    return {
        "train": str(root / "annotations" / "instances_train.json"),
        "val": str(root / "annotations" / "instances_val.json"),
    }


def _argv(
    builtin, storage: Path | str, name: str, *extra: str, epochs: int = 2, batch: int = 8, val: str = "val"
) -> list[str]:
    return [
        "--data", builtin["train"], "--val-data", builtin[val],
        "--storage", str(storage), "--name", name, "--quiet",
        "--set", f"train.epochs={epochs}", "--set", f"train.batch_size={batch}",
        "--set", "train.warmup_epochs=0",
        *extra,
    ]  # fmt: skip


def _parse(argv: list[str]):
    import argparse

    parser = argparse.ArgumentParser()
    train_job.add_arguments(parser)
    return parser.parse_args(argv)


def _train(argv: list[str]) -> dict:
    return train_job.run(_parse(argv))


def _metric_steps(uri: str, run_id: str, key: str = "loss") -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


# --- refused before Ray starts ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--set", "train.lr=-0.1"], "train.lr"),
        (["--workers", "64"], "train.num_workers=64 needs 64 CPUs"),
        (["--set", "train.eval_every=0"], "train.eval_every"),
        (["--resume"], "no run 'r' to resume"),
        (["--storage", "nosuch://bucket/runs"], "--storage nosuch://bucket/runs: cannot open"),
    ],
)
def test_bad_values_are_refused_by_the_plan_naming_the_field(builtin, tmp_path, extra, expected):
    with pytest.raises(ValueError, match=expected.replace("(", r"\(")):
        train_job.plan(_parse(_argv(builtin, tmp_path, "r", *extra)))


def test_a_missing_bucket_or_a_uri_with_its_own_endpoint_is_refused_before_ray_starts(
    builtin, s3_server, tmp_path
):
    """On the session's S3 API: a bucket that is not there, and query parameters (Ray's workers
    would be handed the URI without them), are one-line errors naming --storage."""
    for storage, expected in (
        ("s3://no-such-bucket-here/runs", "no bucket 'no-such-bucket-here'"),
        ("s3://b/runs?endpoint_override=127.0.0.1:1", "no query parameters"),
    ):
        with pytest.raises(ValueError, match=f"--storage .*{expected}"):
            train_job.plan(_parse(_argv(builtin, storage, "r")))


def test_cli_refuses_bad_input_in_one_line_before_starting_ray(builtin, tmp_path):
    cases = {
        "train.lr": ["--set", "train.lr=-1"],
        "invalid choice: 'nope'": ["--preset", "nope"],
        "needs 64 CPUs": ["--workers", "64"],
        "does not exist": ["--data", str(tmp_path / "missing.json")],
    }
    for expected, extra in cases.items():
        argv = [sys.executable, "-m", "jobs.train", *_argv(builtin, tmp_path / "runs", "bad"), *extra]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120, env={**os.environ})
        assert out.returncode == 2, (extra, out.stderr)
        assert expected in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert "Ray" not in out.stdout + out.stderr.replace("rayssd", "")  # no Ray start-up lines
    assert not (tmp_path / "runs").exists()


def test_a_run_sized_in_steps_gets_the_epochs_its_data_needs(capsys):
    from pipelines.train.launch import epochs_for_steps

    cfg = C.override(C.preset("tiny"), ["train.steps=100", "train.batch_size=8"])
    # 600 images on 2 workers: 300 each, 37 full batches of 8 an epoch; 3 epochs hold 100 steps
    assert epochs_for_steps(cfg, 600, 2).train.epochs == 3
    assert "training 3 epochs (111 steps)" in capsys.readouterr().out
    assert epochs_for_steps(cfg, 120_000, 2).train.epochs == 1  # a large set: one epoch is plenty
    with pytest.raises(C.ConfigError, match=r"train\.steps"):
        C.override(cfg, ["train.steps=-1"])


# --- one shared local Ray ----------------------------------------------------------------------


def test_stop_then_resume_in_object_storage_equals_an_uninterrupted_run_and_a_dead_tracker_only_warns(
    ray_local, builtin, bucket, tmp_path, monkeypatch, dead_tracking_uri, caplog
):
    """Data, checkpoints and the run record in a bucket (a real S3 API): nothing local is read."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead_tracking_uri)
    data = upload_tree(Path(builtin["train"]).parents[1], f"{bucket}/data")
    builtin = {split: f"{data}/annotations/instances_{split}.json" for split in ("train", "val")}
    storage = f"{bucket}/runs"
    first = _train(_argv(builtin, storage, "run", "--stop-after-epochs", "1", "--workers", "1", epochs=2))
    assert first["epochs_done"] == 1 and [m["epoch"] for m in first["history"]] == [1.0]
    assert first["registered"] is None and first["mlflow_run_id"] is None
    assert any("without tracking" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="was started with --val-data"):
        train_job.plan(
            _parse(["--resume", *_argv(builtin, storage, "run")[:2], *_argv(builtin, storage, "run")[4:8]])
        )

    resumed = _train(["--resume", *_argv(builtin, storage, "run")[:8], "--quiet"])
    assert resumed["epochs_done"] == 2 and [m["epoch"] for m in resumed["history"]] == [2.0]
    assert resumed["checkpoint"] == f"{storage}/run/model/{ckpt_io.FILE_NAME}"
    resolve_location(resumed["checkpoint"]).download(tmp_path / "final.pt")
    final = ckpt_io.load(tmp_path / "final.pt")
    record = resolve_location(f"{storage}/run/{train_job.RUN_FILE}").read_text()
    expected_cfg = C.from_dict(json.loads(record)["config"])
    assert ckpt_io.config_of(final) == expected_cfg and expected_cfg.train.epochs == 2
    assert final["step"] == 2 * (128 // 8)  # one worker, both epochs' steps, none repeated or lost
    assert resumed["workers"].keys() == {"0"}
    assert "map" in resumed["metrics"]  # evaluated at the end
    # and scored on its first training images too: does it fit the data it trained on?
    assert resumed["num_fit"] == 128 and 0.0 <= resumed["metrics"]["fit_map50"] <= 1.0
    assert "fit_map50" not in first["metrics"]  # only after the last epoch
    with pytest.raises(ValueError, match="finished all 2 epochs"):
        train_job.plan(_parse(["--resume", *_argv(builtin, storage, "run")[:8]]))


def _private_copy(builtin, tmp_path: Path, monkeypatch) -> Path:
    """A copy of the built-in set whose images the test may take away, and its own MLflow store."""
    import shutil

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    copy = tmp_path / "data"
    shutil.copytree(Path(builtin["train"]).parents[1], copy)
    return copy


def test_without_augmentation_the_samples_are_prepared_once_and_the_images_not_read_again(
    ray_local, builtin, bucket, tmp_path, monkeypatch
):
    copy = _private_copy(builtin, tmp_path, monkeypatch)
    data = {
        split: open_training_source(str(copy / "annotations" / f"instances_{split}.json"))
        for split in ("train", "val")
    }
    cfg = C.override(C.preset("tiny"), ["data.augment=false"])
    storage = resolve_location(f"{bucket}/runs")  # --storage s3://...: the samples go there
    cached = training_data(data["train"], data["val"], cfg, storage=storage, epoch_clock=None, data_cpus=0.25)
    assert cached.prepared is True and list_files(storage.join("samples"))  # STORAGE/samples/...
    for split in ("train", "val"):
        (copy / split / "images").rename(copy / split / "gone")  # the samples are prepared: images go
    for _ in range(2):  # what the trainers read each epoch, and the val inputs
        assert sum(len(b["image_id"]) for b in cached.train.iter_batches(batch_size=None)) == 128
        assert sum(len(b["image_id"]) for b in cached.val.iter_batches(batch_size=None)) == 24
    assert {"cls_targets", "loc_targets"} <= set(cached.train.schema().names)
    assert "cls_targets" not in cached.val.schema().names  # val inputs carry no matching targets
    # (a whole run training from prepared samples: the next test)

    # With augmentation every epoch draws new samples from the rows: nothing is prepared.
    augmented = training_data(
        open_training_source(builtin["train"]),
        open_training_source(builtin["val"]),
        C.override(C.preset("tiny"), ["data.augment=true"]),
        storage=resolve_location(str(tmp_path / "augmented")),
        epoch_clock=None,
        data_cpus=0.25,
    )
    assert augmented.prepared is False and augmented.cfg.data.augment
    assert not (tmp_path / "augmented").exists()


def test_training_reads_prepare_output_in_a_bucket_without_the_images_and_refuses_another_preset(
    ray_local, builtin, bucket, tmp_path, monkeypatch
):
    import shutil

    from pipelines.data.prepare import prepare

    copy = _private_copy(builtin, tmp_path, monkeypatch)
    out = f"{bucket}/prepared"  # `rayssd prepare --out s3://...`
    prepare(
        str(copy / "annotations" / "instances_train.json"), out, C.preset("tiny"), splits=("train", "val")
    )
    for split in ("train", "val"):
        shutil.rmtree(copy / split)  # nothing but the prepared samples is left to read
    argv = [
        "--data",
        str(out),
        "--storage",
        str(tmp_path),
        "--name",
        "from-prepared",
        "--quiet",
        "--workers",
        "1",
    ]
    argv += ["--set", "train.epochs=1", "--set", "train.batch_size=8", "--register-as", "none"]
    result = _train(argv)  # the preset's data.augment=true is turned off: prepared samples are fixed
    assert result["samples_cached"] is True and result["epochs_done"] == 1
    assert "map" in result["metrics"]  # the val split was evaluated from its prepared samples
    manifest = json.loads(resolve_location(f"{out}/manifest.json").read_text())
    assert ckpt_io.load(result["checkpoint"])["dataset"]["num_train"] == manifest["splits"]["train"]["rows"]
    assert not (tmp_path / "samples").exists()  # read as given, not prepared again

    with pytest.raises(ValueError, match=r"prepared for preset tiny .* needs preset ssdlite320"):
        train_job.plan(_parse([*argv[:4], "--name", "other", "--preset", "ssdlite320"]))


def test_an_empty_val_split_is_refused_before_training(ray_local, builtin, tmp_path):
    argv = [a for a in _argv(builtin, tmp_path, "empty-val") if a not in ("--val-data", builtin["val"])]
    with pytest.raises(ValueError, match=r"no usable image left in .* \(split 'val'\)"):  # read_dataset's
        _train([*argv, "--set", "data.val_fraction=0.001"])


def _last_checkpointed_epoch(run_dir: str) -> int:
    """The newest epoch whose checkpoint Ray Train's controller has registered in `run_dir`
    (a folder or a bucket URI; 0: none)."""
    try:
        snapshot = json.loads(resolve_location(f"{run_dir}/checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not there yet, or being written
        return 0
    return max((int(c["metrics"]["epoch"]) for c in snapshot.get("checkpoint_results", [])), default=0)


def _artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


# --- two nodes that share no disk ------------------------------------------------------------


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A two-node Ray cluster (2 CPUs each) whose nodes share no disk: each has a Ray temp dir
    and caches of its own, and the second runs in a mount namespace of its own in which this
    session's temporary folders (the data's local copy, the driver's folder) and the head's
    temp dir are empty (a tmpfs over each), so a path of the head's handed to it fails as on a
    second machine. Yields (address, pid of the second node's ``ray start``)."""
    import tempfile
    import warnings

    from ray.cluster_utils import Cluster

    from pipelines.common import LOCAL_RAY_SYSTEM_CONFIG
    from tests.processes import descendants, running

    cluster, node, made = None, None, []
    try:
        # short: Ray's socket paths under a temp dir must fit 107 characters
        head_tmp, node_tmp, probe = (tempfile.mkdtemp(prefix=f"ray-{n}-", dir="/tmp") for n in "hnp")
        made += [head_tmp, node_tmp, probe]
        head = {"num_cpus": 2, "_system_config": LOCAL_RAY_SYSTEM_CONFIG, "temp_dir": head_tmp}
        cluster = Cluster(initialize_head=True, head_node_args=head, connect=False)
        start = [sys.executable, "-m", "ray.scripts.scripts", "start", "--address", cluster.address]
        start += ["--num-cpus", "2", "--temp-dir", node_tmp, "--block", "--disable-usage-stats"]
        private = ["unshare", "--mount", "--propagation", "private", "sh", "-c"]
        if (
            shutil.which("unshare")
            and subprocess.run(
                [*private, f"mount -t tmpfs rayssd-probe '{probe}'"], capture_output=True
            ).returncode
            == 0
        ):
            hidden = (str(tmp_path_factory.getbasetemp()), head_tmp)
            mounts = " && ".join(f"mount -t tmpfs rayssd-node-2 '{path}'" for path in hidden)
            command = [*private, f"{mounts} && exec " + " ".join(f"'{a}'" for a in start)]
        else:
            warnings.warn(
                "no private mount namespace here: the second node sees this machine's files", stacklevel=2
            )
            command = start
        own = {"RAYSSD_CACHE_DIR": f"{node_tmp}/cache", "XDG_CACHE_HOME": f"{node_tmp}/xdg-cache"}
        log_path = tmp_path_factory.mktemp("node-2") / "ray-start.log"
        with open(log_path, "wb") as log:
            node = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **own})
        deadline = time.monotonic() + 120
        while len(cluster.global_state._live_node_ids()) < 2:
            assert node.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.5)
        yield cluster.address, node.pid
    finally:
        if node is not None:
            pids = descendants(node.pid) | {node.pid}

            for signum, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
                for pid in running(pids):  # only what still runs: an ended one's pid may be reused
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signum)
                deadline = time.monotonic() + wait_s
                while running(pids) and time.monotonic() < deadline:
                    time.sleep(0.2)
            node.wait()
        if cluster is not None:
            cluster.shutdown()
        for folder in made:
            shutil.rmtree(folder, ignore_errors=True)


def test_two_nodes_train_through_a_bucket_lose_a_worker_restore_from_it_and_stay_identical(
    two_nodes, builtin, bucket, tmp_path, mlflow_server
):
    """Data, checkpoints and the model pass through S3 and MLflow's server (artifacts in S3):
    the driver runs in a folder of its own and no path of this machine is handed to a node.
    The second node's training worker is killed mid-epoch once Ray Train holds the previous
    epoch's checkpoint in the bucket: both ranks are restored from it (no disk is shared), every
    epoch is tracked once, both ranks keep identical weights, and the model is registered."""
    from mlflow.tracking import MlflowClient

    from tests.processes import command_line, descendants

    address, second_node = two_nodes
    data = upload_tree(Path(builtin["train"]).parents[1], f"{bucket}/data")
    remote = {split: f"{data}/annotations/instances_{split}.json" for split in ("train", "val")}
    summary, driver = tmp_path / "summary.json", tmp_path / "driver"
    driver.mkdir()
    argv = [
        sys.executable, "-m", "jobs.train",
        *_argv(remote, f"{bucket}/runs", "mn", "--address", address, "--placement", "STRICT_SPREAD",
               "--cpus-per-worker", "1", "--max-failures", "2", "--register-as", "rayssd-two-nodes",
               "--summary-json", str(summary), "--param-digests", "--experiment", "two-nodes",
               "--set", "train.eval_every=3", epochs=3, batch=2, val="train"),  # mAP on the training images
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "PYTHONPATH": str(Path.cwd())}
    log_path = tmp_path / "driver.log"
    with open(log_path, "w") as log:
        run = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, text=True, env=env, cwd=driver)
    try:
        killed, restored_from = None, None
        deadline = time.monotonic() + 400
        while killed is None and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.2)
            checkpointed = _last_checkpointed_epoch(f"{bucket}/runs/mn")
            if checkpointed in (1, 2):  # epoch 2 or 3 under way; the last one ends the run
                workers = [p for p in descendants(second_node) if "RayTrainWorker" in command_line(p)]
                if workers:
                    killed, restored_from = workers[0], checkpointed
                    os.kill(killed, signal.SIGKILL)
        assert killed is not None, "never saw a checkpointed epoch followed by one in progress"
        assert run.wait(timeout=600) == 0, log_path.read_text()[-5000:]
    finally:
        if run.poll() is None:
            run.kill()
    result = json.loads(summary.read_text())
    nodes = {w["node_id"] for w in result["workers"].values()}
    assert len(result["workers"]) == 2 and len(nodes) == 2  # one rank per node, after the restart too
    assert killed not in {int(w["pid"]) for w in result["workers"].values()}
    assert {int(w["start_epoch"]) for w in result["workers"].values()} == {restored_from}  # from the bucket
    assert [m["epoch"] for m in result["history"]] == [1.0, 2.0, 3.0] and result["epochs_done"] == 3
    assert sorted(result["param_digests"]) == ["1", "2", "3"]  # every epoch, from both ranks
    for epoch, digests in result["param_digests"].items():
        assert len(set(digests.values())) == 1 and len(digests) == 2, (epoch, digests)
    losses = [m["loss"] for m in result["history"]]
    assert losses[-1] < losses[0], losses
    assert result["checkpoint"] == f"{bucket}/runs/mn/model/{ckpt_io.FILE_NAME}"
    assert list_files(resolve_location(f"{bucket}/runs/mn/epoch_0003"))  # Ray Train's checkpoint
    assert not list(driver.iterdir())  # nothing written beside the driver (no ./mlflow.db, no runs)

    # The MLflow run, on a real server, is whole despite the restart.
    client = MlflowClient(mlflow_server)
    run_id = result["mlflow_run_id"]
    params = client.get_run(run_id).data.params
    assert params["train.epochs"] == "3" and params["model.backbone"] == "tiny"
    assert _metric_steps(mlflow_server, run_id) == [1, 2, 3]  # each epoch once
    assert _metric_steps(mlflow_server, run_id, "map") == [3]
    artifacts = _artifact_paths(client, run_id)
    for expected in (
        "config.yaml",
        "dataset.json",
        "pictures/val_epoch_003.png",
        "pictures/precision_recall.png",
        "checkpoints/best/checkpoint.pt",
        "checkpoints/final/checkpoint.pt",
    ):
        assert expected in artifacts, artifacts
    assert result["metrics"]["map"] > 0  # learnt: on its training images, within seconds
    version = client.get_model_version_by_alias("rayssd-two-nodes", "champion")
    assert version.run_id == run_id and version.version == "1"


def test_a_local_storage_that_another_node_does_not_see_is_refused(two_nodes, builtin, tmp_path):
    """A --storage folder only the driver sees (a tmpfs mounted in the driver's own mount
    namespace: node-local disk on one machine) is refused in one line before training."""
    address, _ = two_nodes
    private = tmp_path / "private"
    private.mkdir()
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace here (unshare: {probe.stderr.decode().strip()})")
    argv = _argv(builtin, private / "runs", "local", "--address", address, "--register-as", "none")
    command = f"mount -t tmpfs rayssd-test {private} && exec {sys.executable} -m jobs.train " + " ".join(
        f"'{a}'" for a in argv
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", command],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert out.returncode == 2, out.stdout + out.stderr
    assert "is a local folder that 2 of the cluster's 2 nodes do not see" in out.stderr, out.stderr
    assert "--storage s3://BUCKET/runs" in out.stderr and "Traceback" not in out.stderr
