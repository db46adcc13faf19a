"""The deployment files: ray_cluster.yaml is a cluster-launcher config Ray accepts, the KubeRay
manifests agree with the code they run (train arguments, runtime environment, the Serve
application's import path and args), and that application, built from Serve-style string
args on a real local Ray, answers HTTP detections equal to the model called directly."""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import json
import os
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import ray.autoscaler
import requests
import tomllib
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from jobs import train as train_job
from pipelines.data.builtin import write_builtin
from pipelines.serve import deployments as serving
from pipelines.serve.app import build, settings_overrides
from tests.ports import free_port
from tests.serve.test_serving import _direct
from tests.trained_tiny import train_tiny

ROOT = Path(__file__).resolve().parents[1]
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"


def _load(name: str) -> dict:
    docs = list(yaml.safe_load_all((ROOT / name).read_text()))
    assert len(docs) == 1, f"{name}: expected one document, got {len(docs)}"
    return docs[0]


def _containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _app_config(service: dict) -> dict:
    [app] = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    return app


# --- ray_cluster.yaml ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> dict:
    return _load("ray_cluster.yaml")


def test_cluster_config_validates_against_rays_schema_which_refuses_unknown_fields(cluster):
    import jsonschema

    schema = json.loads(RAY_SCHEMA.read_text())
    jsonschema.validate(cluster, schema)
    typo = copy.deepcopy(cluster)
    typo["available_node_types"]["gpu_worker"]["max_worker"] = 4
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        jsonschema.validate(typo, schema)


def test_cluster_config_passes_rays_own_preparation_as_ray_up_does(cluster):
    prepared = prepare_config(copy.deepcopy(cluster))  # defaults filled in, offline
    validate_config(prepared)
    assert prepared["available_node_types"]["head"]["max_workers"] == 0
    assert prepared["worker_setup_commands"][: len(cluster["setup_commands"])] == cluster["setup_commands"]


def test_cluster_has_an_idle_head_and_autoscaling_gpu_and_cpu_workers(cluster):
    types = cluster["available_node_types"]
    assert cluster["cluster_name"] == "rayssd"
    assert types[cluster["head_node_type"]]["resources"] == {"CPU": 0}
    workers = {name: t for name, t in types.items() if name != cluster["head_node_type"]}
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    cpu = [t for t in workers.values() if t["resources"].get("GPU", 0) == 0 and t["resources"]["CPU"] > 0]
    assert len(gpu) == 1 and len(cpu) == 1
    for t in (*gpu, *cpu):
        assert t["min_workers"] == 0 < t["max_workers"]
    assert sum(t["max_workers"] for t in workers.values()) <= cluster["max_workers"]


def test_cluster_setup_installs_this_checkout_without_what_jobs_leave_out(cluster):
    assert cluster["file_mounts"] == {"~/rayssd": "."}
    assert "pip install --no-deps -e ~/rayssd" in cluster["setup_commands"]
    runtime_env = yaml.safe_load((ROOT / "runtime_env.yaml").read_text())
    excluded = {p.rstrip("/") for p in cluster["rsync_exclude"]}
    assert {p.rstrip("/") for p in runtime_env["excludes"]} <= excluded


# --- KubeRay manifests ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return _load("deploy/rayjob-train.yaml")


@pytest.fixture(scope="module")
def rayservice() -> dict:
    return _load("deploy/rayservice.yaml")


def _train_args(entrypoint: str) -> argparse.Namespace:
    words = shlex.split(entrypoint)
    assert words[:3] == ["python", "-m", "jobs.train"]
    parser = argparse.ArgumentParser()
    train_job.add_arguments(parser)
    return parser.parse_args(words[3:])  # SystemExit on an option `rayssd train` does not have


def test_rayjob_runs_the_train_job_with_arguments_it_accepts(rayjob):
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    spec = rayjob["spec"]
    assert spec["entrypoint"].startswith("python -m jobs.train ")
    args = _train_args(spec["entrypoint"])
    assert (args.preset, args.workers, args.gpus_per_worker) == ("tiny", 2, 1.0)
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"] and cluster["workerGroupSpecs"]
    gpu_groups = [
        g
        for g in cluster["workerGroupSpecs"]
        for c in g["template"]["spec"]["containers"]
        if int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1
    ]
    assert sum(g["maxReplicas"] for g in gpu_groups) >= args.workers * args.gpus_per_worker


def test_rayjob_data_and_storage_are_in_a_bucket_and_no_pod_mounts_a_shared_disk(rayjob):
    args = _train_args(rayjob["spec"]["entrypoint"])
    assert all(uri.startswith("s3://") for uri in (args.data, args.val_data, args.storage))
    for container in _containers(rayjob["spec"]["rayClusterSpec"]):
        assert not container.get("volumeMounts"), container["name"]
        assert {"secretRef": {"name": "rayssd-s3", "optional": True}} in container["envFrom"]


@pytest.mark.parametrize("name", ["deploy/rayjob-train.yaml", "deploy/rayservice.yaml", "ray_cluster.yaml"])
def test_deployments_run_the_image_the_dockerfile_builds_on_the_same_ray(name):
    dockerfile = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE=rayproject/ray:(\S+)-py(\d)(\d+)$", dockerfile, re.M)
    assert base, "the Dockerfile names Ray's image as its BASE"
    gpu_build = r"docker build -t rayssd:0\.1\.0-gpu --build-arg BASE=rayproject/ray:\S+-gpu"
    assert re.search(gpu_build, dockerfile)
    text = (ROOT / name).read_text()
    images = set(re.findall(r"^ *(?:image|worker_image): (\S+)", text, re.M))
    assert images and images <= {"REGISTRY/rayssd:0.1.0-cpu", "REGISTRY/rayssd:0.1.0-gpu"}, images
    assert all(re.search(f"image: {re.escape(image)}  # EDIT", text) for image in images)
    if name.startswith("deploy/"):
        assert _load(name)["spec"].get("rayClusterSpec", _load(name)["spec"].get("rayClusterConfig"))[
            "rayVersion"
        ] == base.group(1)
    else:
        assert {t["node_config"].get("ImageId") for t in _load(name)["available_node_types"].values()} == {
            "ami-EDIT-ME"
        }


def test_the_image_build_context_leaves_out_what_jobs_leave_out_and_copies_what_it_installs():
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    ignored = {line.rstrip("/") for line in lines if line and not line.startswith("#")}
    runtime_env = yaml.safe_load((ROOT / "runtime_env.yaml").read_text())
    assert {p.rstrip("/") for p in runtime_env["excludes"]} <= ignored
    copied = re.findall(r"^COPY --chown=ray (.+) \S+$", (ROOT / "Dockerfile").read_text(), re.M)
    for path in " ".join(copied).split():
        assert (ROOT / path).exists() and path not in ignored, path
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert {p.rstrip("*") for p in packages["find"]["include"]} <= set(" ".join(copied).split())


def test_what_the_dockerfile_copies_builds_and_installs_rayssd_as_its_run_step_does(tmp_path):
    """No Docker daemon here: the image's install step on its own build context instead. The
    files the Dockerfile copies, and nothing else, build a wheel holding every module of the
    checkout and the ``rayssd`` command; installed apart from the checkout, it imports what the
    Dockerfile's check imports."""
    import subprocess
    import sys
    import zipfile

    context = tmp_path / "context"
    copied = re.findall(r"^COPY --chown=ray (.+) \S+$", (ROOT / "Dockerfile").read_text(), re.M)
    for path in " ".join(copied).split():
        source = ROOT / path
        if source.is_dir():
            shutil.copytree(source, context / path, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (context / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, context / path)
    wheels = tmp_path / "wheels"
    build = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(wheels),
    ]
    out = subprocess.run([*build, str(context)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    [wheel] = wheels.glob("rayssd-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "rayssd = jobs.cli:main" in archive.read(entry_points).decode()
    modules = {
        str(p.relative_to(ROOT)) for top in ("ssd", "pipelines", "jobs") for p in (ROOT / top).rglob("*.py")
    }
    assert modules <= names, sorted(modules - names)[:5]
    target = tmp_path / "installed"
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)]
    out = subprocess.run(install, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    check = "import jobs.cli, pipelines.train.launch, ssd.model; print(jobs.cli.__file__)"
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip().startswith(str(target)), out.stdout + out.stderr[-2000:]


def test_rayjob_runtime_env_is_runtime_env_yaml_without_a_local_working_dir(rayjob):
    ours = yaml.safe_load((ROOT / "runtime_env.yaml").read_text())
    env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert env["env_vars"] == ours["env_vars"]
    assert "working_dir" not in env or "://" in env["working_dir"]  # "." is no path in a pod


@pytest.mark.parametrize("name", ["deploy/rayjob-train.yaml", "deploy/rayservice.yaml"])
def test_every_ray_container_has_the_mlflow_tracking_uri_and_string_start_params(name):
    manifest = _load(name)
    cluster = manifest["spec"].get("rayClusterSpec") or manifest["spec"]["rayClusterConfig"]
    for container in _containers(cluster):
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env.get("MLFLOW_TRACKING_URI", "").startswith("http"), container["name"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        # KubeRay's CRD types rayStartParams as map[string]string: `num-cpus: 0` is refused
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())


def test_rayservice_serves_the_import_path_that_builds_the_app(rayservice):
    assert (rayservice["apiVersion"], rayservice["kind"]) == ("ray.io/v1", "RayService")
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)  # Serve's own check of a config file
    app = _app_config(rayservice)
    assert (app["name"], app["route_prefix"]) == (serving.APP_NAME, "/")  # what serving.shutdown deletes
    assert app["import_path"] == "pipelines.serve.app:build"
    module, _, attr = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), attr)
    assert callable(builder) and len(inspect.signature(builder).parameters) == 1  # Serve's rule
    assert rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]


def test_rayservice_serves_the_model_the_rayjob_registers(rayservice, rayjob):
    args = _app_config(rayservice)["args"]
    settings_overrides(args)  # every key known, every value of its type
    registered = _train_args(rayjob["spec"]["entrypoint"]).register_as
    assert args["model"] == f"models:/{registered}@champion"


# --- the application builder ---------------------------------------------------------------


def test_building_without_a_model_names_the_missing_key():
    with pytest.raises(ValueError, match="'model' is required"):
        build({})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"model": "x.pt", "max_batch": 4}, "unknown key.*max_batch"),
        ({"model": "x.pt", "max_batch_size": "many"}, "max_batch_size='many' is not an integer"),
        ({"model": "x.pt", "replicas": 1.5}, "replicas=1.5 is not an integer"),
        ({"model": "x.pt", "autoscale": "4"}, "autoscale='4' is not detector replicas"),
    ],
)
def test_bad_args_are_refused_before_the_model_is_read(args, message):
    with pytest.raises(ValueError, match=message):
        build(args)


def test_args_given_as_strings_become_serving_settings():
    overrides = settings_overrides(
        {"model": "m", "batch_wait_ms": "20", "max_request_mb": 0.25, "autoscale": "1:4", "replicas": 2}
    )
    assert overrides == {
        "batch_wait_timeout_s": 0.02,
        "max_request_bytes": 262_144,
        "autoscale": (1, 4),
        "replicas": 2,
    }


@pytest.fixture(scope="module")
def builtin(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("builtin")
    write_builtin(root, seed=0, train_images=64, val_images=4, image_size=160)
    return root


@pytest.fixture(scope="module")
def trained(builtin, tmp_path_factory) -> str:
    return train_tiny(builtin, tmp_path_factory.mktemp("trained"))


@pytest.mark.slow
def test_the_built_application_answers_http_like_the_model_called_directly(ray_local, builtin, trained):
    from ray import serve

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})  # as serving.start does
    try:
        # strings, as `serve run pipelines.serve.app:build key=value` passes them
        app = build(
            {
                "model": trained,
                "max_batch_size": "4",
                "batch_wait_ms": "20",
                "replicas": "1",
                "detector_cpus": "0.5",
                "ingress_cpus": "0.25",
            }
        )
        serve.run(app, name=serving.APP_NAME, route_prefix="/")
        serving.wait_until_healthy(url, timeout_s=240.0)
        jpeg = sorted((builtin / "val" / "images").glob("*.jpg"))[0].read_bytes()
        response = requests.post(
            f"{url}/detect",
            data=jpeg,
            headers={"Content-Type": "image/jpeg"},
            params={"score_threshold": "0.05"},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        answer = response.json()
        expected = _direct(trained, jpeg, 0.05, answer["max_detections"])
        assert len(answer["boxes"]) >= 1  # a trained model finds the scene's shapes
        assert answer["labels"] == expected["labels"].tolist()
        np.testing.assert_allclose(answer["boxes"], expected["boxes"].reshape(-1, 4), atol=1e-3)
        np.testing.assert_allclose(answer["scores"], expected["scores"], atol=1e-5)
        served = requests.get(f"{url}/model", timeout=30).json()["serving"]
        assert (served["max_batch_size"], served["batch_wait_timeout_s"]) == (4, 0.02)
    finally:
        serving.shutdown()
    assert serving.APP_NAME not in serve.status().applications
