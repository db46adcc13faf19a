"""Matching ground truth to default boxes and encoding training targets (SSD §2.2).

Everything is batched over images and vectorised over boxes and default boxes; `match`
and `encode_targets` are the one-image forms.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from ssd.boxes import batched_iou, cxcywh_to_xyxy, encode
from ssd.config import IOU_THRESHOLD

BACKGROUND = 0  # class target of unmatched default boxes
UNMATCHED = -1  # match index of unmatched default boxes
_PAD_BOX = (0.0, 0.0, 1.0, 1.0)  # harmless stand-in for padding rows (never matched)


class BatchMatcher(Protocol):
    def match_batch(self, gt_boxes: Tensor, valid: Tensor) -> Tensor: ...


def pad_ground_truth(
    gt_boxes: Sequence[Tensor], gt_labels: Sequence[Tensor] | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Pad ragged per-image boxes to one batch.

    gt_boxes: B tensors [N_i, 4] (N_i may be 0); gt_labels: B tensors [N_i].
    Returns boxes Tensor[B, N, 4], labels Tensor[B, N] int64 (0 on padding) and
    valid Tensor[B, N] bool, with N = max(N_i, 1).
    """
    batch = len(gt_boxes)
    counts = torch.tensor([int(b.shape[0]) for b in gt_boxes], dtype=torch.int64)
    n = max(int(counts.max()) if batch else 0, 1)
    ref = gt_boxes[0] if batch else torch.zeros(0, 4)
    dtype = ref.dtype if ref.is_floating_point() else torch.float32
    device = ref.device
    boxes = torch.tensor(_PAD_BOX, dtype=dtype, device=device).repeat(batch, n, 1)
    labels = torch.zeros(batch, n, dtype=torch.int64, device=device)
    valid = (torch.arange(n)[None, :] < counts[:, None]).to(device)  # [B, N]
    if int(counts.sum()):
        rows, cols = valid.nonzero(as_tuple=True)  # row-major: image by image, box by box
        boxes[rows, cols] = torch.cat([b.reshape(-1, 4) for b in gt_boxes]).to(dtype)
        if gt_labels is not None:
            labels[rows, cols] = torch.cat([lab.reshape(-1) for lab in gt_labels]).to(torch.int64)
    return boxes, labels, valid


def match_batch(
    gt_boxes: Tensor, valid: Tensor, default_boxes: Tensor, iou_threshold: float = IOU_THRESHOLD
) -> Tensor:
    """Index of the ground truth each default box is matched to, or -1 (background).

    gt_boxes: Tensor[B, N, 4] xyxy in [0, 1]; valid: Tensor[B, N] bool (False on padding);
    default_boxes: Tensor[A, 4] (cx, cy, w, h) in [0, 1] as `ssd.anchors.default_boxes`
    returns them. Returns Tensor[B, A] int64.

    SSD §2.2: every default box whose IoU with its best ground truth exceeds the threshold
    is matched to it; then every ground truth is given its own best default box, even
    below the threshold. When several ground truths want the same default box (crowded
    scenes), the one with the higher IoU keeps it and the others take their next best
    free default box, so each ground truth owns at least one (torchvision's SSDMatcher
    lets the last one win and leaves the others with none). The conflict rounds loop
    over rounds, not boxes: one round settles every uncontested ground truth at once.
    """
    overlaps = batched_iou(gt_boxes, cxcywh_to_xyxy(default_boxes))  # [B, N, A]
    overlaps = overlaps.masked_fill(~valid[..., None], -1.0)
    best_iou, best_gt = overlaps.max(dim=1)  # [B, A]
    matches = torch.where(best_iou > iou_threshold, best_gt, UNMATCHED)
    owner = assign_best_default_boxes(overlaps, valid)
    return torch.where(owner >= 0, owner, matches)


def assign_best_default_boxes(overlaps: Tensor, valid: Tensor, free: Tensor | None = None) -> Tensor:
    """Give each valid ground truth a distinct default box, best IoU first.

    overlaps: Tensor[B, N, A] (-1 on padding rows); free: Tensor[B, A] bool, default boxes
    still available (default: all). Returns Tensor[B, A] owner index or -1.
    """
    batch, n, a = overlaps.shape
    device = overlaps.device
    owner = torch.full((batch, a), UNMATCHED, dtype=torch.int64, device=device)
    free = torch.ones(batch, a, dtype=torch.bool, device=device) if free is None else free.clone()
    pending = valid.clone()
    gt_index = torch.arange(n, device=device).expand(batch, n)
    flat_base = (torch.arange(batch, device=device) * a)[:, None]  # [B, 1]
    for _ in range(n):  # each round settles >= 1 ground truth per image; usually 1 round
        if not bool(pending.any()):
            break
        score, choice = overlaps.masked_fill(~free[:, None, :], -1.0).max(dim=2)  # [B, N]
        claim = pending & (score >= 0)
        pending &= score >= 0  # nothing left to take: stop trying (more boxes than defaults)
        slot = (flat_base + choice).reshape(-1)  # [B*N] flat (image, default box)
        neg = torch.full((batch * a,), -2.0, dtype=score.dtype, device=device)
        top = neg.scatter_reduce(0, slot, torch.where(claim, score, -2.0).reshape(-1), "amax")
        winner = claim & (score == top[slot].view(batch, n))
        big = torch.full((batch * a,), n, dtype=torch.int64, device=device)
        first = big.scatter_reduce(0, slot, torch.where(winner, gt_index, n).reshape(-1), "amin")
        winner &= gt_index == first[slot].view(batch, n)  # ties: the lower index wins
        rows, cols = winner.nonzero(as_tuple=True)
        owner[rows, choice[rows, cols]] = cols
        free[rows, choice[rows, cols]] = False
        pending &= ~winner
    return owner


def match(gt_boxes: Tensor, default_boxes: Tensor, iou_threshold: float = IOU_THRESHOLD) -> Tensor:
    """One image: gt_boxes Tensor[N, 4] xyxy in [0, 1] -> Tensor[A] int64 (see `match_batch`)."""
    boxes, _, valid = pad_ground_truth([gt_boxes])
    return match_batch(boxes, valid, default_boxes, iou_threshold)[0]


def match_ground_truth(
    gt_boxes: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    default_boxes: Tensor,
    iou_threshold: float = IOU_THRESHOLD,
    matcher: BatchMatcher | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Match a batch of images' ground truth to the default boxes.

    Arguments as `encode_targets_batch`. Returns matches Tensor[B, A] int64 (the index of
    each default box's ground truth in its image, -1 = background) and the padded boxes
    Tensor[B, N, 4] and labels Tensor[B, N] that `targets_from_matches` encodes.
    Raises ValueError for a box with no area, naming the image and box index.
    """
    boxes, labels, valid = pad_ground_truth(gt_boxes, gt_labels)
    boxes = boxes.to(default_boxes)  # dtype and device of the default boxes
    labels, valid = labels.to(default_boxes.device), valid.to(default_boxes.device)
    bad = valid & ((boxes[..., 2] <= boxes[..., 0]) | (boxes[..., 3] <= boxes[..., 1]))
    if bool(bad.any()):
        image, box = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"ground-truth box {box} of image {image} has no area: {boxes[image, box].tolist()} "
            "(expected x2 > x1 and y2 > y1)"
        )
    if matcher is None:
        matches = match_batch(boxes, valid, default_boxes, iou_threshold)
    else:
        matches = matcher.match_batch(boxes, valid)
    return matches, boxes, labels


def encode_targets_batch(
    gt_boxes: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    default_boxes: Tensor,
    iou_threshold: float = IOU_THRESHOLD,
    matcher: BatchMatcher | None = None,
) -> tuple[Tensor, Tensor]:
    """Training targets for a batch of images.

    gt_boxes: B tensors [N_i, 4] xyxy in [0, 1] (N_i may be 0); gt_labels: B tensors [N_i]
    int in 1..C-1; default_boxes: Tensor[A, 4] (cx, cy, w, h) in [0, 1]. `matcher` (e.g.
    `ssd.grid_matching.GridMatcher` for the same default boxes) replaces the reference
    `match_batch` with a faster one giving the same matches.
    Returns cls_targets Tensor[B, A] int64 (0 = background) and loc_targets
    Tensor[B, A, 4] float (encoded offsets, 0 for background).
    Raises ValueError for a box with no area, naming the image and box index.
    """
    matches, boxes, labels = match_ground_truth(gt_boxes, gt_labels, default_boxes, iou_threshold, matcher)
    return targets_from_matches(matches, boxes, labels, default_boxes)


def targets_from_matches(
    matches: Tensor, boxes: Tensor, labels: Tensor, default_boxes: Tensor
) -> tuple[Tensor, Tensor]:
    """matches Tensor[B, A] (-1 = background), padded boxes Tensor[B, N, 4] xyxy, labels
    Tensor[B, N] -> (cls_targets Tensor[B, A] int64, loc_targets Tensor[B, A, 4]).

    Only the positives are encoded: they are a few dozen of thousands of default boxes.
    """
    image, anchor = (matches >= 0).nonzero(as_tuple=True)
    gt = matches[image, anchor]
    cls_targets = torch.zeros(matches.shape, dtype=torch.int64, device=matches.device)
    cls_targets[image, anchor] = labels[image, gt]
    loc_targets = boxes.new_zeros(*matches.shape, 4)
    loc_targets[image, anchor] = encode(boxes[image, gt], default_boxes[anchor])
    return cls_targets, loc_targets


def encode_targets(
    gt_boxes: Tensor,
    gt_labels: Tensor,
    default_boxes: Tensor,
    iou_threshold: float = IOU_THRESHOLD,
    matcher: BatchMatcher | None = None,
) -> tuple[Tensor, Tensor]:
    """One image: (Tensor[N, 4] xyxy in [0, 1], Tensor[N]) -> (cls Tensor[A], loc Tensor[A, 4])."""
    cls_targets, loc_targets = encode_targets_batch(
        [gt_boxes], [gt_labels], default_boxes, iou_threshold, matcher
    )
    return cls_targets[0], loc_targets[0]
