"""A briefly trained `tiny` model and the direct (no Ray) oracle, for tests of the jobs that
load a model: evaluation, labelling, serving."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ssd import checkpoint
from ssd import config as C
from ssd.anchors import default_boxes
from ssd.config import with_classes
from ssd.detector import Detector
from ssd.evaluate import CocoEvaluator
from ssd.matching import encode_targets_batch
from ssd.model import build_ssd
from ssd.optim import build_optimizer
from ssd.step import TrainStep
from ssd.transforms import eval_transform

TRAIN_STEPS = 30  # enough for mAP@0.5 clearly above 0 on the built-in scenes, ~5 s on 2 cores
BATCH = 8


def split(root: Path, split: str) -> tuple[dict, np.ndarray, list[tuple[int, int]]]:
    """The split's COCO dict, its images resized for the tiny preset (uint8 [N, 3, S, S]) and
    their original (height, width), in the JSON's image order."""
    coco = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
    size = C.preset("tiny").model.image_size
    images, sizes = [], []
    for im in coco["images"]:
        with Image.open(root / split / "images" / im["file_name"]) as f:
            pixels = np.array(f.convert("RGB"))
        resized, _ = eval_transform(pixels, np.zeros((0, 4), np.float32), size)
        images.append(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        sizes.append(pixels.shape[:2])
    return coco, np.stack(images), sizes


def targets(coco: dict, cfg: C.Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Matched targets of every image (crowd boxes left out, as `pipelines.data.samples` does)."""
    label_of = {c["id"]: k for k, c in enumerate(sorted(coco["categories"], key=lambda c: c["id"]), start=1)}
    boxes, labels = [], []
    for im in coco["images"]:
        anns = [a for a in coco["annotations"] if a["image_id"] == im["id"] and not a["iscrowd"]]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        boxes.append(xyxy / torch.tensor([im["width"], im["height"]] * 2, dtype=torch.float32))
        labels.append(torch.tensor([label_of[a["category_id"]] for a in anns], dtype=torch.int64))
    return encode_targets_batch(boxes, labels, default_boxes(cfg), cfg.train.iou_threshold)


def classes(coco: dict) -> dict:
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    return {"class_names": [c["name"] for c in categories], "category_ids": [c["id"] for c in categories]}


def save(model: torch.nn.Module, cfg: C.Config, dataset: dict, out: Path) -> str:
    ckpt = checkpoint.make_checkpoint(model, cfg, dataset, epoch=1, step=TRAIN_STEPS)
    return str(checkpoint.save(checkpoint.for_inference(ckpt), out))


def train_tiny(builtin_root: Path, out: Path) -> str:
    """A tiny model trained for TRAIN_STEPS on the built-in train split at `builtin_root`,
    saved under `out`; returns the checkpoint file."""
    coco, images, _ = split(builtin_root, "train")
    dataset = classes(coco)
    cfg = with_classes(C.preset("tiny"), tuple(dataset["class_names"]))
    cls_t, loc_t = targets(coco, cfg)
    torch.manual_seed(0)
    model = build_ssd(cfg)
    images_t = torch.from_numpy(images)
    step = TrainStep(
        model,
        build_optimizer(model, cfg.train),
        cfg.train,
        total_steps=TRAIN_STEPS,
        steps_per_epoch=len(images_t) // BATCH,
    )
    generator = torch.Generator().manual_seed(0)
    for _ in range(TRAIN_STEPS):
        idx = torch.randint(0, len(images_t), (BATCH,), generator=generator)
        step(images_t[idx], cls_t[idx], loc_t[idx])
    return save(model, cfg, dataset, out)


def direct_metrics(ckpt_path: str, root: Path) -> dict:
    """The oracle: the checkpoint's model called here through `Detector`, scored against the
    COCO file itself with `CocoEvaluator`; no Ray."""
    model, cfg = checkpoint.build_model(checkpoint.load(ckpt_path))
    coco, images, sizes = split(root, "val")
    ids = [im["id"] for im in coco["images"]]
    evaluator = CocoEvaluator(coco)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a one-CPU actor: same reduction order, same floats
    try:
        # and the same weight layout as the actor's (`ssd.layout`; the session's cache is shared)
        detector = Detector(model, cfg, channels_last=None, batch=32)
        for first in range(0, len(ids), BATCH):
            part = slice(first, first + BATCH)
            found = detector(torch.from_numpy(images[part]), sizes[part])
            evaluator.update(ids[part], *([d[k] for d in found] for k in ("boxes", "scores", "labels")))
    finally:
        torch.set_num_threads(threads)
    return evaluator.summarize()
