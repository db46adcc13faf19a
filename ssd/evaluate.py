"""COCO bounding-box mAP of SSD detections, computed by pycocotools' ``COCOeval``.

Detections arrive per image as ``boxes`` float [N, 4] xyxy in the original image's pixels,
``scores`` float [N] and ``labels`` int [N] holding contiguous class labels 1..K (0 is
background and never a detection). Ground truth is a COCO-format dict (or a
``pycocotools.coco.COCO``) whose category ids may be non-contiguous (COCO uses 1..90);
``label_to_category_id`` gives the rule that ties the two: sort the categories by id and
label k is the k-th of them, counting from 1.

``CocoEvaluator`` follows the streaming pattern of torchvision's reference evaluator:
``update`` is fed per batch and only keeps a compact [M, 7] array of results, and
``summarize`` runs ``COCOeval`` once over everything gathered. No COCO AP arithmetic is
done here; every COCO number comes from pycocotools. Beside them ``summarize`` reports the
Pascal VOC AP@0.5 of the same detections (VOC2007 11-point and all-point, `ssd.voc_eval`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ssd.voc_eval import voc_average_precision

logger = logging.getLogger(__name__)

# Names of COCOeval.stats, in COCOeval's own order (see COCOeval.summarize).
STAT_NAMES = (
    "map",
    "map50",
    "map75",
    "map_small",
    "map_medium",
    "map_large",
    "mar_1",
    "mar_10",
    "mar_100",
    "mar_small",
    "mar_medium",
    "mar_large",
)
# Column layout of a result row, the [imageID, x, y, w, h, score, class] layout that
# COCO.loadRes accepts for numpy arrays.
_ROW_WIDTH = 7
# COCO's headline numbers use every object size and up to 100 detections per image.
_ALL_AREAS = "all"
_MAX_DETS = 100

ArrayLike = torch.Tensor | np.ndarray | Sequence


def _as_coco(coco_gt: dict | COCO) -> COCO:
    """Index a COCO-format dict, leaving the caller's dict untouched.

    A deep copy is taken because COCOeval writes an ``ignore`` flag into every ground-truth
    annotation it evaluates.
    """
    if isinstance(coco_gt, COCO):
        return coco_gt
    missing = [key for key in ("images", "annotations", "categories") if key not in coco_gt]
    if missing:
        raise ValueError(f"COCO ground truth is missing the key(s) {missing}; expected a COCO-format dict")
    coco = COCO()
    coco.dataset = copy.deepcopy(coco_gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def label_to_category_id(coco_gt: dict | COCO) -> dict[int, int]:
    """Map contiguous labels 1..K to the ground truth's category ids, sorted by id.

    Label 0 is background and has no category.
    """
    categories = coco_gt.dataset["categories"] if isinstance(coco_gt, COCO) else coco_gt["categories"]
    category_ids = sorted(int(category["id"]) for category in categories)
    return {label: category_id for label, category_id in enumerate(category_ids, start=1)}


def category_id_to_label(coco_gt: dict | COCO) -> dict[int, int]:
    """Inverse of `label_to_category_id`: category id -> contiguous label 1..K."""
    return invert_mapping(label_to_category_id(coco_gt))


def invert_mapping(label_to_cat: Mapping[int, int]) -> dict[int, int]:
    """Invert a label -> category id mapping; raises if two labels share a category."""
    inverse = {int(category_id): int(label) for label, category_id in label_to_cat.items()}
    if len(inverse) != len(label_to_cat):
        raise ValueError(f"label -> category id mapping is not one-to-one: {dict(label_to_cat)}")
    return inverse


def _as_numpy(values: ArrayLike, dtype: type) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)


def _result_rows(
    image_id: int,
    boxes: ArrayLike,
    scores: ArrayLike,
    labels: ArrayLike,
    label_to_cat: Mapping[int, int],
) -> np.ndarray:
    """Convert one image's detections to rows [N, 7] of (image_id, x, y, w, h, score, category_id).

    Float64 keeps integer image and category ids exact (up to 2**53).
    """
    boxes_np = _as_numpy(boxes, np.float64)
    scores_np = _as_numpy(scores, np.float64)
    labels_np = _as_numpy(labels, np.int64)
    if boxes_np.size == 0:
        boxes_np = boxes_np.reshape(0, 4)
    n = boxes_np.shape[0]
    if boxes_np.shape != (n, 4) or scores_np.shape != (n,) or labels_np.shape != (n,):
        raise ValueError(
            f"image {image_id}: expected boxes [N, 4], scores [N] and labels [N], got "
            f"{tuple(boxes_np.shape)}, {tuple(scores_np.shape)} and {tuple(labels_np.shape)}"
        )
    unknown = sorted(set(labels_np.tolist()) - set(label_to_cat))
    if unknown:
        raise ValueError(
            f"image {image_id}: label(s) {unknown} have no category id; expected labels in "
            f"{sorted(label_to_cat)} (0 is background and is never a detection)"
        )
    rows = np.empty((n, _ROW_WIDTH), dtype=np.float64)
    rows[:, 0] = image_id
    rows[:, 1:3] = boxes_np[:, :2]
    rows[:, 3:5] = boxes_np[:, 2:] - boxes_np[:, :2]  # xyxy -> wh
    rows[:, 5] = scores_np
    rows[:, 6] = [label_to_cat[label] for label in labels_np.tolist()]
    return rows


def _rows_to_results(rows: np.ndarray) -> list[dict]:
    return [
        {
            "image_id": int(row[0]),
            "category_id": int(row[6]),
            "bbox": [float(row[1]), float(row[2]), float(row[3]), float(row[4])],
            "score": float(row[5]),
        }
        for row in rows
    ]


def _results_to_rows(results: Iterable[Mapping[str, Any]]) -> np.ndarray:
    rows = [
        [result["image_id"], *result["bbox"], result["score"], result["category_id"]] for result in results
    ]
    return np.asarray(rows, dtype=np.float64).reshape(-1, _ROW_WIDTH)


def to_coco_results(
    image_id: int,
    boxes: ArrayLike,
    scores: ArrayLike,
    labels: ArrayLike,
    label_to_cat: Mapping[int, int],
) -> list[dict]:
    """One image's detections in COCO results format.

    Args:
        image_id: COCO image id.
        boxes: float [N, 4], xyxy, original image pixels (tensor or array).
        scores: float [N].
        labels: int [N], contiguous labels 1..K.
        label_to_cat: contiguous label -> COCO category id.

    Returns:
        N dicts ``{"image_id", "category_id", "bbox": [x, y, w, h] pixels, "score"}`` of plain
        Python numbers, ready for JSON or for another process's `CocoEvaluator.add_results`.
    """
    return _rows_to_results(_result_rows(int(image_id), boxes, scores, labels, label_to_cat))


def _load_results(coco_gt: COCO, rows: np.ndarray) -> COCO:
    """Index result rows [M, 7] like ``COCO.loadRes``, which cannot take zero results."""
    if len(rows):
        return coco_gt.loadRes(rows)
    coco_dt = COCO()
    coco_dt.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": copy.deepcopy(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    coco_dt.createIndex()
    return coco_dt


def _undefined_to_nan(value: float) -> float:
    # COCOeval writes -1 where a setting has no ground truth; NaN cannot be mistaken for a score.
    return float("nan") if value == -1 else float(value)


class CocoEvaluator:
    """Gather detections batch by batch, then compute COCO bbox metrics once.

    Only the images passed to `update` (or named in `add_results`) are evaluated: an image
    passed with no detections still counts, so its ground truth are misses; ground-truth
    images that were never passed are left out, so evaluating a subset of a dataset gives
    that subset's mAP. Passing the same image twice raises, as it would count its
    detections twice.

    After `summarize`, ``last_eval`` holds the ``COCOeval`` (its ``eval["precision"]`` is
    [T=10 IoUs, R=101 recalls, K categories, A=4 areas, M=3 max-dets]) and
    `precision_recall` slices per-class curves out of it.
    """

    def __init__(self, coco_gt: dict | COCO, label_to_cat: Mapping[int, int] | None = None) -> None:
        self.coco_gt = _as_coco(coco_gt)
        self.label_to_cat = (
            dict(label_to_cat) if label_to_cat is not None else label_to_category_id(self.coco_gt)
        )
        invert_mapping(self.label_to_cat)  # raises unless one label per category
        unknown = sorted(set(self.label_to_cat.values()) - set(self.coco_gt.getCatIds()))
        if unknown:
            raise ValueError(f"label_to_cat names category ids {unknown} that the ground truth does not have")
        self._known_image_ids = set(self.coco_gt.getImgIds())
        self._image_ids: set[int] = set()
        self._rows: list[np.ndarray] = []  # each [M, 7], see _result_rows
        self.last_eval: COCOeval | None = None

    @property
    def image_ids(self) -> list[int]:
        """Sorted ids of the images gathered so far."""
        return sorted(self._image_ids)

    @property
    def num_detections(self) -> int:
        return sum(len(rows) for rows in self._rows)

    def _register_images(self, image_ids: Iterable[int]) -> None:
        id_list = [int(image_id) for image_id in image_ids]
        ids = set(id_list)
        if len(ids) != len(id_list):
            repeated = sorted({image_id for image_id in id_list if id_list.count(image_id) > 1})
            raise ValueError(f"image id(s) {repeated[:10]} appear more than once; they would count twice")
        unknown = sorted(ids - self._known_image_ids)
        if unknown:
            raise ValueError(f"image id(s) {unknown[:10]} are not in the ground truth")
        repeated = sorted(ids & self._image_ids)
        if repeated:
            raise ValueError(f"image id(s) {repeated[:10]} were already gathered; they would count twice")
        self._image_ids |= ids

    def update(
        self,
        image_ids: ArrayLike,
        boxes_list: Sequence[ArrayLike],
        scores_list: Sequence[ArrayLike],
        labels_list: Sequence[ArrayLike],
    ) -> None:
        """Add one batch of B images' detections.

        Args:
            image_ids: int [B] COCO image ids.
            boxes_list: B float arrays [N_i, 4], xyxy, original image pixels.
            scores_list: B float arrays [N_i].
            labels_list: B int arrays [N_i], contiguous labels 1..K.
        """
        ids = _as_numpy(image_ids, np.int64).reshape(-1).tolist()
        if not len(ids) == len(boxes_list) == len(scores_list) == len(labels_list):
            raise ValueError(
                f"update() got {len(ids)} image ids but {len(boxes_list)} boxes, "
                f"{len(scores_list)} scores and {len(labels_list)} labels entries; expected one per image"
            )
        rows = [
            _result_rows(image_id, boxes, scores, labels, self.label_to_cat)
            for image_id, boxes, scores, labels in zip(ids, boxes_list, scores_list, labels_list, strict=True)
        ]
        self._register_images(ids)
        self._rows.extend(r for r in rows if len(r))

    def add_results(
        self, results: Sequence[Mapping[str, Any]], image_ids: Iterable[int] | None = None
    ) -> None:
        """Merge COCO-format results (e.g. from `to_coco_results` in another worker).

        ``image_ids`` names every image those results cover, including images with no
        detection; without it only the images that appear in ``results`` are counted.
        """
        rows = _results_to_rows(results)
        covered = set(rows[:, 0].astype(np.int64).tolist())
        if image_ids is not None:
            named = {int(image_id) for image_id in image_ids}
            if not covered <= named:
                raise ValueError(f"results hold image id(s) {sorted(covered - named)[:10]} not in image_ids")
            covered = named
        unknown_cats = sorted(set(rows[:, 6].astype(np.int64).tolist()) - set(self.coco_gt.getCatIds()))
        if unknown_cats:
            raise ValueError(
                f"results hold category id(s) {unknown_cats} that the ground truth does not have"
            )
        self._register_images(covered)
        if len(rows):
            self._rows.append(rows)

    def results(self) -> list[dict]:
        """Everything gathered so far, in COCO results format (e.g. to ship to another process)."""
        return _rows_to_results(self._all_rows())

    def _all_rows(self) -> np.ndarray:
        return np.concatenate(self._rows) if self._rows else np.zeros((0, _ROW_WIDTH))

    def summarize(self) -> dict[str, Any]:
        """Run COCOeval (bbox) on the gathered images.

        Returns:
            ``STAT_NAMES`` keys (``map`` = AP@[.5:.95], ``map50``, ``map75``, ``map_small``,
            ``map_medium``, ``map_large``, ``mar_1``, ``mar_10``, ``mar_100``, ``mar_small``,
            ``mar_medium``, ``mar_large``) as floats in [0, 1], NaN where the evaluated images
            hold no ground truth of that kind (COCOeval's -1); ``per_class`` and
            ``per_class50``, {category name: AP@[.5:.95] / AP@0.5}, omitting categories with
            no non-crowd ground truth in the evaluated images; ``voc07_map50`` and
            ``voc_map50``, Pascal VOC's mAP@0.5 (11-point and all-point, crowd boxes as
            difficult: `ssd.voc_eval.voc_average_precision`) with ``per_class_voc07`` and
            ``per_class_voc``; and ``summary_text``, the twelve lines COCOeval would print.
        """
        if not self._image_ids:
            raise ValueError("no images were passed to update() or add_results(); nothing to evaluate")
        rows = self._all_rows()
        logger.info("COCO bbox evaluation of %d detections on %d images", len(rows), len(self._image_ids))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            coco_eval = COCOeval(self.coco_gt, _load_results(self.coco_gt, rows), iouType="bbox")
            coco_eval.params.imgIds = self.image_ids
            coco_eval.evaluate()
            coco_eval.accumulate()
        summary = io.StringIO()
        with contextlib.redirect_stdout(summary):
            coco_eval.summarize()
        logger.debug("pycocotools output:\n%s", printed.getvalue())
        self.last_eval = coco_eval

        metrics: dict[str, Any] = {
            name: _undefined_to_nan(value) for name, value in zip(STAT_NAMES, coco_eval.stats, strict=True)
        }
        metrics["per_class"] = self._per_class_ap(iou=None)
        metrics["per_class50"] = self._per_class_ap(iou=0.5)
        category_ids = coco_eval.params.catIds
        names = dict(zip(category_ids, self._category_names()))
        truth = self.coco_gt.loadAnns(self.coco_gt.getAnnIds(imgIds=self.image_ids))
        metrics.update(voc_average_precision(truth, rows, self.image_ids, names))
        metrics["summary_text"] = summary.getvalue().rstrip("\n")
        return metrics

    def _precision(self, iou: float | None) -> np.ndarray:
        """Precision [T or 1, R=101, K] at area "all" and 100 detections, -1 where undefined."""
        coco_eval = self._require_eval()
        params = coco_eval.params
        precision = coco_eval.eval["precision"]  # [T, R, K, A, M]
        precision = precision[:, :, :, params.areaRngLbl.index(_ALL_AREAS), params.maxDets.index(_MAX_DETS)]
        if iou is None:
            return precision
        return precision[[self._iou_index(iou)]]

    def _iou_index(self, iou: float) -> int:
        thresholds = self._require_eval().params.iouThrs
        matches = np.flatnonzero(np.isclose(thresholds, iou))
        if len(matches) == 0:
            raise ValueError(f"IoU {iou} is not one of COCOeval's thresholds {thresholds.tolist()}")
        return int(matches[0])

    def _require_eval(self) -> COCOeval:
        if self.last_eval is None:
            raise RuntimeError("call summarize() before asking for per-class results")
        return self.last_eval

    def _category_names(self) -> list[str]:
        category_ids = self._require_eval().params.catIds
        return [category["name"] for category in self.coco_gt.loadCats(category_ids)]

    def _per_class_ap(self, iou: float | None) -> dict[str, float]:
        # Same reduction as COCOeval.summarize: mean over the defined (> -1) entries.
        precision = self._precision(iou)  # [T, R, K]
        per_class = {}
        for k, name in enumerate(self._category_names()):
            defined = precision[:, :, k][precision[:, :, k] > -1]
            if defined.size:
                per_class[name] = float(defined.mean())
        return per_class

    def precision_recall(self, iou: float = 0.5) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per-class precision-recall curves from the last `summarize`.

        Returns:
            {category name: (recall [101], precision [101])}: recall is COCO's grid
            0, 0.01, ..., 1; precision is COCO's interpolated precision (non-increasing in
            recall, 0 beyond the highest recall reached) at IoU ``iou``, all object sizes,
            up to 100 detections per image. Categories without ground truth are omitted.
        """
        recall = self._require_eval().params.recThrs.copy()  # [101]
        precision = self._precision(iou)[0]  # [101, K]
        return {
            name: (recall, precision[:, k].copy())
            for k, name in enumerate(self._category_names())
            if (precision[:, k] > -1).any()
        }


def evaluate_detections(
    coco_gt: dict | COCO,
    results: Sequence[Mapping[str, Any]],
    image_ids: Iterable[int] | None = None,
) -> dict[str, Any]:
    """COCO bbox metrics of COCO-format ``results`` in one call (see `CocoEvaluator.summarize`).

    ``image_ids`` defaults to every image of the ground truth, the usual meaning of a
    results file for a whole split.
    """
    evaluator = CocoEvaluator(coco_gt)
    if image_ids is None:
        image_ids = evaluator.coco_gt.getImgIds()
    evaluator.add_results(results, image_ids=image_ids)
    return evaluator.summarize()
