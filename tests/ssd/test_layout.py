"""`ssd.layout`: the memory layout chosen by a cached probe, or by the config."""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssd import config as C
from ssd import layout
from ssd.detector import Detector
from ssd.model import build_ssd


def _cfg(memory_format: str = "auto") -> C.Config:
    return C.from_dict({"preset": "tiny", "model": {"memory_format": memory_format}})


def _cached(cache_dir) -> dict:
    return json.loads((cache_dir / "layouts.json").read_text())


def _conv_channels_last(model: torch.nn.Module) -> bool:
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    return all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)


@pytest.mark.parametrize("memory_format", ["channels_last", "contiguous"])
def test_the_config_overrides_the_probe(memory_format, tmp_path):
    cfg = _cfg(memory_format)
    chosen = layout.channels_last(build_ssd(cfg), cfg, batch=4, training=True, cache_dir=tmp_path)
    assert chosen == (memory_format == "channels_last")
    assert not (tmp_path / "layouts.json").exists()  # nothing measured


def test_cuda_takes_channels_last_without_a_probe(tmp_path):
    cfg = _cfg()
    model = build_ssd(cfg)
    assert layout.channels_last(model, cfg, batch=4, training=False, device="cuda", cache_dir=tmp_path)
    assert not (tmp_path / "layouts.json").exists()


def test_the_probe_keeps_the_faster_layout_and_is_asked_once_per_machine(tmp_path):
    cfg = _cfg()
    model = build_ssd(cfg)
    before = [p.clone() for p in model.parameters()]
    chosen = layout.channels_last(model, cfg, batch=32, training=True, cache_dir=tmp_path)

    [(key, entry)] = _cached(tmp_path).items()
    assert layout.machine_key() in key and f"batch {layout.PROBE_MAX_BATCH} train" in key
    assert entry["channels_last"] == chosen and entry["channels_last_s"] > 0 and entry["contiguous_s"] > 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # probed copies
    assert not _conv_channels_last(model)

    # the answer is read back, not measured again: flip it in the cache and it is flipped
    (tmp_path / "layouts.json").write_text(json.dumps({key: {**entry, "channels_last": not chosen}}))
    assert layout.channels_last(model, cfg, batch=8, training=True, cache_dir=tmp_path) is (not chosen)
    # inference is another question, asked anew
    layout.channels_last(model, cfg, batch=8, training=False, cache_dir=tmp_path)
    assert len(_cached(tmp_path)) == 2


def test_another_isa_cap_or_a_broken_cache_asks_again(tmp_path, monkeypatch):
    for cap in layout.ISA_CAPS:
        monkeypatch.delenv(cap, raising=False)
    cfg = _cfg()
    model = build_ssd(cfg)
    layout.channels_last(model, cfg, batch=2, training=False, cache_dir=tmp_path)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # how developers reproduce an AVX2-only CPU
    layout.channels_last(model, cfg, batch=2, training=False, cache_dir=tmp_path)
    keys = sorted(_cached(tmp_path))
    assert len(keys) == 2 and sum("ONEDNN_MAX_CPU_ISA=AVX2" in k for k in keys) == 1

    (tmp_path / "layouts.json").write_text('{"half-writt')
    assert isinstance(layout.channels_last(model, cfg, batch=2, training=False, cache_dir=tmp_path), bool)
    assert len(_cached(tmp_path)) == 1  # rewritten whole


@pytest.mark.parametrize("answer", [True, False])
def test_the_detector_lays_its_weights_out_as_measured(answer, tmp_path, monkeypatch):
    cfg = _cfg()
    model = build_ssd(cfg).eval()
    monkeypatch.setenv(layout.CACHE_ENV, str(tmp_path))
    layout.channels_last(model, cfg, batch=8, training=False)  # fills the cache
    key = next(iter(_cached(tmp_path)))
    (tmp_path / "layouts.json").write_text(json.dumps({key: {"channels_last": answer}}))

    detector = Detector(model, cfg, channels_last=None, batch=8)

    assert detector.channels_last is answer and _conv_channels_last(model) is answer
    size = cfg.model.image_size
    [found] = detector(torch.zeros((1, 3, size, size), dtype=torch.uint8), [(size, size)])
    assert set(found) == {"boxes", "scores", "labels"}


def _rank(rank: int, init: str, cache_dirs: list[str], results) -> None:
    """One of two gloo ranks whose caches disagree on the layout."""
    from pipelines.train.loop import _agreed_layout

    os.environ[layout.CACHE_ENV] = cache_dirs[rank]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        cfg = _cfg()
        key = layout.cache_key(cfg, cfg.train.batch_size, training=True)
        with open(os.path.join(cache_dirs[rank], "layouts.json"), "w") as f:
            json.dump({key: {"channels_last": rank == 0}}, f)
        results[rank] = _agreed_layout(build_ssd(cfg), cfg, torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def test_training_ranks_agree_on_one_layout(tmp_path):
    """DDP averages gradients in memory order: a rank in another layout would mix them up.
    Channels-last only where every rank measured it faster."""
    dirs = [str(tmp_path / f"rank{r}") for r in (0, 1)]
    for d in dirs:
        os.makedirs(d)
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(f"file://{tmp_path / 'init'}", dirs, results), nprocs=2, join=True)
    assert dict(results) == {0: False, 1: False}
