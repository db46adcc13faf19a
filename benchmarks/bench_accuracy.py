"""Accuracy on real objects: val mAP@0.5 of each model trained for the same CPU time on small
real-object sets, beside torchvision's SSDLite trained the same way, in one run.

    python -m benchmarks.bench_accuracy [--budget-s 900] [--sets objects,coins] [--train 600]
                                        [--val 200] [--quick] [--markdown FILE]

The sets are `benchmarks.realobjects`' (real objects cut out of the photographs scikit-image
ships, pasted onto real photographs; nothing downloaded): ``objects`` (10 classes, 10-70 px)
and ``coins`` (one class, 12-40 px, up to 8 per image among look-alike distractors). Each model
trains in this process on the same augmented samples (`ssd.transforms.train_transform` with the
zoom-out floor, at the model's input size), batch 16, for `--budget-s` seconds of wall time:
the first steps measure its speed, and the learning-rate schedule (linear warm-up over 30
steps, then cosine to zero) is sized to the steps that fit the budget. Then its val
split is scored with pycocotools (mAP@0.5, mAP).

Models: ``tiny`` from scratch (its own preset); ``ssdlite320`` from scratch and from ImageNet
(`model.backbone_weights=imagenet`: torchvision's MobileNetV2 file, from the torch cache or the
offline package); torchvision's ``ssdlite320_mobilenet_v3_large`` from scratch (no ImageNet
MobileNetV3 file ships offline), with its own loss and box coder, on the same samples, the
same optimiser (SGD, lr 0.015, momentum 0.9, weight decay 4e-5: the ssdlite320 preset's) and
schedule. Goal (issue 16): pretrained ssdlite320 >= 0.5 mAP@0.5 on each set within 15 minutes
of a 2-core CPU, and >= torchvision's.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.realobjects import SETS, compose
from benchmarks.report import machine, publish
from ssd import config as C
from ssd.anchors import default_boxes
from ssd.detector import Detector
from ssd.evaluate import CocoEvaluator
from ssd.grid_matching import GridMatcher
from ssd.matching import encode_targets_batch
from ssd.model import build_ssd
from ssd.optim import build_optimizer, learning_rate, set_learning_rate
from ssd.step import TrainStep
from ssd.transforms import eval_transform, rng_for, smallest_object, train_transform

BATCH = 16
WARMUP_STEPS = 30  # linear warm-up, then cosine to zero at the last step the budget holds
PROBE_STEPS = 5  # steps timed before the schedule is sized
GOAL_MAP50 = 0.5
MODELS = ("tiny", "ssdlite320", "ssdlite320+imagenet", "torchvision ssdlite320_mobilenet_v3_large")


def _read(annotations: Path) -> tuple[list[tuple[np.ndarray, np.ndarray, np.ndarray]], dict, dict]:
    """Images (uint8 HxWx3), boxes (xyxy px), labels (1..K) of a COCO set, its document and
    the category id of each label."""
    doc = json.loads(annotations.read_text())
    cats = sorted(c["id"] for c in doc["categories"])
    label_of = {c: i + 1 for i, c in enumerate(cats)}
    by_image: dict[int, list] = {}
    for ann in doc["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    samples = []
    for image in doc["images"]:
        anns = by_image.get(image["id"], [])
        pixels = np.asarray(Image.open(annotations.parent / "images" / image["file_name"]).convert("RGB"))
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], np.float32)
        labels = np.array([label_of[a["category_id"]] for a in anns], np.int64)
        samples.append((pixels, boxes.reshape(-1, 4), labels))
    return samples, doc, {i + 1: c for i, c in enumerate(cats)}


def _batches(samples, size: int, min_object: float, seed: int):
    """Endless batches of augmented samples: (uint8 images [B, 3, S, S], unit boxes, labels)."""
    rng = np.random.default_rng(seed)
    epoch = 0
    while True:
        order = rng.permutation(len(samples))
        for first in range(0, len(order) - BATCH + 1, BATCH):
            images, boxes, labels = [], [], []
            for index in order[first : first + BATCH]:
                pixels, b, lab = samples[index]
                out, ob, ol = train_transform(
                    pixels, b, lab, size, rng_for(seed, epoch, int(index)), min_object=min_object
                )
                images.append(torch.from_numpy(np.array(out)).permute(2, 0, 1))
                boxes.append(torch.from_numpy(ob))
                labels.append(torch.from_numpy(ol))
            yield torch.stack(images), boxes, labels
        epoch += 1


def _train(name: str, samples, num_classes: int, budget_s: float, seed: int) -> tuple[Any, dict, Any]:
    """Train model `name` for `budget_s` seconds; returns (model, facts, detect function)."""
    torch.manual_seed(seed)
    torchvision_model = name.startswith("torchvision")
    preset, _, weights = ("ssdlite320", "", "") if torchvision_model else name.partition("+")
    settings = [f"model.num_classes={num_classes}"] + (
        [f"model.backbone_weights={weights}"] if weights else []
    )
    cfg = C.override(C.preset(preset), settings)
    size = cfg.model.image_size
    # the preset's optimiser and rate, on a schedule counted in steps (one step an "epoch")
    schedule = dataclasses.replace(cfg.train, lr_schedule="cosine", warmup_epochs=float(WARMUP_STEPS))
    if torchvision_model:
        from torchvision.models.detection import ssdlite320_mobilenet_v3_large

        model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes)
    else:
        model = build_ssd(cfg)
        dboxes = default_boxes(cfg)
        matcher = GridMatcher.from_config(cfg, dboxes)
    optimizer = build_optimizer(model, cfg.train)
    step = TrainStep(model, optimizer, schedule, total_steps=10**9, steps_per_epoch=1)
    model.train()
    batches = _batches(samples, size, smallest_object(cfg), seed)
    start = time.perf_counter()
    steps, losses = 0, []
    while time.perf_counter() - start < budget_s:
        images, boxes, labels = next(batches)
        if torchvision_model:  # its own loss and box coder, the same rate
            set_learning_rate(optimizer, learning_rate(schedule, steps, step.total_steps, 1))
            targets = [{"boxes": b * size, "labels": lab} for b, lab in zip(boxes, labels)]
            parts = model([im.float() / 255 for im in images], targets)
            loss = parts["bbox_regression"] + parts["classification"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        else:
            cls_t, loc_t = encode_targets_batch(boxes, labels, dboxes, cfg.train.iou_threshold, matcher)
            loss = step(images, cls_t, loc_t)["loss"]
        losses.append(float(loss.detach()))
        steps += 1
        if steps == PROBE_STEPS:  # size the schedule to the steps the budget holds
            step.total_steps = max(WARMUP_STEPS + 1, int(budget_s / ((time.perf_counter() - start) / steps)))
    seconds = time.perf_counter() - start
    facts = {
        "steps": steps,
        "images_per_s": steps * BATCH / seconds,
        "seconds": seconds,
        "final_loss": float(np.mean(losses[-20:])) if losses else float("nan"),
    }
    model.eval()
    if torchvision_model:

        def detect(images: torch.Tensor, sizes: list[tuple[int, int]]) -> list[dict]:
            out = model([im.float() / 255 for im in images])
            scaled = []
            for det, (height, width) in zip(out, sizes):
                factor = torch.tensor([width / size, height / size] * 2)
                scaled.append(
                    {"boxes": det["boxes"] * factor, "scores": det["scores"], "labels": det["labels"]}
                )
            return scaled

    else:
        detect = Detector(model, cfg)  # decoding and per-class NMS as every rayssd path does

    return size, facts, detect


def _evaluate(detect, size: int, samples, doc: dict, cat_of: dict) -> dict:
    evaluator = CocoEvaluator(doc, cat_of)
    ids = [image["id"] for image in doc["images"]]
    with torch.inference_mode():
        for first in range(0, len(samples), 32):
            chunk = range(first, min(first + 32, len(samples)))
            inputs = [eval_transform(samples[i][0], samples[i][1], size)[0] for i in chunk]
            images = torch.stack([torch.from_numpy(np.array(x)).permute(2, 0, 1) for x in inputs])
            sizes = [samples[i][0].shape[:2] for i in chunk]
            dets = detect(images, sizes)
            evaluator.update(
                [ids[i] for i in chunk],
                [d["boxes"] for d in dets],
                [d["scores"] for d in dets],
                [d["labels"] for d in dets],
            )
    with contextlib.redirect_stdout(io.StringIO()):
        return evaluator.summarize()


def run(sets: list[str], models: list[str], budget_s: float, train: int, val: int, work: Path) -> list[dict]:
    rows = []
    for kind in sets:
        train_file = compose(work / f"{kind}-train", kind, count=train, seed=0, split="train")
        val_file = compose(work / f"{kind}-val", kind, count=val, seed=1, split="val")
        train_samples, _, _ = _read(train_file)
        val_samples, val_doc, cat_of = _read(val_file)
        num_classes = len(cat_of) + 1
        boxes = sum(len(s[1]) for s in train_samples)
        print(
            f"{kind}: {len(train_samples)} train images ({boxes} boxes), {len(val_samples)} val", flush=True
        )
        for name in models:
            size, facts, detect = _train(name, train_samples, num_classes, budget_s, seed=0)
            metrics = _evaluate(detect, size, val_samples, val_doc, cat_of)
            row = {"set": kind, "model": name, **facts, "map50": metrics["map50"], "map": metrics["map"]}
            print(
                f"  {name}: val mAP@0.5 {row['map50']:.3f} (mAP {row['map']:.3f}) after "
                f"{row['steps']} steps, {row['images_per_s']:.1f} img/s, loss {row['final_loss']:.3f}",
                flush=True,
            )
            rows.append(row)
    return rows


def format_table(rows: list[dict], budget_s: float) -> str:
    lines = [
        "| set | model | val mAP@0.5 | val mAP | steps | train img/s | final loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['set']} | {r['model']} | {r['map50']:.3f} | {r['map']:.3f} | {r['steps']} | "
            f"{r['images_per_s']:.1f} | {r['final_loss']:.3f} |"
        )
    for kind in dict.fromkeys(r["set"] for r in rows):
        by = {r["model"]: r for r in rows if r["set"] == kind}
        ours, theirs = by.get("ssdlite320+imagenet"), by.get(MODELS[-1])
        if ours is not None:
            met = "met" if ours["map50"] >= GOAL_MAP50 else "NOT met"
            lines.append(
                f"\n{kind}: pretrained ssdlite320 val mAP@0.5 in {budget_s:.0f} s: {ours['map50']:.3f} "
                f"(goal >= {GOAL_MAP50}: {met})"
            )
        if ours is not None and theirs is not None:
            ratio = ours["map50"] / max(theirs["map50"], 1e-9)
            met = "met" if ours["map50"] >= theirs["map50"] else "NOT met"
            lines.append(
                f"{kind}: pretrained ssdlite320 / torchvision ssdlite320 mAP@0.5: {ratio:.2f} "
                f"(goal >= 1.0: {met})"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_accuracy", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--budget-s", type=float, default=900.0, help="training seconds per model and set (900)"
    )
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, of {', '.join(SETS)}")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, of " + ", ".join(MODELS))
    parser.add_argument("--train", type=int, default=600, help="training images per set (600)")
    parser.add_argument("--val", type=int, default=200, help="val images per set (200)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20 s per model, 64 + 32 images")
    parser.add_argument("--markdown", help="also write the report to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.budget_s, args.train, args.val = 20.0, 64, 32
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS] + [s for s in sets if s not in SETS]
    if unknown:
        parser.error(f"unknown model or set: {', '.join(unknown)}")
    try:  # what the run needs, now rather than half an hour in
        from benchmarks.realobjects import _skimage_data
        from ssd.pretrained import resolve

        _skimage_data()
        for name in models:
            if "+" in name:
                resolve(C.preset(name.split("+")[0]).model.backbone, name.split("+")[1])
    except (RuntimeError, ValueError) as exc:
        parser.error(str(exc))
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="rayssd-accuracy-") as work:
        rows = run(sets, models, args.budget_s, args.train, args.val, Path(work))
    header = (
        f"machine: {machine()}, {torch.get_num_threads()} torch threads; {args.train} train / "
        f"{args.val} val images per set, batch {BATCH}, {args.budget_s:.0f} s of training per model and set; "
        f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    )
    publish(header, format_table(rows, args.budget_s), args.markdown)


if __name__ == "__main__":
    main()
