"""torchvision's SSD pieces, set up to do the same work as ours (the tests' oracle)."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD

from ssd.config import Config


def tv_box_generator(cfg: Config) -> DefaultBoxGenerator:
    a = cfg.anchors
    return DefaultBoxGenerator(
        [list(r) for r in a.aspect_ratios],
        scales=a.resolved_scales(),
        steps=None if a.steps is None else [int(s) for s in a.steps],
        clip=a.clip,
    )


def tv_default_boxes(cfg: Config) -> torch.Tensor:
    """torchvision's default boxes for `cfg`, Tensor[A, 4] (cx, cy, w, h) in [0, 1]."""
    size = cfg.model.image_size
    grid = [[f, f] for f in cfg.anchors.feature_maps]
    return tv_box_generator(cfg)._grid_default_boxes(grid, [size, size])


class _Backbone(nn.Module):
    """Smallest real backbone torchvision's SSD accepts; only its head shapes matter here."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.sizes = cfg.anchors.feature_maps
        self.out_channels = [4] * len(self.sizes)

    def forward(self, x):
        return {
            str(i): nn.functional.adaptive_avg_pool2d(x[:, :1].repeat(1, 4, 1, 1), s)
            for i, s in enumerate(self.sizes)
        }


def tv_ssd(cfg: Config) -> SSD:
    """A real torchvision SSD with `cfg`'s anchors and inference settings."""
    size = cfg.model.image_size
    inf = cfg.inference
    return SSD(
        _Backbone(cfg),
        tv_box_generator(cfg),
        (size, size),
        cfg.model.num_classes,
        score_thresh=inf.score_threshold,
        nms_thresh=inf.nms_threshold,
        detections_per_img=inf.max_detections,
        topk_candidates=inf.topk_candidates,
        iou_thresh=cfg.train.iou_threshold,
    )


def tv_pixel_anchors(cfg: Config) -> torch.Tensor:
    """torchvision's anchors as its SSD.forward hands them on: Tensor[A, 4] xyxy pixels."""
    d = tv_default_boxes(cfg)
    size = cfg.model.image_size
    return torch.cat((d[:, :2] - 0.5 * d[:, 2:], d[:, :2] + 0.5 * d[:, 2:]), -1) * size


tv_matcher = det_utils.SSDMatcher
tv_box_coder = det_utils.BoxCoder
