"""Evaluation inside training: every rank detects on its part of the val split, rank 0 scores.

Streams like `ssd.evaluate.CocoEvaluator` wants: each rank runs `ssd.detector.Detector` over
its own val shard (``val_<rank>``), the detections are gathered on rank 0, and rank 0 alone
runs pycocotools and keeps a few images with detections and ground truth for pictures.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ssd import config as C
from ssd.detector import Detector
from ssd.evaluate import CocoEvaluator, to_coco_results

PICTURE_IMAGES = 8
PICTURE_SCORE_THRESHOLD = 0.3  # a drawing choice: enough boxes to see, not every candidate


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def sync_buffers(model: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank. DDP broadcasts
    them before each forward, so after the last forward of an epoch each rank holds the
    statistics of its own last batch; evaluation on every rank must use the same model."""
    if distributed():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def evaluate(
    model: torch.nn.Module,
    cfg: C.Config,
    shard: Any,
    device: torch.device,
    ground_truth: Any,
    label_to_cat: dict[int, int],
    rank: int,
    world: int,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """This rank's detections on its val part, gathered to rank 0, which returns the COCO
    summary (other ranks: {}), plus a few images with predictions and targets for pictures.

    `shard` yields rows of network inputs (``image_id``, ``width``, ``height``, ``image``
    uint8 [3, S, S]); `ground_truth` is the val split's COCO dict or an ObjectRef to it.
    """
    import ray

    detector = Detector(model, cfg)
    results: list[dict] = []
    image_ids: list[int] = []
    pictures = None
    for batch in shard.iter_torch_batches(batch_size=cfg.train.batch_size, device=device):
        sizes = torch.stack([batch["height"], batch["width"]], dim=1).cpu()
        detections = detector(batch["image"], sizes)
        ids = batch["image_id"].cpu().tolist()
        for image_id, det in zip(ids, detections):
            results.extend(
                to_coco_results(image_id, det["boxes"], det["scores"], det["labels"], label_to_cat)
            )
        image_ids.extend(ids)
        if pictures is None and rank == 0:
            pictures = _picture_batch(batch, detector)
    gathered: list[Any] = [(results, image_ids)]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, (results, image_ids))
    if rank != 0:
        return {}, None
    gt = ray.get(ground_truth) if isinstance(ground_truth, ray.ObjectRef) else ground_truth
    evaluator = CocoEvaluator(gt, label_to_cat)
    for part_results, part_ids in gathered:
        evaluator.add_results(part_results, image_ids=part_ids)
    summary = evaluator.summarize()
    summary["pr_curves"] = evaluator.precision_recall(0.5)
    summary["images"] = len(evaluator.image_ids)
    if pictures is not None:
        pictures["truth"] = _picture_truth(gt, pictures, {c: label for label, c in label_to_cat.items()})
        pictures["pr_curves"] = summary["pr_curves"]
    return summary, pictures


def _picture_batch(batch: dict[str, torch.Tensor], detector: Detector) -> dict[str, Any]:
    """The first few network-input images with their detections, in network-input pixels."""
    k = min(PICTURE_IMAGES, batch["image"].shape[0])
    images = batch["image"][:k].cpu()
    s = images.shape[-1]
    return {
        "images": images.numpy(),
        "detections": detector(
            images, [(s, s)] * k, score_threshold=PICTURE_SCORE_THRESHOLD, max_detections=50
        ),
        "image_ids": batch["image_id"][:k].cpu().tolist(),
        "sizes": torch.stack([batch["height"][:k], batch["width"][:k]], dim=1).cpu().tolist(),
    }


def _picture_truth(gt: dict, pictures: dict[str, Any], label_of: dict[int, int]) -> list[dict[str, Any]]:
    """Ground-truth boxes of the picture images, scaled to the network input like the images."""
    s = pictures["images"].shape[-1]
    truth = []
    for image_id, (height, width) in zip(pictures["image_ids"], pictures["sizes"]):
        anns = [a for a in gt["annotations"] if a["image_id"] == image_id and not a.get("iscrowd")]
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1) * (
            [s / width, s / height] * 2
        )
        labels = np.array([label_of[a["category_id"]] for a in anns], dtype=np.int64)
        truth.append({"boxes": boxes, "labels": labels})
    return truth
