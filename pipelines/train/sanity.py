"""Does the model fit the data it trains on? `rayssd train --sanity` and the fit line every run prints.

A detector that cannot reach a high mAP on a few dozen of its own training images, seen
without augmentation, will not learn them from thousands: the labels, the default boxes
against the objects' sizes, the input normalisation or the learning rate is wrong, and more
epochs will not say which. `rayssd train --sanity [N]` trains the preset on the first N
training images (unaugmented, each epoch repeating them so the run takes `SANITY_STEPS`
optimiser steps), scores it on the same images, and passes at mAP@0.5 >= `FIT_GOAL`; when it
fails it says what it found. Every ordinary run also scores its final model on its first
`pipelines.train.datasets.FIT_IMAGES` training images and says whether it fits them.
"""

from __future__ import annotations

import math
from typing import Any

from ssd import config as C

SANITY_IMAGES = 64  # default N of --sanity
SANITY_STEPS = 150  # optimiser steps of a sanity run, whatever N and the batch size
SANITY_EPOCHS = 5  # evaluations of a sanity run (each epoch repeats the N images)
FIT_GOAL = 0.9  # mAP@0.5 on its own (unaugmented) training images a model must reach
COVERED_IOU = 0.5  # a box no default box overlaps this much is matched by the best-box rule alone
COVERAGE_WARNING = 0.2  # warn when more than this share of the boxes is covered that poorly
GENERALISE_GAP = 0.3  # fit mAP@0.5 this far above val mAP@0.5: it memorises more than it generalises


def sanity_config(cfg: C.Config) -> C.Config:
    """`cfg` for a sanity run: no augmentation, no sample cache, `SANITY_EPOCHS` epochs, each
    evaluated."""
    return C.override(
        cfg, ["data.augment=false", "data.cache=false", f"train.epochs={SANITY_EPOCHS}", "train.eval_every=1"]
    )


def repeats(images: int, workers: int, batch_size: int) -> int:
    """How often an epoch of a sanity run repeats its `images` so the run takes at least
    `SANITY_STEPS` steps of `workers` x `batch_size` images."""
    per_epoch = SANITY_STEPS * workers * batch_size / SANITY_EPOCHS
    return max(1, math.ceil(per_epoch / max(1, images)))


def anchor_coverage(ground_truth: dict, cfg: C.Config) -> dict[str, float]:
    """How well the default boxes of `cfg` cover the boxes of a COCO ground truth.

    Returns ``poor`` (the share of boxes whose best IoU with any default box is below
    `COVERED_IOU`: only the best-box rule of matching gives them a positive, and a poor one),
    ``median_iou`` of the best IoUs, ``median_scale`` of the boxes (square root of their area
    as a fraction of the image's) and ``smallest_default`` (the first default-box scale).
    """
    import torch
    from torchvision.ops import box_iou

    from ssd.anchors import default_boxes
    from ssd.boxes import cxcywh_to_xyxy

    sizes = {image["id"]: (image["width"], image["height"]) for image in ground_truth["images"]}
    rows = []
    for ann in ground_truth["annotations"]:
        if ann.get("iscrowd"):
            continue
        width, height = sizes[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        rows.append([x / width, y / height, (x + w) / width, (y + h) / height])
    smallest = cfg.anchors.resolved_scales()[0]
    if not rows:
        nan = float("nan")
        return {"poor": 0.0, "median_iou": nan, "median_scale": nan, "smallest_default": smallest}
    boxes = torch.tensor(rows, dtype=torch.float32)
    d = default_boxes(cfg)
    corners = cxcywh_to_xyxy(d)
    best = torch.cat([box_iou(chunk, corners).max(dim=1).values for chunk in boxes.split(1024)])
    scale = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0).sqrt()
    return {
        "poor": float((best < COVERED_IOU).float().mean()),
        "median_iou": float(best.median()),
        "median_scale": float(scale.median()),
        "smallest_default": smallest,
    }


def coverage_hint(coverage: dict[str, float]) -> str | None:
    """A line saying what to change when the default boxes cover the boxes poorly, else None."""
    if coverage["poor"] <= COVERAGE_WARNING:
        return None
    median, smallest = coverage["median_scale"], coverage["smallest_default"]
    line = (
        f"{coverage['poor']:.0%} of the boxes overlap no default box by IoU {COVERED_IOU} (median box "
        f"{median:.2f} of the image, smallest default box {smallest:.2f})"
    )
    if median < smallest * 1.5:
        suggested = max(0.02, round(median * 0.8, 2))
        line += (
            f": the objects are small for these default boxes; lower anchors.min_scale (e.g. "
            f"anchors.min_scale={suggested}, and anchors.scales=null where the preset lists them) "
            "or raise model.image_size"
        )
    else:
        line += (
            ": the default boxes' scales and shapes do not follow the objects' (anchors.min_scale, "
            "anchors.max_scale, anchors.aspect_ratios)"
        )
    return line


def fit_lines(metrics: dict[str, Any], num_fit: int, coverage: dict[str, float] | None) -> list[str]:
    """What a finished run says about fitting its training data (empty when it was not scored)."""
    if "fit_map50" not in metrics:
        return []
    fit, val = metrics["fit_map50"], metrics.get("map50")
    if math.isnan(fit):
        return [f"its first {num_fit} training images hold no boxes to score it on"]
    lines = []
    if fit >= FIT_GOAL:
        lines.append(f"fits its training data: mAP@0.5 {fit:.3f} on {num_fit} training images (unaugmented)")
        if val is not None and fit - val > GENERALISE_GAP:
            lines.append(
                f"  but val mAP@0.5 is {val:.3f}: it memorises more than it generalises; more images, "
                "augmentation (data.augment=true) or a pretrained backbone (model.backbone_weights) help"
            )
    else:
        lines.append(
            f"does not fit its training data yet: mAP@0.5 {fit:.3f} on {num_fit} training images "
            f"(unaugmented; goal {FIT_GOAL}). Train longer (train.epochs), or check that "
            "`rayssd train --sanity` passes on this data"
        )
    hint = coverage_hint(coverage) if coverage is not None else None
    if hint and fit < FIT_GOAL:
        lines.append("  " + hint)
    return lines


def sanity_lines(metrics: dict[str, Any], num_fit: int, coverage: dict[str, float]) -> tuple[bool, list[str]]:
    """(passed, what to print) for a finished sanity run."""
    fit = metrics.get("fit_map50", metrics.get("map50", 0.0))
    if math.isnan(fit):
        return False, [f"sanity check FAILED: the {num_fit} images it trained on hold no boxes"]
    passed = fit >= FIT_GOAL
    if passed:
        return True, [
            f"sanity check passed: mAP@0.5 {fit:.3f} >= {FIT_GOAL} on the {num_fit} images it trained on; "
            "this preset can learn this data"
        ]
    lines = [
        f"sanity check FAILED: mAP@0.5 {fit:.3f} < {FIT_GOAL} on the {num_fit} images it trained on "
        "(unaugmented). Before training longer, look at:"
    ]
    hint = coverage_hint(coverage)
    if hint:
        lines.append("  - " + hint)
    loss = metrics.get("loss")
    lines.append(
        f"  - the loss{f' ({loss:.3f})' if loss is not None else ''}: still falling means it needs more "
        "steps (train.lr, train.batch_size); flat and high means the labels or the learning rate"
    )
    lines.append("  - the pictures logged to MLflow: do the ground-truth boxes sit on the objects?")
    return False, lines
