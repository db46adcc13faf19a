"""`ssd.detector.Detector`: the inference call every job shares, in either weight layout."""

import copy

import pytest
import torch

from ssd import config as C
from ssd.detector import Detector
from ssd.model import build_ssd


def _conv_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


@pytest.mark.parametrize("name", ["tiny", "ssdlite320"])
def test_channels_last_weights_give_the_same_outputs(name: str) -> None:
    cfg = C.preset(name)
    torch.manual_seed(0)
    plain = build_ssd(cfg).eval()
    moved = copy.deepcopy(plain)
    size = cfg.model.image_size
    images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)  # [B, 3, S, S]

    Detector(moved, cfg, channels_last=True)

    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in _conv_weights(moved))
    assert not all(w.is_contiguous(memory_format=torch.channels_last) for w in _conv_weights(plain))
    with torch.inference_mode():
        for want, got in zip(plain(images), moved(images), strict=True):  # cls_logits, loc_preds
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_channels_last_detections_equal_the_plain_ones_on_a_confident_model() -> None:
    cfg = C.preset("tiny")
    torch.manual_seed(1)
    plain = build_ssd(cfg).eval()
    moved = copy.deepcopy(plain)
    size = cfg.model.image_size
    images = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8)
    sizes = [(480, 640), (size, size), (100, 300)]

    want = Detector(plain, cfg)(images, sizes, score_threshold=0.06)
    got = Detector(moved, cfg, channels_last=True)(images, sizes, score_threshold=0.06)

    assert sum(len(d["scores"]) for d in want) > 0  # the threshold leaves some detections
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g["labels"], w["labels"])
        torch.testing.assert_close(g["scores"], w["scores"], rtol=0, atol=1e-5)
        torch.testing.assert_close(g["boxes"], w["boxes"], rtol=0, atol=1e-2)


def test_a_model_that_keeps_training_keeps_its_layout_and_mode() -> None:
    cfg = C.preset("tiny")
    model = build_ssd(cfg)  # in training mode, as during training's evaluation
    size = cfg.model.image_size
    Detector(model, cfg)(torch.zeros((2, 3, size, size), dtype=torch.uint8), [(size, size)] * 2)
    assert not all(w.is_contiguous(memory_format=torch.channels_last) for w in _conv_weights(model))
    assert model.training  # put back after the eval-mode call
    # Each module gets its own mode back, e.g. a backbone frozen in eval mode while the rest trains.
    frozen = {name for name, module in model.named_modules() if name.startswith("backbone")}
    for name, module in model.named_modules():
        module.training = name not in frozen
    Detector(model, cfg)(torch.zeros((1, 3, size, size), dtype=torch.uint8), [(size, size)])
    assert {name for name, module in model.named_modules() if not module.training} == frozen
