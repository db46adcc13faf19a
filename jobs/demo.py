"""The core demo: rayssd's numerics end to end in one process, no Ray, no MLflow.

Draws a small synthetic detection set, matches it to the default boxes, trains a preset
from scratch for a few hundred steps, detects on held-out scenes and scores them with
COCO mAP. It shows the `ssd` package working on its own; `rayssd quickstart` is the
distributed version.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from jobs.options import add_config_arguments, config_from_args
from ssd import config as C
from ssd.anchors import default_boxes
from ssd.evaluate import CocoEvaluator
from ssd.grid_matching import GridMatcher
from ssd.matching import encode_targets_batch
from ssd.model import build_ssd
from ssd.optim import build_optimizer
from ssd.postprocess import postprocess
from ssd.step import TrainStep
from ssd.synthetic import CLASS_NAMES, make_scene
from ssd.transforms import eval_transform

SCENE_SIZE = 160  # pixels of the drawn scenes; the model sees them resized


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--steps", type=int, default=400, help="training steps (default: 400)")
    parser.add_argument(
        "--train-images", type=int, default=1024, help="synthetic training scenes (default: 1024)"
    )
    parser.add_argument("--val-images", type=int, default=64, help="held-out scenes for mAP (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed for scenes and weights (default: 0)")


def _scenes(count: int, seed: int, size: int) -> tuple[torch.Tensor, list, list, list]:
    rng = np.random.default_rng(seed)
    images, boxes, labels, raw_boxes = [], [], [], []
    for _ in range(count):
        image, b, lab = make_scene(rng, SCENE_SIZE, SCENE_SIZE)
        resized, unit_boxes = eval_transform(image, b, size)
        images.append(torch.from_numpy(np.array(resized)).permute(2, 0, 1))  # PIL arrays are read-only
        boxes.append(torch.from_numpy(unit_boxes))
        labels.append(torch.from_numpy(lab))
        raw_boxes.append(b)
    return torch.stack(images), boxes, labels, raw_boxes


def _coco_ground_truth(raw_boxes: list, labels: list) -> dict:
    annotations = []
    for image_id, (b, lab) in enumerate(zip(raw_boxes, labels)):
        for box, label in zip(b.tolist(), lab.tolist()):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": [box[0], box[1], w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    return {
        "images": [{"id": i, "width": SCENE_SIZE, "height": SCENE_SIZE} for i in range(len(raw_boxes))],
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASS_NAMES)],
    }


def _train(model, cfg: C.Config, images, cls_t, loc_t, steps: int, seed: int) -> float:
    """`steps` SGD/AdamW steps on random batches of the fixed scenes; returns images/s."""
    batch, count = cfg.train.batch_size, images.shape[0]
    step = TrainStep(
        model,
        build_optimizer(model, cfg.train),
        cfg.train,
        total_steps=steps,
        steps_per_epoch=max(1, count // batch),
    )
    generator = torch.Generator().manual_seed(seed)
    seen, clock = 0, time.perf_counter()
    for i in range(steps):
        idx = torch.randint(0, count, (batch,), generator=generator)
        losses = step(images[idx], cls_t[idx], loc_t[idx])
        seen += batch
        if i % 25 == 0 or i == steps - 1:
            rate = seen / (time.perf_counter() - clock)
            print(
                f"step {i + 1:4d}/{steps}  loss {losses['loss'].item():6.3f}  "
                f"(cls {losses['cls'].item():.3f}, loc {losses['loc'].item():.3f})  {rate:5.1f} img/s",
                flush=True,
            )
    return seen / (time.perf_counter() - clock)


def _evaluate(model, cfg: C.Config, images, ground_truth: dict, dboxes) -> dict:
    """COCO mAP of the model's detections on `images` (drawn at SCENE_SIZE px)."""
    model.eval()
    evaluator = CocoEvaluator(ground_truth)
    inf, batch = cfg.inference, cfg.train.batch_size
    with torch.inference_mode():
        for first in range(0, images.shape[0], batch):
            chunk = images[first : first + batch]
            cls_logits, loc_preds = model(chunk)
            sizes = [(SCENE_SIZE, SCENE_SIZE)] * len(chunk)
            detections = postprocess(
                cls_logits,
                loc_preds,
                dboxes,
                sizes,
                inf.score_threshold,
                inf.nms_threshold,
                inf.topk_candidates,
                inf.max_detections,
            )
            evaluator.update(
                list(range(first, first + len(chunk))),
                [d["boxes"] for d in detections],
                [d["scores"] for d in detections],
                [d["labels"] for d in detections],
            )
    return evaluator.summarize()


def run(args: argparse.Namespace) -> dict:
    cfg = C.override(config_from_args(args), [f"model.num_classes={len(CLASS_NAMES) + 1}"])
    if args.steps < 1 or args.train_images < 1 or args.val_images < 1:
        raise C.ConfigError("--steps, --train-images and --val-images must be >= 1")
    torch.manual_seed(args.seed)
    size = cfg.model.image_size
    print(
        f"preset {cfg.name}: {size}px input, {cfg.anchors.num_default_boxes()} default boxes, "
        f"{len(CLASS_NAMES)} classes {CLASS_NAMES}"
    )
    start = time.perf_counter()
    train_images, train_boxes, train_labels, _ = _scenes(args.train_images, args.seed, size)
    val_images, _, val_labels, val_raw = _scenes(args.val_images, args.seed + 1, size)
    dboxes = default_boxes(cfg)
    matcher = GridMatcher.from_config(cfg, dboxes)
    cls_t, loc_t = encode_targets_batch(train_boxes, train_labels, dboxes, cfg.train.iou_threshold, matcher)
    print(
        f"drew {args.train_images} + {args.val_images} scenes and matched them in "
        f"{time.perf_counter() - start:.1f}s ({float((cls_t > 0).sum(1).float().mean()):.1f} positives/image)"
    )
    if cfg.data.augment:
        print("note: the demo trains on fixed scenes; augmentation (data.augment) runs in the data pipeline")
    model = build_ssd(cfg).train()
    train_rate = _train(model, cfg, train_images, cls_t, loc_t, args.steps, args.seed)
    metrics = _evaluate(model, cfg, val_images, _coco_ground_truth(val_raw, val_labels), dboxes)
    print(
        f"held-out mAP@[.5:.95] {metrics['map']:.3f}  mAP@0.5 {metrics['map50']:.3f}  "
        f"(training {train_rate:.1f} img/s, {time.perf_counter() - start:.0f}s in all)"
    )
    return {"map": metrics["map"], "map50": metrics["map50"], "train_images_per_s": train_rate}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__)
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
