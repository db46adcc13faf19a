"""Default boxes (SSD §2.2 "Choosing scales and aspect ratios for default boxes")."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ssd.config import AnchorConfig, Config


def box_shapes(scales: list[float], aspect_ratios: tuple[tuple[float, ...], ...]) -> list[Tensor]:
    """Per feature map k, the (w, h) of its boxes in the order a location lists them.

    Order: (s_k, s_k), the extra box (s'_k, s'_k) with s'_k = √(s_k·s_k+1) (SSD §2.2), then
    (s_k·√a, s_k/√a) and its transpose for every ratio a. Returns Tensor[n_k, 2] each,
    fractions of the input size.
    """
    shapes = []
    for k, ratios in enumerate(aspect_ratios):
        s_k = scales[k]
        s_extra = math.sqrt(scales[k] * scales[k + 1])
        wh = [[s_k, s_k], [s_extra, s_extra]]
        for a in ratios:
            w, h = s_k * math.sqrt(a), s_k / math.sqrt(a)
            wh += [[w, h], [h, w]]
        shapes.append(torch.tensor(wh, dtype=torch.float64))
    return shapes


def default_boxes(
    cfg: Config | AnchorConfig,
    image_size: int | None = None,
    clip: bool | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """All default boxes, Tensor[A, 4] (cx, cy, w, h) in [0, 1] units of the input.

    Rows: feature maps in order; locations row-major (y outer, x inner); the boxes of
    `box_shapes` within a location — the same order as the model's head outputs. Box
    centres sit at ((j + 0.5)·step / size, (i + 0.5)·step / size). `clip` (default: the
    config's) clamps w and h to [0, 1]. `image_size` defaults to ``cfg.model.image_size``.
    """
    anchors = cfg.anchors if isinstance(cfg, Config) else cfg
    if image_size is None:
        if not isinstance(cfg, Config):
            raise ValueError("image_size is required when passing an AnchorConfig")
        image_size = cfg.model.image_size
    clip = anchors.clip if clip is None else clip
    steps = anchors.resolved_steps(image_size)
    shapes = box_shapes(anchors.resolved_scales(), anchors.aspect_ratios)
    per_map = []
    for f, step, wh in zip(anchors.feature_maps, steps, shapes):
        centres = (torch.arange(f, dtype=torch.float64) + 0.5) * (step / image_size)  # [f]
        cy, cx = torch.meshgrid(centres, centres, indexing="ij")  # [f, f] each
        xy = torch.stack((cx.reshape(-1), cy.reshape(-1)), dim=-1)  # [f*f, 2]
        if clip:
            wh = wh.clamp(0.0, 1.0)
        n = wh.shape[0]
        boxes = torch.cat((xy[:, None, :].expand(-1, n, -1), wh[None].expand(f * f, -1, -1)), dim=-1)
        per_map.append(boxes.reshape(-1, 4))  # [f*f*n, 4]
    return torch.cat(per_map).to(dtype=dtype, device=device)
