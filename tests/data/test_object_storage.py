"""Object storage that says no, and output that must never be left half-written: credentials a
store refuses are one line naming the URI and what to check, before any work starts; files
written piece by piece appear whole or not at all; an object cut short is named when read.

The refusing store is a second moto server that checks every request's credentials (keys made
through its IAM API), as a real one does; the session's own server accepts any keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.fs as pafs
import pytest
import torch

from pipelines.data.sources import open_source, resolve_location
from pipelines.label.outputs import check_output
from pipelines.track.models import load_model
from pipelines.train.launch import storage_location
from ssd import checkpoint
from ssd import config as C
from ssd.model import build_ssd
from tests.ports import free_port
from tests.storage import require_credentials, s3_api

GUARDED = "rayssd-guarded"
COCO = {
    "images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 64}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 2, 30, 40], "area": 1200, "iscrowd": 0}
    ],
    "categories": [{"id": 3, "name": "cat"}],
}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A tiny SSD's checkpoint file (seeded random weights)."""
    cfg = C.override(C.preset("tiny"), ["model.num_classes=2"])
    torch.manual_seed(0)
    ckpt = checkpoint.make_checkpoint(
        build_ssd(cfg).eval(), cfg, dataset={"class_names": ["cat"], "category_ids": [3]}, epoch=1, step=1
    )
    return checkpoint.save(checkpoint.for_inference(ckpt), tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, model_file):
    """(endpoint, the keys it accepts): a store holding a COCO file and a model in GUARDED."""
    import boto3

    endpoint = f"http://127.0.0.1:{free_port()}"
    with s3_api(tmp_path_factory.mktemp("guarded-s3"), endpoint):
        iam = boto3.client("iam", endpoint_url=endpoint)
        iam.create_user(UserName="trainer")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="trainer", PolicyName="all", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket=GUARDED)
        s3.put_object(Bucket=GUARDED, Key="data/instances.json", Body=json.dumps(COCO).encode())
        s3.put_object(Bucket=GUARDED, Key=f"model/{checkpoint.FILE_NAME}", Body=model_file.read_bytes())
        require_credentials(endpoint)
        yield endpoint, (key["AccessKeyId"], key["SecretAccessKey"])


def test_credentials_the_store_refuses_are_one_line_naming_the_uri_before_work_starts(
    guarded, monkeypatch, tmp_path
):
    """--storage, --data, label's --out and a model in a bucket, with an unknown key and with a
    known key's wrong secret: each a ValueError of one line (what every command prints as its
    ``error:`` line) naming the URI and the variables to check; the CLI says it before Ray
    starts. The store's own keys open each of them."""
    endpoint, (key_id, secret) = guarded
    root = f"s3://{GUARDED}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    opens = {
        f"--storage {root}/runs": lambda: storage_location(f"{root}/runs"),
        f"{root}/data/instances.json": lambda: open_source(f"{root}/data/instances.json"),
        f"--out {root}/out": lambda: check_output(f"{root}/out"),
        f"cannot read {root}/model": lambda: load_model(f"{root}/model", cache_dir=str(tmp_path)),
    }
    for wrong in (("AKIAUNKNOWNKEY000000", "anything"), (key_id, "not-its-secret")):
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", wrong[0])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong[1])
        for names, call in opens.items():
            with pytest.raises(ValueError) as refused:
                call()
            said = str(refused.value)
            assert said.startswith(f"{names}: "), said
            assert (
                "\n" not in said and "refused these credentials" in said and "AWS_SECRET_ACCESS_KEY" in said
            )
    argv = [
        *(sys.executable, "-m", "jobs.train", "--preset", "tiny", "--name", "r"),
        *("--data", f"{root}/data/instances.json", "--storage", f"{root}/runs"),
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, env={**os.environ}, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    [line] = out.stderr.strip().splitlines()[-1:]
    assert line.startswith(f"train: error: --storage {root}/runs: ") and "refused these credentials" in line
    assert "Traceback" not in out.stderr and "Ray" not in out.stdout + out.stderr.replace("rayssd", "")

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    assert storage_location(f"{root}/runs").uri == f"{root}/runs"
    assert open_source(f"{root}/data/instances.json").kind == "coco"
    assert check_output(f"{root}/out").uri == f"{root}/out"
    assert load_model(f"{root}/model", cache_dir=str(tmp_path)).dataset["category_ids"] == [3]


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_output_written_piece_by_piece_appears_whole_or_not_at_all(where, request, tmp_path):
    """Location.open_output (label's detections.json and COCO dataset file): interrupted
    half-way, it leaves a file already there as it was and no new file, and no temporary
    either; once the block ends the file is there whole, replacing the earlier one."""
    base = str(tmp_path / "out") if where == "local" else f"{request.getfixturevalue('bucket')}/out"
    root = resolve_location(base)
    kept, fresh = root.join("kept.json"), root.join("fresh.json")
    kept.write_bytes(b"earlier")
    for target in (kept, fresh):
        with pytest.raises(KeyboardInterrupt), target.open_output() as stream:
            stream.write(b"[1,")
            raise KeyboardInterrupt
    assert kept.read_bytes() == b"earlier" and not fresh.exists()
    for target in (kept, fresh):
        with target.open_output() as stream:
            stream.write(b"[1,")
            stream.write(b"2]")
        assert target.read_bytes() == b"[1,2]"
    held = root.filesystem.get_file_info(pafs.FileSelector(root.path, recursive=True))
    assert sorted(info.base_name for info in held) == ["fresh.json", "kept.json"]  # no temporary


def test_what_a_killed_writer_left_neither_blocks_the_next_run_nor_stays(bucket):
    """A killed process never commits its upload, but a local one leaves its hidden temporary:
    label's output check does not count it as an earlier run's output, and clearing the
    outputs removes it along with them."""
    from pipelines.label.outputs import clear_outputs

    out = resolve_location(f"{bucket}/labels")
    out.join(".detections.json.tmp-123-0badc0de").write_bytes(b"[1,")
    assert check_output(out.uri).uri == out.uri  # not "already holds"
    out.join("notes.txt").write_bytes(b"mine")
    with pytest.raises(ValueError, match=r"already holds notes\.txt;"):
        check_output(out.uri)
    clear_outputs(out)
    held = out.filesystem.get_file_info(pafs.FileSelector(out.path))
    assert [info.base_name for info in held] == ["notes.txt"]


def test_objects_cut_short_are_named_in_one_line(bucket, model_file, tmp_path):
    """A COCO file and a checkpoint cut off half-way (an upload that stopped) read as errors that
    name the object, not a traceback or the local copy alone."""
    text = json.dumps(COCO).encode()
    resolve_location(f"{bucket}/cut/instances.json").write_bytes(text[: len(text) // 2])
    with pytest.raises(ValueError, match=f"^{bucket}/cut/instances.json is not valid JSON"):
        open_source(f"{bucket}/cut/instances.json")
    data = model_file.read_bytes()
    resolve_location(f"{bucket}/cut/model/{checkpoint.FILE_NAME}").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as cut:
        load_model(f"{bucket}/cut/model", cache_dir=str(tmp_path))
    said = str(cut.value)
    assert (
        said.startswith(f"{bucket}/cut/model (copied to ") and "is not a readable rayssd checkpoint" in said
    )
    assert "\n" not in said
