"""Box formats, IoU and the SSD box coding (SSD §2.2, eq. 2)."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import box_convert, box_iou

from ssd.config import CENTER_VARIANCE, SIZE_VARIANCE

# Largest log-size offset decode accepts, as in torchvision's BoxCoder: exp() of more
# than log(1000/16) would blow a box up beyond any image.
MAX_LOG_SIZE_OFFSET = math.log(1000.0 / 16)


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """Tensor[..., 4] (cx, cy, w, h) -> Tensor[..., 4] (x1, y1, x2, y2), same units."""
    cxcy, wh = boxes[..., :2], boxes[..., 2:]
    return torch.cat((cxcy - 0.5 * wh, cxcy + 0.5 * wh), dim=-1)


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """Tensor[..., 4] (x1, y1, x2, y2) -> Tensor[..., 4] (cx, cy, w, h), same units."""
    x1y1, x2y2 = boxes[..., :2], boxes[..., 2:]
    return torch.cat((0.5 * (x1y1 + x2y2), x2y2 - x1y1), dim=-1)


def xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """Tensor[N, 4] xyxy -> Tensor[N, 4] (x, y, w, h) (COCO's format), same units."""
    return box_convert(boxes, "xyxy", "xywh")


def iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of Tensor[N, 4] and Tensor[M, 4] xyxy boxes (any common unit) -> Tensor[N, M]."""
    return box_iou(boxes1, boxes2)


def batched_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of Tensor[B, N, 4] xyxy against Tensor[M, 4] xyxy -> Tensor[B, N, M].

    `torchvision.ops.box_iou` over the flattened batch; a zero-area box against a box with
    area gives 0.
    """
    batch, n = boxes1.shape[:2]
    return box_iou(boxes1.reshape(-1, 4), boxes2).view(batch, n, boxes2.shape[0])


def encode(
    boxes: Tensor,
    default_boxes: Tensor,
    variances: tuple[float, float] = (CENTER_VARIANCE, SIZE_VARIANCE),
) -> Tensor:
    """Offsets of `boxes` from `default_boxes` (SSD eq. 2, divided by the variances).

    boxes: Tensor[..., 4] xyxy; default_boxes: Tensor[..., 4] (cx, cy, w, h) in the same
    units (broadcastable). Returns Tensor[..., 4] (dx, dy, dw, dh) — equal to torchvision's
    BoxCoder with weights (1/v0, 1/v0, 1/v1, 1/v1) = (10, 10, 5, 5).
    """
    target = xyxy_to_cxcywh(boxes)
    dxy = (target[..., :2] - default_boxes[..., :2]) / (default_boxes[..., 2:] * variances[0])
    dwh = torch.log(target[..., 2:] / default_boxes[..., 2:]) / variances[1]
    return torch.cat((dxy, dwh), dim=-1)


def decode(
    offsets: Tensor,
    default_boxes: Tensor,
    variances: tuple[float, float] = (CENTER_VARIANCE, SIZE_VARIANCE),
) -> Tensor:
    """Inverse of `encode`: Tensor[..., 4] offsets + (cx, cy, w, h) defaults -> xyxy boxes.

    Size offsets are clamped at log(1000/16) like torchvision's BoxCoder.
    """
    cxcy = default_boxes[..., :2] + offsets[..., :2] * variances[0] * default_boxes[..., 2:]
    dwh = (offsets[..., 2:] * variances[1]).clamp(max=MAX_LOG_SIZE_OFFSET)
    wh = default_boxes[..., 2:] * torch.exp(dwh)
    return torch.cat((cxcy - 0.5 * wh, cxcy + 0.5 * wh), dim=-1)
