"""From head outputs to detections: decode, per-class top-k, per-class NMS (SSD §3, inference)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms

from ssd.boxes import decode
from ssd.config import InferenceConfig

_DEFAULTS = InferenceConfig()


def postprocess(
    cls_logits: Tensor,
    loc_preds: Tensor,
    default_boxes: Tensor,
    image_sizes: Sequence[tuple[int, int]] | Tensor | None = None,
    score_threshold: float = _DEFAULTS.score_threshold,
    nms_threshold: float = _DEFAULTS.nms_threshold,
    topk_candidates: int = _DEFAULTS.topk_candidates,
    max_detections: int = _DEFAULTS.max_detections,
) -> list[dict[str, Tensor]]:
    """Detections per image.

    cls_logits: Tensor[B, A, C] (class 0 = background); loc_preds: Tensor[B, A, 4] encoded
    offsets; default_boxes: Tensor[A, 4] (cx, cy, w, h) in [0, 1]; image_sizes: B pairs
    (height, width) in pixels of the original images (None: boxes stay in [0, 1]).

    Per image and class: softmax scores above `score_threshold`, the `topk_candidates`
    best, NMS at `nms_threshold` within the class, then the `max_detections` best overall.
    Returns B dicts: ``boxes`` Tensor[K, 4] xyxy clipped to the image (pixels),
    ``scores`` Tensor[K] descending, ``labels`` Tensor[K] int64 in 1..C-1.
    """
    batch, num_anchors, num_classes = cls_logits.shape
    boxes = decode(loc_preds, default_boxes).clamp(0.0, 1.0)  # [B, A, 4] xyxy in [0, 1]
    scores = F.softmax(cls_logits.float(), dim=-1)[..., 1:]  # [B, A, C-1]
    k = min(topk_candidates, num_anchors)
    top_scores, top_idx = scores.topk(k, dim=1)  # [B, k, C-1], per class
    keep = top_scores > score_threshold
    image, _, cls = keep.nonzero(as_tuple=True)
    cand_scores = top_scores[keep]
    cand_boxes = boxes[image, top_idx[keep]]  # [K, 4]
    labels = cls + 1
    # Boxes of different (image, class) groups never suppress each other. float64 keeps
    # the IoU of the grouping trick exact; IoU is invariant to the [0, 1] -> pixel scale.
    kept = batched_nms(cand_boxes.double(), cand_scores.double(), image * num_classes + labels, nms_threshold)
    kept = kept[image[kept].argsort(stable=True)]  # grouped by image, score order kept
    per_image = torch.bincount(image[kept], minlength=batch)  # [B]
    starts = torch.cumsum(per_image, 0) - per_image
    rank = torch.arange(kept.numel(), device=kept.device) - starts[image[kept]]
    kept = kept[rank < max_detections]
    counts = per_image.clamp(max=max_detections).tolist()
    out_boxes = cand_boxes[kept]
    if image_sizes is not None:
        sizes = torch.as_tensor(image_sizes, dtype=out_boxes.dtype, device=out_boxes.device).reshape(batch, 2)
        scale = sizes[:, [1, 0, 1, 0]]  # (w, h, w, h) per image
        out_boxes = out_boxes * scale[image[kept]]
    return [
        {"boxes": b, "scores": s, "labels": lab}
        for b, s, lab in zip(
            out_boxes.split(counts), cand_scores[kept].split(counts), labels[kept].split(counts)
        )
    ]
