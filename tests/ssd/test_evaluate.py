"""COCO mAP through pycocotools: golden cases, pycocotools itself as the oracle, edge cases."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ssd.evaluate import (
    STAT_NAMES,
    CocoEvaluator,
    category_id_to_label,
    evaluate_detections,
    label_to_category_id,
    to_coco_results,
)

# Categories listed out of id order on purpose; sorted ids 3, 7, 90 become labels 1, 2, 3.
CATEGORIES = [
    {"id": 90, "name": "toothbrush"},
    {"id": 3, "name": "car"},
    {"id": 7, "name": "train"},
]
CAR, TRAIN, TOOTHBRUSH = 1, 2, 3  # contiguous labels
LABEL_OF_CAT = {3: CAR, 7: TRAIN, 90: TOOTHBRUSH}

# (image id, category id, [x, y, w, h] pixels, iscrowd). COCO size ranges by area:
# small < 32² = 1024 <= medium < 96² = 9216 <= large.
GT_BOXES = [
    (11, 3, [10, 10, 20, 20], 0),  # small
    (11, 7, [100, 100, 100, 80], 0),  # medium
    (11, 90, [300, 200, 200, 150], 0),  # large
    (22, 3, [50, 60, 120, 100], 0),  # large
    (22, 3, [400, 300, 30, 25], 0),  # small
    (22, 7, [0, 0, 300, 300], 1),  # crowd: detections inside it are neither hits nor misses
    (33, 7, [200, 100, 60, 50], 0),  # medium
    (33, 90, [20, 300, 15, 40], 0),  # small
]
IMAGE_IDS = [11, 22, 33, 44]  # image 44 has no objects


def make_gt() -> dict:
    return {
        "images": [{"id": i, "width": 640, "height": 480, "file_name": f"{i}.jpg"} for i in IMAGE_IDS],
        "annotations": [
            {
                "id": n,
                "image_id": img,
                "category_id": cat,
                "bbox": box,
                "area": box[2] * box[3],
                "iscrowd": crowd,
            }
            for n, (img, cat, box, crowd) in enumerate(GT_BOXES, start=1)
        ],
        "categories": copy.deepcopy(CATEGORIES),
    }


# (image id, category id, [x, y, w, h], score) with integer pixels so xyxy <-> xywh is exact.
IMPERFECT_RESULTS = [
    (11, 3, [13, 12, 20, 20], 0.7),  # car shifted by (3, 2): IoU 0.6 hits at 0.5, misses at 0.75
    (11, 7, [100, 100, 100, 80], 0.9),  # exact train; the large toothbrush is missed
    (11, 3, [500, 20, 40, 40], 0.95),  # false positive car, highest score of all
    (22, 3, [50, 60, 120, 100], 0.8),  # exact large car
    (22, 7, [400, 300, 30, 25], 0.75),  # the small car labelled train: wrong class
    (33, 7, [210, 105, 60, 50], 0.6),  # train shifted by (10, 5): IoU ~0.63
    (33, 90, [20, 300, 15, 40], 0.5),  # exact toothbrush
    (44, 90, [100, 100, 50, 50], 0.85),  # false positive on an image without objects
]


def as_result_dicts(rows) -> list[dict]:
    return [{"image_id": i, "category_id": c, "bbox": list(b), "score": s} for i, c, b, s in rows]


def per_image_detections(rows, image_ids=IMAGE_IDS):
    """Rows -> per-image (boxes [N, 4] xyxy, scores [N], labels [N]) tensors, as a model emits them."""
    boxes, scores, labels = [], [], []
    for image_id in image_ids:
        mine = [r for r in rows if r[0] == image_id]
        boxes.append(torch.tensor([[x, y, x + w, y + h] for _, _, (x, y, w, h), _ in mine]).reshape(-1, 4))
        scores.append(torch.tensor([s for *_, s in mine], dtype=torch.float64))
        labels.append(torch.tensor([LABEL_OF_CAT[c] for _, c, _, _ in mine], dtype=torch.int64))
    return boxes, scores, labels


def perfect_rows():
    rows = [(img, cat, box, 1.0) for img, cat, box, crowd in GT_BOXES if not crowd]
    # A detection wholly inside the crowd region is ignored, not a false positive.
    return [*rows, (22, 7, [10, 10, 90, 90], 1.0)]


def direct_cocoeval(gt: dict, results: list[dict], image_ids=None) -> COCOeval:
    """pycocotools used exactly as its README shows: the oracle."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), iouType="bbox")
        if image_ids is not None:
            coco_eval.params.imgIds = image_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


def evaluate_batches(rows, batches) -> tuple[CocoEvaluator, dict]:
    evaluator = CocoEvaluator(make_gt())
    for image_ids in batches:
        evaluator.update(torch.tensor(image_ids), *per_image_detections(rows, image_ids))
    return evaluator, evaluator.summarize()


def test_labels_are_categories_sorted_by_id_and_round_trip():
    gt = make_gt()
    label_to_cat = label_to_category_id(gt)
    assert label_to_cat == {1: 3, 2: 7, 3: 90}
    cat_to_label = category_id_to_label(gt)
    assert cat_to_label == LABEL_OF_CAT
    assert all(cat_to_label[label_to_cat[label]] == label for label in label_to_cat)


def test_to_coco_results_converts_xyxy_to_xywh():
    label_to_cat = label_to_category_id(make_gt())
    expected = [
        {"image_id": 11, "category_id": 7, "bbox": [10.0, 20.0, 30.0, 40.0], "score": 0.5},
        {"image_id": 11, "category_id": 90, "bbox": [0.5, 1.5, 2.0, 3.0], "score": 0.25},
    ]
    boxes = [[10.0, 20.0, 40.0, 60.0], [0.5, 1.5, 2.5, 4.5]]  # xyxy; 40 - 10 = 30 wide, 60 - 20 = 40 high
    scores, labels = [0.5, 0.25], [TRAIN, TOOTHBRUSH]
    from_torch = to_coco_results(
        11, torch.tensor(boxes), torch.tensor(scores), torch.tensor(labels), label_to_cat
    )
    from_numpy = to_coco_results(
        np.int64(11), np.array(boxes), np.array(scores), np.array(labels), label_to_cat
    )
    assert from_torch == expected
    assert from_numpy == expected
    json.dumps(from_torch)  # plain Python numbers, ready to ship between processes


def test_background_label_is_rejected():
    label_to_cat = label_to_category_id(make_gt())
    with pytest.raises(ValueError, match="background"):
        to_coco_results(11, torch.zeros(1, 4), torch.ones(1), torch.zeros(1, dtype=torch.int64), label_to_cat)


def test_perfect_detections_score_one_everywhere():
    _, metrics = evaluate_batches(perfect_rows(), [IMAGE_IDS])
    for name in STAT_NAMES:
        if name != "mar_1":
            assert metrics[name] == pytest.approx(1.0), name
    # COCO caps detections per image and class: with 1, image 22 recalls one of its two cars,
    # so car recall is 2/3 and the class mean is (2/3 + 1 + 1) / 3.
    assert metrics["mar_1"] == pytest.approx(8 / 9)
    assert metrics["per_class"] == pytest.approx({"car": 1.0, "train": 1.0, "toothbrush": 1.0})
    assert metrics["per_class50"] == pytest.approx({"car": 1.0, "train": 1.0, "toothbrush": 1.0})


@pytest.mark.parametrize("path", ["update", "add_results", "evaluate_detections"])
def test_imperfect_detections_match_pycocotools_called_directly(path):
    results = as_result_dicts(IMPERFECT_RESULTS)
    oracle = direct_cocoeval(make_gt(), results)
    if path == "update":
        _, metrics = evaluate_batches(IMPERFECT_RESULTS, [IMAGE_IDS])
    elif path == "add_results":
        evaluator = CocoEvaluator(make_gt())
        evaluator.add_results(results, image_ids=IMAGE_IDS)
        metrics = evaluator.summarize()
    else:
        metrics = evaluate_detections(make_gt(), results)

    assert [metrics[name] for name in STAT_NAMES] == oracle.stats.tolist()
    precision = oracle.eval["precision"][:, :, :, 0, 2]  # [T, R, K] at area "all", 100 dets
    names = [c["name"] for c in oracle.cocoGt.loadCats(oracle.params.catIds)]
    assert metrics["per_class"] == {n: float(precision[:, :, k].mean()) for k, n in enumerate(names)}
    assert metrics["per_class50"] == {n: float(precision[0, :, k].mean()) for k, n in enumerate(names)}
    # The case really is imperfect, and strictness of IoU shows.
    assert 0.0 < metrics["map75"] < metrics["map50"] < 1.0


def test_streaming_batches_equal_one_batch():
    whole, whole_metrics = evaluate_batches(IMPERFECT_RESULTS, [IMAGE_IDS])
    streamed, streamed_metrics = evaluate_batches(IMPERFECT_RESULTS, [[33], [44, 11], [22]])
    assert streamed_metrics == whole_metrics
    np.testing.assert_array_equal(streamed.last_eval.eval["precision"], whole.last_eval.eval["precision"])


def test_results_from_other_workers_merge_into_one_evaluation():
    worker_a, _ = evaluate_batches(IMPERFECT_RESULTS, [[11, 22]])
    worker_b, _ = evaluate_batches(IMPERFECT_RESULTS, [[33, 44]])
    merged = CocoEvaluator(make_gt())
    for worker in (worker_a, worker_b):
        merged.add_results(worker.results(), image_ids=worker.image_ids)
    _, whole_metrics = evaluate_batches(IMPERFECT_RESULTS, [IMAGE_IDS])
    assert merged.summarize() == whole_metrics


def test_only_updated_images_are_evaluated_and_empty_ones_count_as_misses():
    image_11_only = [r for r in perfect_rows() if r[0] == 11]
    _, metrics = evaluate_batches(image_11_only, [[11]])
    assert metrics["map"] == pytest.approx(1.0)
    # Image 33 passed with no detections: its train and toothbrush are missed, so each of
    # those classes reaches recall 1/2 with precision 1: 51 of COCO's 101 recall points.
    _, metrics = evaluate_batches(image_11_only, [[11, 33]])
    assert metrics["per_class50"] == pytest.approx({"car": 1.0, "train": 51 / 101, "toothbrush": 51 / 101})


def test_zero_detections_give_zero_not_a_crash():
    _, metrics = evaluate_batches([], [IMAGE_IDS[:2], IMAGE_IDS[2:]])
    assert {name: metrics[name] for name in STAT_NAMES} == dict.fromkeys(STAT_NAMES, 0.0)
    assert metrics["per_class"] == {"car": 0.0, "train": 0.0, "toothbrush": 0.0}
    assert evaluate_detections(make_gt(), [])["map"] == 0.0


def test_classes_without_ground_truth_are_omitted_and_empty_sizes_are_nan():
    _, metrics = evaluate_batches(perfect_rows(), [[22]])  # only cars (and a crowd train) there
    assert metrics["per_class"] == pytest.approx({"car": 1.0})
    assert np.isnan(metrics["map_medium"])  # no medium object on image 22
    assert metrics["map_small"] == pytest.approx(1.0)
    assert metrics["map_large"] == pytest.approx(1.0)


def test_precision_recall_curves_follow_coco_interpolation():
    evaluator, _ = evaluate_batches(IMPERFECT_RESULTS, [IMAGE_IDS])
    for iou in (0.5, 0.75):
        curves = evaluator.precision_recall(iou=iou)
        assert set(curves) == {"car", "train", "toothbrush"}
        for recall, precision in curves.values():
            assert recall.shape == precision.shape == (101,)
            np.testing.assert_allclose(recall, np.linspace(0.0, 1.0, 101))
            assert np.all((precision >= 0.0) & (precision <= 1.0))
            assert np.all(np.diff(precision) <= 0.0)  # non-increasing in recall
    # Car at IoU 0.5: hits of scores 0.8 and 0.7 follow a 0.95 false positive, and the
    # small car (mislabelled) is missed: precision 2/3 up to recall 2/3, then 0.
    recall, precision = evaluator.precision_recall(iou=0.5)["car"]
    np.testing.assert_allclose(precision, np.where(recall <= 2 / 3, 2 / 3, 0.0))
    with pytest.raises(ValueError, match="threshold"):
        evaluator.precision_recall(iou=0.52)


def test_precision_recall_before_summarize_is_an_error():
    with pytest.raises(RuntimeError, match="summarize"):
        CocoEvaluator(make_gt()).precision_recall()


def test_pycocotools_is_silent_but_summary_text_is_kept(capsys):
    _, metrics = evaluate_batches(IMPERFECT_RESULTS, [IMAGE_IDS])
    assert capsys.readouterr().out == ""
    lines = metrics["summary_text"].splitlines()
    assert len(lines) == 12
    assert lines[0].startswith(" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all")


def test_ground_truth_dict_is_not_modified():
    gt = make_gt()
    evaluator = CocoEvaluator(gt)
    evaluator.update([11], *per_image_detections(IMPERFECT_RESULTS, [11]))
    evaluator.summarize()
    assert gt == make_gt()


@pytest.mark.parametrize(
    ("image_ids", "message"),
    [([99], "not in the ground truth"), ([11, 11], "more than once")],
)
def test_bad_image_ids_are_rejected(image_ids, message):
    evaluator = CocoEvaluator(make_gt())
    empty = [torch.zeros(0, 4)] * len(image_ids)
    with pytest.raises(ValueError, match=message):
        evaluator.update(
            image_ids, empty, [torch.zeros(0)] * len(image_ids), [torch.zeros(0)] * len(image_ids)
        )


def test_an_image_gathered_twice_is_rejected():
    evaluator = CocoEvaluator(make_gt())
    evaluator.update([11], *per_image_detections(IMPERFECT_RESULTS, [11]))
    with pytest.raises(ValueError, match="already gathered"):
        evaluator.add_results(as_result_dicts(IMPERFECT_RESULTS[:1]))


def test_mismatched_batch_lengths_are_rejected():
    with pytest.raises(ValueError, match="one per image"):
        CocoEvaluator(make_gt()).update([11, 22], [torch.zeros(0, 4)], [torch.zeros(0)], [torch.zeros(0)])
