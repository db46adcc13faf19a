"""Pascal VOC AP@0.5 (`ssd.voc_eval`) on fixed cases worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ssd.evaluate import CocoEvaluator
from ssd.voc_eval import average_precision, voc_average_precision

DOG, CAT, BIRD = 1, 2, 3
NAMES = {DOG: "dog", CAT: "cat", BIRD: "bird"}


def ann(image_id, category_id, bbox, difficult=0):
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": difficult}


def det(image_id, category_id, bbox, score):
    return [image_id, *bbox, score, category_id]


# Dogs: two in image 1, found at scores 0.9 and 0.7 with a miss at 0.8 in between:
#   true positive, false positive, true positive -> recall .5 .5 1, precision 1 .5 2/3.
#   all-point: .5 x 1 + .5 x 2/3 = 5/6; 11-point: 6 thresholds (0-.5) at 1, 5 (.6-1) at 2/3 -> 28/33.
# Cats: one in image 2 and a difficult one in image 1: a detection of the difficult cat counts
#   as nothing (score .95), the real cat is found (.6), a duplicate of it (.5) is a false
#   positive -> recall 1 at precision 1 first: AP 1 both ways.
# Birds: one in image 2, never detected -> AP 0. Image 3 holds nothing; its dog detection (.3)
#   is a false positive at the end of the dogs' list, after recall 1: the APs stay as they are.
TRUTH = [
    ann(1, DOG, [0, 0, 10, 10]),
    ann(1, DOG, [50, 50, 20, 20]),
    ann(2, CAT, [10, 10, 30, 30]),
    ann(1, CAT, [100, 100, 20, 20], difficult=1),
    ann(2, BIRD, [60, 60, 10, 10]),
]
DETECTIONS = [
    det(1, DOG, [0, 0, 10, 10], 0.9),
    det(1, DOG, [200, 200, 10, 10], 0.8),
    det(1, DOG, [51, 51, 20, 20], 0.7),  # IoU 361/439 = 0.82
    det(1, CAT, [100, 100, 20, 20], 0.95),
    det(2, CAT, [10, 10, 30, 30], 0.6),
    det(2, CAT, [12, 12, 30, 30], 0.5),
    det(3, DOG, [0, 0, 5, 5], 0.3),
]


def test_fixed_cases_give_the_hand_computed_aps():
    out = voc_average_precision(TRUTH, np.array(DETECTIONS), [1, 2, 3], NAMES)
    assert out["per_class_voc"] == pytest.approx({"dog": 5 / 6, "cat": 1.0, "bird": 0.0})
    assert out["per_class_voc07"] == pytest.approx({"dog": 28 / 33, "cat": 1.0, "bird": 0.0})
    assert out["voc_map50"] == pytest.approx((5 / 6 + 1) / 3)
    assert out["voc07_map50"] == pytest.approx((28 / 33 + 1) / 3)


def test_an_overlap_of_exactly_one_half_is_a_miss_as_in_the_python_devkit():
    truth = [ann(1, DOG, [0, 0, 10, 10])]
    half = [det(1, DOG, [0, 0, 10, 5], 0.9)]  # IoU 50 / 100
    above = [det(1, DOG, [0, 0, 10, 5.01], 0.9)]
    assert voc_average_precision(truth, np.array(half), [1], {DOG: "dog"})["voc_map50"] == 0
    assert voc_average_precision(truth, np.array(above), [1], {DOG: "dog"})["voc_map50"] == 1


def test_only_the_evaluated_images_count_and_classes_without_truth_are_left_out():
    out = voc_average_precision(TRUTH, np.array(DETECTIONS), [2], NAMES)  # image 2 alone
    assert out["per_class_voc"] == pytest.approx({"cat": 1.0, "bird": 0.0})  # no dog in image 2
    nothing = voc_average_precision(TRUTH, np.zeros((0, 7)), [3], NAMES)
    assert nothing["per_class_voc"] == {} and math.isnan(nothing["voc_map50"])


def test_average_precision_of_plain_curves():
    recall, precision = np.array([0.25, 0.5, 0.5, 1.0]), np.array([1.0, 1.0, 2 / 3, 0.5])
    assert average_precision(recall, precision, "voc") == pytest.approx(0.5 * 1 + 0.5 * 0.5)
    # 11-point: t = 0 .. 0.5 -> 1 (six), t = 0.6 .. 1 -> 0.5 (five)
    assert average_precision(recall, precision, "voc07") == pytest.approx((6 + 2.5) / 11)
    with pytest.raises(ValueError, match="voc07"):
        average_precision(recall, precision, "coco")


def test_the_coco_evaluator_reports_voc_ap_beside_cocos():
    gt = {
        "images": [{"id": i, "width": 300, "height": 300, "file_name": f"{i}.jpg"} for i in (1, 2, 3)],
        "annotations": [{**a, "id": n, "area": a["bbox"][2] * a["bbox"][3]} for n, a in enumerate(TRUTH, 1)],
        "categories": [{"id": i, "name": name} for i, name in NAMES.items()],
    }
    evaluator = CocoEvaluator(gt)
    evaluator.add_results(
        [{"image_id": d[0], "bbox": d[1:5], "score": d[5], "category_id": d[6]} for d in DETECTIONS],
        image_ids=[1, 2, 3],
    )
    metrics = evaluator.summarize()
    assert metrics["voc_map50"] == pytest.approx((5 / 6 + 1) / 3)
    assert metrics["per_class_voc07"] == pytest.approx({"dog": 28 / 33, "cat": 1.0, "bird": 0.0})
    assert 0 < metrics["map50"] <= 1  # COCO's own, from pycocotools, still there


def _devkit_loop(detections, truth, threshold=0.5):
    """The VOC devkit's voc_eval loop, one detection at a time, as the reference."""
    positives = sum(int((~d).sum()) for _, d in truth.values())
    found = {i: np.zeros(len(b), bool) for i, (b, _) in truth.items()}
    tp, fp = [], []
    for image_id, x1, y1, x2, y2, _ in detections[np.argsort(-detections[:, 5], kind="stable")]:
        boxes, difficult = truth.get(int(image_id), (np.zeros((0, 4)), np.zeros(0, bool)))
        best, overlap = -1, -np.inf
        for j, (a, b, c, d) in enumerate(boxes):
            inter = max(0.0, min(x2, c) - max(x1, a)) * max(0.0, min(y2, d) - max(y1, b))
            iou = inter / ((x2 - x1) * (y2 - y1) + (c - a) * (d - b) - inter)
            if iou > overlap:
                best, overlap = j, iou
        if overlap > threshold:
            if difficult[best]:
                tp.append(0), fp.append(0)
            elif not found[int(image_id)][best]:
                found[int(image_id)][best] = True
                tp.append(1), fp.append(0)
            else:
                tp.append(0), fp.append(1)
        else:
            tp.append(0), fp.append(1)
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    return tp / positives, tp / np.maximum(tp + fp, np.finfo(np.float64).eps)


def test_the_vectorised_matching_equals_the_devkit_loop_on_random_scenes():
    from ssd.voc_eval import class_recall_precision

    rng = np.random.default_rng(0)
    truth = {}
    for image_id in range(30):
        n = int(rng.integers(0, 6))
        xy = rng.uniform(0, 80, (n, 2))
        truth[image_id] = (np.hstack([xy, xy + rng.uniform(5, 40, (n, 2))]), rng.random(n) < 0.2)
    detections = []
    for image_id in range(35):  # images 30-34 hold no ground truth
        boxes = truth.get(image_id, (np.zeros((0, 4)), None))[0]
        for _ in range(int(rng.integers(0, 10))):
            base = (
                boxes[rng.integers(len(boxes))]
                if len(boxes) and rng.random() < 0.7
                else rng.uniform(0, 80, 4)
            )
            x1, y1, x2, y2 = np.sort(base.reshape(2, 2) + rng.normal(0, 2, (2, 2)), axis=0).ravel()
            detections.append([image_id, x1, y1, x2 + 0.5, y2 + 0.5, round(rng.random(), 1)])
    detections = np.array(detections)  # scores rounded: ties keep the list order (stable sorts both)
    got, expected = class_recall_precision(detections, truth), _devkit_loop(detections, truth)
    np.testing.assert_allclose(got[0], expected[0])
    np.testing.assert_allclose(got[1], expected[1])
    assert 0.2 < got[0][-1] < 1  # the scenes hold hits, misses and duplicates
