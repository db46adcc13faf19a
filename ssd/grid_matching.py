"""Fast matching that uses the grid structure of SSD's default boxes.

`ssd.matching.match_batch` computes the full [B, N, A] IoU matrix; that is the reference.
Here the same matches come from far less work, because default boxes of one shape on one
feature map form a regular grid, and IoU against a grid is separable:

* The overlap of a ground truth with the box at grid cell (i, j) is ``ox[j] * oy[i]``, where
  ``ox`` and ``oy`` are 1-D overlaps along each axis. Each ground truth's best default box of
  a shape is therefore at (argmax oy, argmax ox): O(N·f) instead of O(N·f²).
* A default box can only pass the IoU threshold if its shape could: with centres aligned,
  IoU is at most min(w)·min(h) / (a₁ + a₂ − min(w)·min(h)). Only (ground truth, shape)
  pairs under that bound get the f×f IoU block; most pairs are skipped.

Where two ground truths claim the same best default box, only the losers go through the
reference's conflict rounds, with IoU rows computed for them alone. Results equal the
reference's except between default boxes whose IoU is tied to float rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ssd.boxes import batched_iou, cxcywh_to_xyxy
from ssd.config import IOU_THRESHOLD, Config
from ssd.matching import UNMATCHED, assign_best_default_boxes

_BOUND_SLACK = 1e-4  # keep pairs whose IoU bound is within float noise of the threshold


_FAR = 4.0  # edge of padding "default boxes": far outside [0, 1], so they overlap nothing


class GridMatcher:
    """The matches of `ssd.matching.match_batch` for grid-structured default boxes.

    Identical except where a ground truth's best IoU is tied (to float rounding) between
    several default boxes: each implementation then picks one of the tied boxes.

    default_boxes: Tensor[A, 4] (cx, cy, w, h) in [0, 1] as `ssd.anchors.default_boxes`
    lays them out for `feature_maps` (sides) with `boxes_per_location` shapes each.
    Maps and shapes are padded to one [S, M, F] layout so the per-ground-truth search runs
    over all maps at once; only the threshold step visits the maps one by one.
    """

    def __init__(
        self,
        default_boxes: Tensor,
        feature_maps: list[int] | tuple[int, ...],
        boxes_per_location: list[int] | tuple[int, ...],
        iou_threshold: float = IOU_THRESHOLD,
    ):
        expected = sum(f * f * s for f, s in zip(feature_maps, boxes_per_location))
        if default_boxes.shape != (expected, 4):
            raise ValueError(
                f"default_boxes has shape {tuple(default_boxes.shape)}, expected ({expected}, 4)"
            )
        self.default_boxes = default_boxes
        self.iou_threshold = iou_threshold
        self.sizes = list(feature_maps)
        self.shapes = list(boxes_per_location)
        m, s_max, f_max = len(self.sizes), max(self.shapes), max(self.sizes)
        device = default_boxes.device
        kw = {"dtype": default_boxes.dtype, "device": device}
        self.x1, self.x2, self.y1, self.y2 = (torch.full((s_max, m, f_max), _FAR, **kw) for _ in range(4))
        self.area = torch.zeros(s_max, m, f_max, f_max, **kw)  # [S, M, F(i), F(j)]
        self.exists = torch.zeros(s_max, m, dtype=torch.bool, device=device)  # shape s is used on map m
        self.offsets = []
        xyxy = cxcywh_to_xyxy(default_boxes)
        offset = 0
        for k, (f, s) in enumerate(zip(self.sizes, self.shapes)):
            block = xyxy[offset : offset + f * f * s].view(f, f, s, 4)  # [i, j, shape, coord]
            x1, x2 = block[0, :, :, 0].T, block[0, :, :, 2].T  # [S, f] edges at column j
            y1, y2 = block[:, 0, :, 1].T, block[:, 0, :, 3].T  # [S, f] edges at row i
            grid_x = torch.equal(block[..., 0], x1.T.expand(f, f, s))
            if not (grid_x and torch.equal(block[..., 1], y1.T[:, None].expand(f, f, s))):
                raise ValueError("default_boxes are not laid out as a grid per feature map")
            self.x1[:s, k, :f], self.x2[:s, k, :f], self.y1[:s, k, :f], self.y2[:s, k, :f] = x1, x2, y1, y2
            # same products as the reference's per-box area, so IoUs agree to the bit
            self.area[:s, k, :f, :f] = (x2 - x1)[:, None, :] * (y2 - y1)[:, :, None]
            self.exists[:s, k] = True
            self.offsets.append(offset)
            offset += f * f * s
        self.shape_w = self.x2[:, :, 0] - self.x1[:, :, 0]  # [S, M] width of each shape
        self.shape_h = self.y2[:, :, 0] - self.y1[:, :, 0]
        s_idx = torch.arange(s_max, device=device)[:, None]
        size = torch.tensor(self.sizes, device=device)
        nshape = torch.tensor(self.shapes, device=device)
        offsets = torch.tensor(self.offsets, device=device)
        # index of the default box (shape s, map m, row i, column j) = base + (i*f + j)*S_m
        self._base = offsets + s_idx  # [S, M]
        self._row_stride = size * nshape  # [M]
        self._col_stride = nshape  # [M]

    @classmethod
    def from_config(cls, cfg: Config, default_boxes: Tensor) -> GridMatcher:
        a = cfg.anchors
        return cls(default_boxes, a.feature_maps, a.boxes_per_location(), cfg.train.iou_threshold)

    def match_batch(self, gt_boxes: Tensor, valid: Tensor) -> Tensor:
        """gt_boxes Tensor[B, N, 4] xyxy in [0, 1], valid Tensor[B, N] -> Tensor[B, A] int64."""
        image, gt = valid.nonzero(as_tuple=True)  # G real ground truths, no padding work
        boxes = gt_boxes[image, gt]  # [G, 4]
        x1, y1, x2, y2 = (c[:, None, None, None] for c in boxes.unbind(-1))  # [G, 1, 1, 1]
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # [G]
        ox = (torch.minimum(x2, self.x2) - torch.maximum(x1, self.x1)).clamp(min=0)  # [G, S, M, F]
        oy = (torch.minimum(y2, self.y2) - torch.maximum(y1, self.y1)).clamp(min=0)
        matches = torch.full(
            (gt_boxes.shape[0], self.default_boxes.shape[0]),
            UNMATCHED,
            dtype=torch.int64,
            device=gt_boxes.device,
        )
        self._threshold_matches(ox, oy, boxes, area, image, gt, matches)
        best_iou, best_box = self._best_per_ground_truth(ox, oy, area)
        self._force_best(matches, best_iou, best_box, image, gt, boxes)
        return matches

    def _best_per_ground_truth(self, ox: Tensor, oy: Tensor, area: Tensor) -> tuple[Tensor, Tensor]:
        """IoU and index of each ground truth's best default box, Tensor[G] each.

        The overlap with cell (i, j) is ox[j]·oy[i], so per (shape, map) the best cell is
        (argmax oy, argmax ox); ties go to the lowest index, as the reference's argmax.
        """
        ox_max, j = ox.max(-1)  # [G, S, M]
        oy_max, i = oy.max(-1)
        inter = ox_max * oy_max
        s_idx = torch.arange(self.area.shape[0], device=ox.device)[:, None]
        m_idx = torch.arange(self.area.shape[1], device=ox.device)
        iou = inter / (area[:, None, None] + self.area[s_idx, m_idx, i, j] - inter)
        iou = torch.where(self.exists, iou, -1.0).flatten(-2)  # [G, S*M]
        index = (self._base + i * self._row_stride + j * self._col_stride).flatten(-2)
        best = iou.max(-1, keepdim=True).values
        first = torch.where(iou == best, index, torch.iinfo(index.dtype).max).min(-1).values
        return best[:, 0], first

    def _threshold_matches(self, ox, oy, boxes, area, image, gt, matches) -> None:
        """Default boxes with IoU > threshold take their best ground truth (in place)."""
        mw = torch.minimum((boxes[:, 2] - boxes[:, 0])[:, None, None], self.shape_w)  # [G, S, M]
        mh = torch.minimum((boxes[:, 3] - boxes[:, 1])[:, None, None], self.shape_h)
        # IoU can't beat that of the two shapes with aligned centres
        bound = mw * mh / (area[:, None, None] + self.shape_w * self.shape_h - mw * mh)
        q, s, m = ((bound > self.iou_threshold - _BOUND_SLACK) & self.exists).nonzero(as_tuple=True)
        slots, values, gts = [], [], []
        for map_index, f in enumerate(self.sizes):
            sel = (m == map_index).nonzero(as_tuple=True)[0]
            if sel.numel() == 0:
                continue
            qs, ss = q[sel], s[sel]
            inter = oy[qs, ss, map_index, :f][:, :, None] * ox[qs, ss, map_index, :f][:, None, :]  # [n, f, f]
            union = area[qs][:, None, None] + self.area[ss, map_index, :f, :f] - inter
            iou = (inter / union).reshape(len(sel), -1)  # [n, f*f] cells row-major
            pair, cell = (iou > self.iou_threshold).nonzero(as_tuple=True)
            anchor = self.offsets[map_index] + cell * self.shapes[map_index] + ss[pair]
            slots.append(image[qs[pair]] * matches.shape[1] + anchor)
            values.append(iou[pair, cell])
            gts.append(gt[qs[pair]])
        if not slots:
            return
        slot, value, owner = torch.cat(slots), torch.cat(values), torch.cat(gts)
        # One winner per default box: highest IoU, ties to the lowest ground-truth index
        # (as the reference's max over ground truths). Stable sorts, last key first.
        order = owner.argsort(stable=True)
        order = order[value[order].argsort(descending=True, stable=True)]
        order = order[slot[order].argsort(stable=True)]
        ordered = slot[order]
        first = torch.ones_like(ordered, dtype=torch.bool)
        first[1:] = ordered[1:] != ordered[:-1]
        matches.view(-1)[ordered[first]] = owner[order[first]]

    def _force_best(self, matches, best_iou, best_box, image, gt, boxes) -> None:
        """Each ground truth owns a default box (in place), as the reference's rounds do.

        Round one is every ground truth's own best box; where several claim one box the
        highest IoU (then the lowest index) keeps it, and only the others go through the
        reference's further rounds, with IoU rows computed for them alone.
        """
        slot = image * matches.shape[1] + best_box
        order = best_iou.argsort(descending=True, stable=True)
        order = order[slot[order].argsort(stable=True)]
        ordered = slot[order]
        keeps = torch.ones_like(ordered, dtype=torch.bool)
        keeps[1:] = ordered[1:] != ordered[:-1]
        matches.view(-1)[ordered[keeps]] = gt[order[keeps]]
        losers = order[~keeps]
        if losers.numel() == 0:
            return
        taken = torch.zeros(matches.shape, dtype=torch.bool, device=matches.device)
        taken.view(-1)[ordered[keeps]] = True
        # pack the losers image by image: [L images, K losers, ...]
        losers = losers[image[losers].argsort(stable=True)]
        lose_image = image[losers]
        images, packed, counts = lose_image.unique_consecutive(return_inverse=True, return_counts=True)
        pos = torch.arange(len(losers), device=image.device) - (counts.cumsum(0) - counts)[packed]
        shape = (len(images), int(counts.max()))
        packed_boxes = torch.ones(*shape, 4, dtype=boxes.dtype, device=boxes.device)
        packed_boxes[packed, pos] = boxes[losers]
        packed_valid = torch.zeros(shape, dtype=torch.bool, device=boxes.device)
        packed_valid[packed, pos] = True
        packed_gt = torch.zeros(shape, dtype=torch.int64, device=boxes.device)
        packed_gt[packed, pos] = gt[losers]
        overlaps = batched_iou(packed_boxes, cxcywh_to_xyxy(self.default_boxes))
        overlaps = overlaps.masked_fill(~packed_valid[..., None], -1.0)
        owner = assign_best_default_boxes(overlaps, packed_valid, free=~taken[images])  # [L, A]
        rows, cols = (owner >= 0).nonzero(as_tuple=True)
        matches[images[rows], cols] = packed_gt[rows, owner[rows, cols]]
