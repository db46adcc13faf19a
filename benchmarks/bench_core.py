"""Core numerics against torchvision's SSD doing the same work, in one run.

    python -m benchmarks.bench_core [--quick] [--markdown FILE]

1. matching + encoding: our batched `encode_targets_batch` with `GridMatcher`, 64 images
   per call as a data-pipeline batch, vs torchvision's per-image `SSDMatcher` + `BoxCoder`
   (what `torchvision.models.detection.SSD.forward` does), SSD300 default boxes, images/s.
                                             goal: >= 5x
2. one SSD300-VGG16 training step (forward, loss, backward, SGD) at the same batch and
   input size: ours takes precomputed targets from the data pipeline and runs in the
   memory layout `ssd.layout` measures faster on this machine; torchvision's model resizes,
   normalises and matches inside its forward, as its users run it. images/s.
                                             goal: >= 1.15x
   (also printed: torchvision converted to channels-last, for reference)
3. `tiny` preset training step, images/s.    goal: >= 30
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import torch
import torchvision
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection import ssd300_vgg16
from torchvision.ops import box_iou

from benchmarks.report import machine, publish
from pipelines.common import keep_freed_memory
from ssd import config as C
from ssd import layout
from ssd.anchors import default_boxes
from ssd.boxes import cxcywh_to_xyxy
from ssd.grid_matching import GridMatcher
from ssd.matching import encode_targets_batch
from ssd.model import build_ssd
from ssd.step import TrainStep


def _rate(step: Callable[[], None], items: int, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return items * repeats / (time.perf_counter() - start)


def _random_targets(batch: int, g: torch.Generator, max_boxes: int = 10) -> tuple[list, list]:
    boxes, labels = [], []
    for _ in range(batch):
        n = int(torch.randint(1, max_boxes + 1, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 0.7
        boxes.append(torch.cat((xy, xy + torch.rand(n, 2, generator=g) * 0.28 + 0.02), 1))
        labels.append(torch.randint(1, 21, (n,), generator=g))
    return boxes, labels


def bench_matching(batch: int, repeats: int) -> tuple[float, float]:
    cfg = C.preset("ssd300_vgg16")
    size = cfg.model.image_size
    dboxes = default_boxes(cfg)
    anchors_px = cxcywh_to_xyxy(dboxes) * size
    boxes, labels = _random_targets(batch, torch.Generator().manual_seed(0))
    matcher, coder = det_utils.SSDMatcher(0.5), det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0))

    def torchvision_path() -> None:
        for b, lab in zip(boxes, labels):
            gt = b * size
            matched = matcher(box_iou(gt, anchors_px))
            fg = matched >= 0
            cls = torch.zeros(len(anchors_px), dtype=torch.int64)
            cls[fg] = lab[matched[fg]]
            coder.encode_single(gt[matched.clamp(min=0)], anchors_px)

    grid = GridMatcher.from_config(cfg, dboxes)

    def our_path() -> None:
        encode_targets_batch(boxes, labels, dboxes, matcher=grid)

    return _rate(our_path, batch, repeats), _rate(torchvision_path, batch, repeats)


def _train_step_ours(cfg: C.Config, batch: int) -> tuple[Callable[[], None], str]:
    """The step as rayssd's trainer runs it, in the memory layout `ssd.layout` picks on this
    machine (oneDNN's channels-last convolutions are faster on some CPUs, slower on others);
    returns it and the layout's name."""
    torch.manual_seed(0)
    model = build_ssd(cfg).train()
    channels_last = layout.channels_last(model, cfg, batch=batch, training=True)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4)
    size = cfg.model.image_size
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    images = images.contiguous(memory_format=memory_format)
    boxes, labels = _random_targets(batch, torch.Generator().manual_seed(1))
    labels = [lab.clamp(max=cfg.model.num_classes - 1) for lab in labels]
    cls_t, loc_t = encode_targets_batch(boxes, labels, default_boxes(cfg))  # done by the pipeline

    # the learning rate does not change the time of a step: any schedule will do
    step = TrainStep(model, opt, cfg.train, total_steps=1, steps_per_epoch=1, channels_last=channels_last)
    return functools.partial(step, images, cls_t, loc_t), "channels-last" if channels_last else "contiguous"


def _train_step_torchvision(batch: int, channels_last: bool = False) -> Callable[[], None]:
    torch.manual_seed(0)
    model = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=21).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4)
    images = [torch.rand(3, 300, 300) for _ in range(batch)]
    boxes, labels = _random_targets(batch, torch.Generator().manual_seed(1))
    targets = [{"boxes": b * 300, "labels": lab} for b, lab in zip(boxes, labels)]

    def step() -> None:
        losses = model(images, targets)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


Row = tuple[str, float, float | None, float | None, str]  # name, ours, baseline, goal, unit


def run(quick: bool = False) -> list[Row]:
    rows = []
    ours, theirs = bench_matching(batch=64, repeats=2 if quick else 10)
    rows.append(("matching + encoding, SSD300 (img/s)", ours, theirs, 5.0, "x torchvision"))
    batch, repeats = (2, 1) if quick else (8, 5)
    step, chosen = _train_step_ours(C.preset("ssd300_vgg16"), batch)
    ours = _rate(step, batch, repeats)
    theirs = _rate(_train_step_torchvision(batch), batch, repeats)
    name = f"SSD300-VGG16 train step, batch {batch}, ours {chosen} (img/s)"
    rows.append((name, ours, theirs, 1.15, "x torchvision"))
    theirs_cl = _rate(_train_step_torchvision(batch, channels_last=True), batch, repeats)
    rows.append(("  same, torchvision also channels-last (img/s)", ours, theirs_cl, None, "for reference"))
    tiny = C.preset("tiny")
    batch = tiny.train.batch_size
    step, chosen = _train_step_ours(tiny, batch)
    ours = _rate(step, batch, 3 if quick else 15, warmup=2)
    rows.append((f"tiny train step, batch {batch}, {chosen} (img/s)", ours, None, 30.0, "img/s"))
    return rows


def format_table(rows: list[Row]) -> str:
    lines = ["| benchmark | rayssd | torchvision | ratio | goal | met |", "|---|---|---|---|---|---|"]
    for name, ours, theirs, goal, unit in rows:
        base = "-" if theirs is None else f"{theirs:.2f}"
        ratio = "-" if theirs is None else f"{ours / theirs:.2f}x"
        figure = ours if theirs is None else ours / theirs
        target = unit if goal is None else f">= {goal:g} {unit}"
        met = "-" if goal is None else ("yes" if figure >= goal else "NO")
        lines.append(f"| {name} | {ours:.2f} | {base} | {ratio} | {target} | {met} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run, noisy figures)")
    parser.add_argument("--markdown", help="also write the table to this Markdown file")
    args = parser.parse_args()
    tuned = keep_freed_memory()  # as rayssd's data workers do; both sides run under it
    header = (
        f"machine: {machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, malloc tuned: {tuned}"
    )
    table = format_table(run(quick=args.quick))
    publish(header, table, args.markdown)


if __name__ == "__main__":
    main()
