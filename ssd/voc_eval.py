"""Pascal VOC average precision at IoU 0.5, by the rules of the Python port of the VOC devkit
that py-faster-rcnn and detectron2 use (``voc_eval``; the SSD paper's tables are VOC2007 mAP).

Per class, every detection of the evaluated images is taken in order of falling score and
compared with the ground truth of its image: the box it overlaps most (IoU over boxes as
continuous xyxy areas; VOC's 1-based inclusive pixel corners become such areas on reading,
`pipelines.data.voc`) makes it a true positive when the IoU is above 0.5 and that box was not
found already, a duplicate or a miss is a false positive, and a detection whose best box is
*difficult* counts as neither (an IoU of exactly 0.5 is a miss, as in that port; the MATLAB
devkit counts it). Detections of equal score keep their order (a stable sort). Difficult
boxes (COCO's crowd regions too) are not counted as objects to find. Precision and recall
follow the detections down the list; the AP is

* ``voc07``: the VOC2007 11-point average, the mean over recall thresholds 0, 0.1, ..., 1 of
  the best precision at that recall or beyond (0 where it is never reached);
* ``voc``: the all-point average of VOC2010 onwards, the area under the precision envelope
  (precision made non-increasing in recall) at every recall the list reaches.

A class with no non-difficult ground truth in the evaluated images has no AP and is left out
of the mean, as COCOeval leaves out categories without ground truth.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

IOU_THRESHOLD = 0.5
METHODS = ("voc07", "voc")
_CHUNK = 16_384  # detections matched at once


def average_precision(recall: np.ndarray, precision: np.ndarray, method: str) -> float:
    """AP of a ranked list's recall and precision (both [D], in list order); see the module doc."""
    if method == "voc07":
        points = [precision[recall >= t].max() if (recall >= t).any() else 0.0 for t in np.linspace(0, 1, 11)]
        return float(np.mean(points))
    if method != "voc":
        raise ValueError(f"method {method!r}: expected one of {METHODS}")
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # the envelope: best precision at this recall or beyond
    steps = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    return float(np.sum((mrec[steps] - mrec[steps - 1]) * mpre[steps]))


def _iou(boxes: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """IoU of boxes [D, 4] with each one's own ground truth [D, G, 4] (xyxy) -> [D, G]."""
    b, t = boxes[:, None, :], truth
    width = np.clip(np.minimum(b[..., 2], t[..., 2]) - np.maximum(b[..., 0], t[..., 0]), 0, None)
    height = np.clip(np.minimum(b[..., 3], t[..., 3]) - np.maximum(b[..., 1], t[..., 1]), 0, None)
    inter = width * height
    union = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]) + (t[..., 2] - t[..., 0]) * (
        t[..., 3] - t[..., 1]
    )
    union = union - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def class_recall_precision(
    detections: np.ndarray,
    truth: Mapping[int, tuple[np.ndarray, np.ndarray]],
    iou_threshold: float = IOU_THRESHOLD,
) -> tuple[np.ndarray, np.ndarray] | None:
    """One class: detections [D, 6] (image_id, x1, y1, x2, y2, score) and, per image id, its
    ground truth (boxes [G, 4] xyxy, difficult bool [G]) -> (recall [D'], precision [D']) over
    the detections that count, or None when no ground truth counts.

    Vectorised: a box's first detection in score order with IoU above the threshold finds it
    (what the devkit's loop over detections does, one image's boxes at a time)."""
    positives = sum(int((~difficult).sum()) for _, difficult in truth.values())
    if positives == 0:
        return None
    detections = detections[np.argsort(-detections[:, 5], kind="stable")]
    image_ids = np.array(sorted(truth), dtype=np.int64)
    most = max(1, max(len(boxes) for boxes, _ in truth.values()))
    boxes = np.zeros((len(image_ids), most, 4))
    difficult = np.zeros((len(image_ids), most), dtype=bool)
    valid = np.zeros((len(image_ids), most), dtype=bool)
    for row, image_id in enumerate(image_ids.tolist()):
        image_boxes, image_difficult = truth[image_id]
        boxes[row, : len(image_boxes)] = image_boxes
        difficult[row, : len(image_boxes)] = image_difficult
        valid[row, : len(image_boxes)] = True
    det_ids = detections[:, 0].astype(np.int64)
    rows = np.clip(np.searchsorted(image_ids, det_ids), 0, len(image_ids) - 1)
    has_truth = image_ids[rows] == det_ids
    overlaps = np.full((len(detections), most), -1.0)
    for start in range(0, len(detections), _CHUNK):  # bounded memory: [chunk, G, 4] at a time
        part = np.flatnonzero(has_truth[start : start + _CHUNK]) + start
        truth_rows = rows[part]
        overlaps[part] = np.where(valid[truth_rows], _iou(detections[part, 1:5], boxes[truth_rows]), -1.0)
    best = overlaps.argmax(axis=1)  # the first of equal overlaps, as np.argmax in the devkit
    hit = has_truth & (overlaps[np.arange(len(detections)), best] > iou_threshold)
    ignored = hit & difficult[rows, best]
    candidates = np.flatnonzero(hit & ~ignored)
    _, first = np.unique(rows[candidates] * most + best[candidates], return_index=True)
    found = np.zeros(len(detections), dtype=bool)
    found[candidates[first]] = True  # later detections of the same box are duplicates
    true_positives = np.cumsum(found)
    false_positives = np.cumsum(~found & ~ignored)
    recall = true_positives / positives
    precision = true_positives / np.maximum(true_positives + false_positives, np.finfo(np.float64).eps)
    return recall, precision


def voc_average_precision(
    truth: Iterable[Mapping[str, Any]],
    detections: np.ndarray,
    image_ids: Sequence[int],
    categories: Mapping[int, str],
    iou_threshold: float = IOU_THRESHOLD,
) -> dict[str, Any]:
    """VOC AP@0.5 of COCO-format ground truth and detections on `image_ids`.

    truth: COCO annotations (``image_id``, ``category_id``, ``bbox`` [x, y, w, h] pixels,
    ``iscrowd`` / ``ignore`` = difficult); detections [M, 7] rows (image_id, x, y, w, h, score,
    category_id), the layout `ssd.evaluate` gathers; categories {category id: name}.
    Returns ``voc07_map50`` and ``voc_map50`` (the means; NaN when no class has ground truth)
    and ``per_class_voc07`` / ``per_class_voc`` {name: AP}.
    """
    wanted = {int(i) for i in image_ids}
    per_image: dict[int, dict[int, list]] = {}
    for ann in truth:
        image_id = int(ann["image_id"])
        if image_id not in wanted:
            continue
        x, y, w, h = (float(v) for v in ann["bbox"])
        difficult = bool(ann.get("iscrowd", 0) or ann.get("ignore", 0))
        per_image.setdefault(int(ann["category_id"]), {}).setdefault(image_id, []).append(
            ([x, y, x + w, y + h], difficult)
        )
    rows = np.asarray(detections, dtype=np.float64).reshape(-1, 7)
    rows = rows[np.isin(rows[:, 0].astype(np.int64), list(wanted))]
    out: dict[str, Any] = {f"per_class_{m}": {} for m in METHODS}
    for category_id, name in categories.items():
        truth_of = {
            image_id: (np.asarray([b for b, _ in items], np.float64), np.asarray([d for _, d in items], bool))
            for image_id, items in per_image.get(int(category_id), {}).items()
        }
        mine = rows[rows[:, 6].astype(np.int64) == int(category_id)]
        xyxy = np.column_stack(
            [mine[:, 0], mine[:, 1], mine[:, 2], mine[:, 1] + mine[:, 3], mine[:, 2] + mine[:, 4], mine[:, 5]]
        )
        curve = class_recall_precision(xyxy, truth_of, iou_threshold)
        if curve is None:
            continue
        for method in METHODS:
            out[f"per_class_{method}"][name] = average_precision(*curve, method)  # 0 with no detection
    for method in METHODS:
        values = list(out[f"per_class_{method}"].values())
        out[f"{method}_map50"] = float(np.mean(values)) if values else float("nan")
    return out
