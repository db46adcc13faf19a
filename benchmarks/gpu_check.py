"""One GPU check, at most 8 minutes, needing only torch and torchvision (no Ray, MLflow or network).

    python -m benchmarks.gpu_check OUT_DIR [--budget-s 480] [--quick]

Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md:

- training step images/s of rayssd's SSD300-VGG16 and SSDLite320 (`ssd.step.TrainStep`, the
  loop's own step: multibox loss with hard negative mining, finiteness checked every
  `ssd.step.CUDA_CHECK_EVERY` steps) at batch 32 and 64, in float32, bfloat16 autocast,
  bfloat16 + channels-last, and that `torch.compile`d, beside torchvision's `ssd300_vgg16`
  (its own loss) in the same settings;
- the share of a training step the GPU sits idle waiting on the host (from torch.profiler:
  1 - device busy time / wall time over a few steps);
- inference images/s at batch 64 including decoding and per-class NMS on the device
  (`ssd.detector.Detector`), float32 and bfloat16.

Anchors from NVIDIA's SSD300 (DeepLearningExamples, one A100): 1,058 img/s inference at batch
64, ~717 img/s training per GPU with AMP. Without a GPU it runs the same code on the CPU at
batch 2 (a smoke run: the numbers say nothing about GPUs). Every row is timed with CUDA
synchronised at its ends; a configuration that does not fit the time left is skipped and
named.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from ssd import config as C
from ssd.anchors import default_boxes
from ssd.detector import Detector
from ssd.matching import encode_targets_batch
from ssd.model import build_ssd
from ssd.optim import build_optimizer
from ssd.step import TrainStep

BUDGET_S = 480.0
NVIDIA_SSD300_INFER = 1058.0  # img/s, batch 64, one A100 (DeepLearningExamples)
NVIDIA_SSD300_TRAIN = 717.0  # img/s per A100, AMP
MODES = ("fp32", "bf16", "bf16+cl", "bf16+cl+compile")
NUM_CLASSES = 81  # COCO's 80 and background


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch(cfg: C.Config, batch: int, device: torch.device, seed: int = 0):
    """uint8 images [B, 3, S, S] and matched targets of 1-6 random boxes each, on `device`."""
    g = torch.Generator().manual_seed(seed)
    size = cfg.model.image_size
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)
    boxes, labels = [], []
    for _ in range(batch):
        n = int(torch.randint(1, 7, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 0.7
        wh = 0.05 + torch.rand(n, 2, generator=g) * 0.25
        boxes.append(torch.cat([xy, (xy + wh).clamp(max=1.0)], dim=1))
        labels.append(torch.randint(1, NUM_CLASSES, (n,), generator=g))
    cls_t, loc_t = encode_targets_batch(boxes, labels, default_boxes(cfg))
    return images.to(device), cls_t.to(device), loc_t.to(device), boxes, labels


def _idle_share(run_steps, device: torch.device, steps: int) -> float | None:
    """1 - (device busy time / wall time) over `steps` steps, from torch.profiler; None off CUDA."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run_steps(steps)
        _sync(device)
    wall_us = (time.perf_counter() - start) * 1e6
    busy = 0.0
    for event in prof.key_averages():
        busy += float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)))
    return max(0.0, 1.0 - busy / max(wall_us, 1e-9))


def train_rate(name: str, batch: int, mode: str, device: torch.device, steps: int) -> dict[str, Any]:
    """Images/s of one training configuration, and the GPU's idle share."""
    torch.manual_seed(0)
    channels_last, compiled = "cl" in mode.split("+"), "compile" in mode
    amp = mode != "fp32"
    if name == "torchvision ssd300_vgg16":
        from torchvision.models.detection import ssd300_vgg16

        cfg = C.preset("ssd300_vgg16")
        model = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=NUM_CLASSES).to(device).train()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        images, _, _, boxes, labels = _batch(cfg, batch, device)
        size = cfg.model.image_size
        inputs = [im.float() / 255 for im in images]
        targets = [
            {"boxes": (b * size).to(device), "labels": lab.to(device)} for b, lab in zip(boxes, labels)
        ]
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
        forward = torch.compile(model) if compiled else model
        dtype = torch.bfloat16

        def step_once() -> None:
            with torch.autocast(device.type, dtype=dtype, enabled=amp):
                parts = forward(inputs, targets)
            loss = parts["bbox_regression"] + parts["classification"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    else:
        cfg = C.preset(name)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=NUM_CLASSES))
        model = build_ssd(cfg).to(device).train()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        forward = torch.compile(model) if compiled else model
        trainer = TrainStep(
            forward,
            build_optimizer(model, cfg.train),
            cfg.train,
            total_steps=10**6,
            steps_per_epoch=10**3,
            device=device,
            amp=amp,
            channels_last=channels_last,
        )
        images, cls_t, loc_t, _, _ = _batch(cfg, batch, device)

        def step_once() -> None:
            trainer(images, cls_t, loc_t)

    def run_steps(n: int) -> None:
        for _ in range(n):
            step_once()

    run_steps(3 if not compiled else 5)  # warm-up: cuDNN autotuning, compilation
    _sync(device)
    start = time.perf_counter()
    run_steps(steps)
    _sync(device)
    seconds = time.perf_counter() - start
    return {"images_per_s": steps * batch / seconds, "gpu_idle_share": _idle_share(run_steps, device, 5)}


def infer_rate(name: str, batch: int, mode: str, device: torch.device, steps: int) -> dict[str, Any]:
    """Images/s of detection (network, decoding, per-class NMS, answers on the CPU)."""
    cfg = C.preset(name)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=NUM_CLASSES))
    detector = Detector(build_ssd(cfg).to(device).eval(), cfg, channels_last=device.type == "cuda")
    images = _batch(cfg, batch, device)[0]
    sizes = [(480, 640)] * batch

    def run(n: int) -> None:
        for _ in range(n):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode != "fp32"):
                detector(images, sizes)

    run(3)
    _sync(device)
    start = time.perf_counter()
    run(steps)
    _sync(device)
    return {"images_per_s": steps * batch / (time.perf_counter() - start)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0]
    )
    parser.add_argument("out", type=Path, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument(
        "--budget-s", type=float, default=BUDGET_S, help="stop starting rows after this (480)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: one batch size, two steps a row")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
    batches = (32, 64) if cuda and not args.quick else (2,)
    steps = 2 if args.quick else (20 if cuda else 2)
    facts = {
        "device": torch.cuda.get_device_name(0)
        if cuda
        else f"CPU ({platform.processor() or platform.machine()})",
        "gpu": cuda,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "bf16_supported": bool(torch.cuda.is_bf16_supported()) if cuda else None,
    }
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []

    def attempt(kind: str, fn, name: str, batch: int, mode: str) -> None:
        label = f"{kind} {name} batch {batch} {mode}"
        if time.perf_counter() - started > args.budget_s:
            skipped.append(f"{label}: out of time")
            return
        try:
            result = fn(name, batch, mode, device, steps)
        except Exception as exc:  # an out-of-memory or a compile failure is a row, not the end
            skipped.append(f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            return
        finally:
            if cuda:
                torch.cuda.empty_cache()
        rows.append({"kind": kind, "model": name, "batch": batch, "mode": mode, **result})
        print(f"{label}: {result['images_per_s']:.1f} img/s", flush=True)

    modes = MODES if not args.quick else ("fp32", "bf16+cl")
    for name in ("ssd300_vgg16", "torchvision ssd300_vgg16", "ssdlite320"):
        for batch in batches:
            for mode in modes:
                attempt("train", train_rate, name, batch, mode)
    for name in ("ssd300_vgg16", "ssdlite320"):
        for mode in ("fp32", "bf16"):
            attempt("infer", infer_rate, name, 64 if cuda else 2, mode)
    facts["seconds"] = time.perf_counter() - started
    (args.out / "gpu_check.json").write_text(
        json.dumps({**facts, "rows": rows, "skipped": skipped}, indent=2)
    )
    (args.out / "gpu_check.md").write_text(markdown(facts, rows, skipped))
    print(markdown(facts, rows, skipped))
    return 0


def markdown(facts: dict[str, Any], rows: list[dict[str, Any]], skipped: list[str]) -> str:
    bf16 = {True: "supported", False: "not supported", None: "n/a (no GPU: a CPU smoke run)"}
    lines = [
        f"device: {facts['device']}, torch {facts['torch']} (CUDA {facts['cuda']}), GPU bf16 "
        f"{bf16[facts['bf16_supported']]}; {facts.get('seconds', 0):.0f} s",
        "",
        "| step | model | batch | mode | img/s | vs torchvision | GPU idle (host-bound) |",
        "|---|---|---|---|---|---|---|",
    ]
    theirs = {
        (r["batch"], r["mode"]): r["images_per_s"]
        for r in rows
        if r["model"] == "torchvision ssd300_vgg16" and r["kind"] == "train"
    }
    for r in rows:
        base = (
            theirs.get((r["batch"], r["mode"]))
            if r["model"] == "ssd300_vgg16" and r["kind"] == "train"
            else None
        )
        ratio = f"{r['images_per_s'] / base:.2f}x" if base else "-"
        idle = r.get("gpu_idle_share")
        lines.append(
            f"| {r['kind']} | {r['model']} | {r['batch']} | {r['mode']} | {r['images_per_s']:.2f} | "
            f"{ratio} | {'-' if idle is None else f'{idle:.1%}'} |"
        )
    lines += [
        "",
        f"Anchors (NVIDIA SSD300, one A100): inference {NVIDIA_SSD300_INFER:.0f} img/s at batch 64, "
        f"training ~{NVIDIA_SSD300_TRAIN:.0f} img/s with AMP.",
    ]
    lines += [f"- skipped {s}" for s in skipped]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
