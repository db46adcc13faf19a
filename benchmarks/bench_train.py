"""`rayssd train` against a plain PyTorch loop, and the quickstart's accuracy against torchvision.

    python -m benchmarks.bench_train [--images 2048] [--data BUILTIN_DIR] [--budget-s SECONDS]
                                     [--augment] [--skip-accuracy] [--quick] [--markdown FILE]

1. Training throughput, `tiny` preset, batch 16 per worker, data.augment=false (true with
   --augment), the first --images images of the built-in train split, images/s.
   rayssd: `jobs.train.run` in this process, 2 epochs; the figure is the second epoch's
   ``images_per_s`` (its first batch to its last step, as the worker loop times it; the
   first epoch also pays for worker start-up). Baseline: one process, no Ray, torch's
   default threads; each batch is decoded, transformed and matched inline by the same
   `SamplePreprocessor`, then the same `ssd.step.TrainStep` (forward, `multibox_loss`,
   backward, `build_optimizer` step) as the workers; the figure is its last epoch timed the
   same way (whole epoch, first batch included), after one warm-up epoch (none with --quick).
   Without augmentation rayssd prepares the samples once before epoch 1 (data.cache) and
   every epoch reads them back from the object store; the plain loop decodes inline.
   k = 1 worker vs the plain loop                       goal: >= 0.9x (Ray costs <= 10 %)
   k = 2 workers vs the same plain loop                 goal: report
   (also reported: wall time of each whole run: ingest, start-up, 2 epochs, eval, MLflow)
2. Accuracy in the quickstart's budget: `tiny` trained by `jobs.train.run` with 2 workers
   and QUICKSTART_SETTINGS on the built-in train split (12k images unless --data); its final
   val mAP@0.5 and the run's wall time T. torchvision's `ssdlite320_mobilenet_v3_large` (no
   pretrained weights, 320 px input as it is built) trains in one process on the same
   images for T seconds (--budget-s to override) with its own loss and the TV_* recipe,
   decoding inline within the budget, and is evaluated on the same val split by the same
   `CocoEvaluator`.                                     goal: >= 0.9 and >= torchvision

Ray starts once, after the plain loop, and stops before torchvision trains, so each
baseline has the machine alone. --data reads an existing built-in dataset and never
rewrites it. --quick (a smoke run, < 4 minutes) uses 64 train / 32 val images, a 20 s
budget, and its 2-worker throughput run stands in for the quickstart run. Figures need an
otherwise idle machine: the header shows the load average.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple
from unittest import mock

import numpy as np
import torch
import torchvision

from benchmarks.report import machine
from jobs import train as train_job
from jobs.quickstart import SETTINGS as QUICKSTART_SETTINGS
from jobs.quickstart import WORKERS as QUICKSTART_WORKERS
from pipelines.common import keep_freed_memory, start_ray
from pipelines.data.builtin import DEFAULT_TRAIN_IMAGES, DEFAULT_VAL_IMAGES, write_builtin
from pipelines.data.samples import SamplePreprocessor, read_image
from ssd import config as C
from ssd.config import with_classes
from ssd.evaluate import CocoEvaluator
from ssd.model import build_ssd
from ssd.optim import build_optimizer, set_learning_rate
from ssd.step import TrainStep

BATCH = 16  # per worker, both sections
THROUGHPUT_EPOCHS = 2  # the second is the steady one
THROUGHPUT_VAL_IMAGES = 64  # evaluated once, after the last epoch: only the wall time sees it
# --quick: a smoke run that must stay under 4 minutes even on a busy 2-core machine
QUICK = {"train": 64, "val": 32, "budget_s": 20.0}
# torchvision's SSDlite recipe (references/detection: SGD, momentum 0.9, weight decay 4e-5,
# cosine; lr 0.15 at 8 GPUs x 24 images for 600 epochs). Linear scaling would give 0.0125 at
# 16 images; a budget of minutes wants more, so 0.05 behind a warm-up over the first 10 % of
# the time budget (the step count is what the budget decides), then cosine to 0 at its end.
TV_LR = 0.05
TV_MOMENTUM = 0.9
TV_WEIGHT_DECAY = 4e-5
TV_WARMUP_SHARE = 0.1


class Row(NamedTuple):
    name: str
    ours: float
    baseline: float | None
    goal: str  # "" for a figure reported for reference
    met: bool | None
    digits: int = 1


# --- data ------------------------------------------------------------------------------------


def _builtin_dir(data: str | None, root: Path, train: int, val: int) -> Path:
    """--data as given (read, never rewritten), else a fresh built-in dataset under `root`."""
    if data is None:
        write_builtin(root / "builtin", seed=0, train_images=train, val_images=val)
        return root / "builtin"
    folder = Path(data).expanduser().resolve()
    for split in ("train", "val"):
        if not _annotations(folder, split).is_file():
            raise ValueError(f"--data {data}: no {_annotations(folder, split)}; expected a built-in dataset")
    return folder


def _annotations(folder: Path, split: str) -> Path:
    return folder / "annotations" / f"instances_{split}.json"


def _subset(folder: Path, split: str, count: int, out: Path) -> Path:
    """A COCO file of the split's first `count` images (and their boxes), with absolute paths."""
    data = json.loads(_annotations(folder, split).read_text())
    if len(data["images"]) < count:
        raise ValueError(f"{_annotations(folder, split)} holds {len(data['images'])} images; {count} needed")
    images = [
        {**image, "file_name": str(folder / split / "images" / image["file_name"])}
        for image in data["images"][:count]
    ]
    ids = {image["id"] for image in images}
    annotations = [a for a in data["annotations"] if a["image_id"] in ids]
    out.write_text(json.dumps({**data, "images": images, "annotations": annotations}))
    return out


def coco_rows(annotation_file: Path, image_dir: Path) -> tuple[list[dict[str, Any]], list[int], list[str]]:
    """The rows `pipelines.data.datasets.read_dataset` makes, read with json alone (no Ray).

    Returns (rows, category ids, class names): rows hold ``image_id``, ``path``, ``width``,
    ``height``, ``boxes`` float32 [N, 4] xyxy pixels (clipped to the image; dropped if
    nothing is left, as ingest does), ``labels`` int64 [N] in 1..K (k-th category id in
    sorted order) and ``ignore`` bool [N] (iscrowd).
    """
    data = json.loads(annotation_file.read_text())
    categories = sorted(data["categories"], key=lambda c: c["id"])
    label_of = {c["id"]: k for k, c in enumerate(categories, start=1)}
    by_image: dict[int, list[dict]] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    rows = []
    for image in data["images"]:
        w, h = image["width"], image["height"]
        anns = by_image.get(image["id"], [])
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)  # [N, 4] xyxy px
        boxes = boxes.clip(0, [w, h, w, h])
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        rows.append(
            {
                "image_id": image["id"],
                "path": str(image_dir / image["file_name"]),
                "width": w,
                "height": h,
                "boxes": boxes[keep].astype(np.float32),
                "labels": np.array([label_of[a["category_id"]] for a in anns], dtype=np.int64)[keep],
                "ignore": np.array([bool(a.get("iscrowd")) for a in anns], dtype=bool)[keep],
            }
        )
    return rows, [c["id"] for c in categories], [c["name"] for c in categories]


def _numpy_batch(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Rows → the column batch Ray Data hands `SamplePreprocessor` (ragged columns as objects)."""
    batch = {key: np.array([r[key] for r in rows]) for key in ("image_id", "path", "width", "height")}
    for key in ("boxes", "labels", "ignore"):
        column = np.empty(len(rows), dtype=object)
        for i, r in enumerate(rows):
            column[i] = r[key]
        batch[key] = column
    return batch


# --- 1. throughput ---------------------------------------------------------------------------


def plain_loop_rate(rows: list[dict[str, Any]], cfg: C.Config, epochs: int) -> float:
    """Images/s of the last of `epochs` epochs of a single-process loop (first batch included)."""
    t = cfg.train
    threads = torch.get_num_threads()  # read first: SamplePreprocessor sets the process's threads
    torch.manual_seed(t.seed)
    model = build_ssd(cfg).train()
    steps = len(rows) // t.batch_size  # incomplete batches are dropped, as the workers do
    step = TrainStep(model, build_optimizer(model, t), t, total_steps=epochs * steps, steps_per_epoch=steps)
    rate = float("nan")
    for epoch in range(epochs):
        pre = SamplePreprocessor(C.to_dict(cfg), train=True, epoch=epoch, threads=threads)
        start = time.perf_counter()
        for i in range(steps):
            sample = pre(_numpy_batch(rows[i * t.batch_size : (i + 1) * t.batch_size]))
            step(
                torch.from_numpy(sample["image"]),
                torch.from_numpy(sample["cls_targets"]),
                torch.from_numpy(sample["loc_targets"]),
            )
        rate = steps * t.batch_size / (time.perf_counter() - start)
    return rate


def rayssd_train(
    train_json: Path, val_json: Path, storage: Path, name: str, workers: int, settings: list[str]
) -> tuple[dict[str, Any], float]:
    """(`jobs.train.run`'s result, wall seconds of the whole call) for one `rayssd train` run."""
    parser = argparse.ArgumentParser()
    train_job.add_arguments(parser)
    argv = ["--data", str(train_json), "--val-data", str(val_json), "--workers", str(workers)]
    argv += ["--storage", str(storage), "--name", name, "--register-as", "none", "--quiet"]
    for setting in settings:
        argv += ["--set", setting]
    start = time.perf_counter()
    result = train_job.run(parser.parse_args(argv))
    return result, time.perf_counter() - start


# --- 2. accuracy: torchvision's SSDlite in the same budget -----------------------------------


def _budget_lr(progress: float) -> float:
    """TV_LR at `progress` (share of the time budget spent): linear warm-up, then cosine."""
    if progress < TV_WARMUP_SHARE:
        return TV_LR * max(progress / TV_WARMUP_SHARE, 0.01)
    done = (progress - TV_WARMUP_SHARE) / (1.0 - TV_WARMUP_SHARE)
    return TV_LR * 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))


def _tv_inputs(rows: list[dict[str, Any]], train: bool) -> tuple[list[torch.Tensor], list[dict]]:
    """Float [3, H, W] images in [0, 1], and targets: boxes [N, 4] xyxy pixels, labels 1..K."""
    images = [torch.from_numpy(read_image(r["path"])).permute(2, 0, 1).float().div_(255) for r in rows]
    targets = []
    if train:
        for r in rows:
            keep = ~r["ignore"]  # crowds are left out of training targets, as rayssd does
            targets.append(
                {"boxes": torch.from_numpy(r["boxes"][keep]), "labels": torch.from_numpy(r["labels"][keep])}
            )
    return images, targets


def _shuffled_batches(count: int, rng: np.random.Generator):
    """Index batches of BATCH, a fresh permutation each epoch, incomplete batches dropped."""
    while True:
        order = rng.permutation(count)
        for first in range(0, count - BATCH + 1, BATCH):
            yield order[first : first + BATCH]


def train_torchvision(rows: list[dict[str, Any]], num_classes: int, budget_s: float) -> tuple[Any, dict]:
    """torchvision's SSDlite320 trained for about `budget_s` wall seconds (it stops before a
    step that would likely end further past the budget than short of it); decoding counts."""
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    torch.manual_seed(0)
    model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=TV_LR, momentum=TV_MOMENTUM, weight_decay=TV_WEIGHT_DECAY)
    stats = {"steps": 0, "images": 0, "diverged_at": None, "loss": float("nan")}
    start, step_s = time.perf_counter(), 0.0
    for batch in _shuffled_batches(len(rows), np.random.default_rng(0)):
        elapsed = time.perf_counter() - start
        if elapsed + step_s / 2 >= budget_s:
            break
        set_learning_rate(optimizer, _budget_lr(elapsed / budget_s))
        images, targets = _tv_inputs([rows[j] for j in batch], train=True)
        loss = sum(model(images, targets).values())
        if not torch.isfinite(loss):
            stats["diverged_at"] = stats["steps"]
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        stats["steps"] += 1
        stats["images"] += BATCH
        stats["loss"] = loss.item()
        step_s = time.perf_counter() - start - elapsed
    stats["seconds"] = time.perf_counter() - start
    stats["epochs"] = stats["images"] / len(rows)
    return model, stats


def evaluate_torchvision(model: Any, rows: list[dict[str, Any]], ground_truth: dict) -> float:
    """Val mAP@0.5; torchvision's eval outputs are already in original-image pixels."""
    model.eval()
    evaluator = CocoEvaluator(ground_truth)  # label k ↔ k-th category id in sorted order
    with torch.inference_mode():
        for first in range(0, len(rows), BATCH):
            chunk = rows[first : first + BATCH]
            images, _ = _tv_inputs(chunk, train=False)
            outputs = model(images)
            evaluator.update(
                [r["image_id"] for r in chunk],
                [o["boxes"] for o in outputs],
                [o["scores"] for o in outputs],
                [o["labels"] for o in outputs],
            )
    return evaluator.summarize()["map50"]


def _ground_truth(
    rows: list[dict[str, Any]], category_ids: list[int], names: list[str], source: Path
) -> dict:
    """The val ground truth exactly as `jobs.train` builds it from its rows."""
    from pipelines.data.datasets import DatasetInfo, coco_ground_truth

    info = DatasetInfo(
        kind="coco",
        source=str(source),
        split=None,
        class_names=tuple(names),
        category_ids=tuple(category_ids),
        num_images=len(rows),
        num_boxes=sum(len(r["boxes"]) for r in rows),
    )
    return coco_ground_truth(rows, info)


# --- the run ---------------------------------------------------------------------------------


def _start_ray() -> None:
    import ray

    start_ray("local", num_cpus=os.cpu_count())  # this machine, whatever RAY_ADDRESS says
    ray.data.DataContext.get_current().enable_progress_bars = False


def _throughput(
    train_json: Path, val_json: Path, tmp: Path, settings: list[str], plain: float
) -> tuple[list[Row], list[str], dict[int, tuple[dict[str, Any], float]]]:
    """Section 1's rayssd runs, k = 1 and 2 workers, against the plain loop's rate; also
    returns each run's (result, wall seconds) by k."""
    rows, notes, runs = [], [], {}
    for k in (1, 2):
        result, wall = runs[k] = rayssd_train(train_json, val_json, tmp / "runs", f"bench-{k}", k, settings)
        first, steady = result["history"][0], result["history"][-1]
        label = f"{k} worker{'s' if k > 1 else ''}"
        rate = steady["images_per_s"]
        goal = (">= 0.9x", rate / plain >= 0.9) if k == 1 else ("report", None)
        rows.append(Row(f"train images/s, {label} (vs plain loop)", rate, plain, *goal))
        rows.append(Row(f"  whole `rayssd train` run, {label}, 2 epochs (s)", wall, None, "", None))
        notes.append(
            f"rayssd, {label}: epoch {int(steady['epoch'])} took {steady['epoch_seconds']:.1f} s, "
            f"{100 * steady['data_wait_share']:.0f} % of it waiting for data; epoch 1: "
            f"{first['images_per_s']:.1f} img/s; samples "
            + (
                "prepared once before epoch 1 (data.cache; in the whole-run time)"
                if result["samples_cached"]
                else "prepared by Ray Data actors during every epoch"
            )
        )
    return rows, notes, runs


def _accuracy(
    rayssd: tuple[dict[str, Any], float],
    how: str,
    train_json: Path,
    val_json: Path,
    folder: Path,
    budget: float,
) -> tuple[list[Row], list[str]]:
    """Section 2: the rayssd run's mAP@0.5 and wall time against torchvision's in `budget` s;
    `how` says how the rayssd run was made."""
    result, wall = rayssd
    train_rows, _, _ = coco_rows(train_json, folder / "train" / "images")
    val_rows, category_ids, names = coco_rows(val_json, folder / "val" / "images")
    model, stats = train_torchvision(train_rows, len(names) + 1, budget)
    ground_truth = _ground_truth(val_rows, category_ids, names, val_json)
    theirs = evaluate_torchvision(model, val_rows, ground_truth)
    ours = result["metrics"]["map50"]
    name = "tiny mAP@0.5 after the quickstart budget (vs torchvision ssdlite320)"
    rows = [
        Row(name, ours, theirs, ">= 0.9 and >= torchvision", ours >= 0.9 and ours >= theirs, 3),
        Row("  training wall time (s)", wall, stats["seconds"], "", None),
    ]
    diverged = stats["diverged_at"]
    notes = [
        f"accuracy: {len(train_rows)} train / {len(val_rows)} val images; rayssd: {how}; "
        "its time is the whole run's wall time",
        f"torchvision ssdlite320 (320 px, from scratch): budget {budget:.0f} s, {stats['steps']} "
        f"steps, {stats['epochs']:.2f} epochs, last loss {stats['loss']:.3f}; SGD lr {TV_LR}, "
        f"momentum {TV_MOMENTUM}, wd {TV_WEIGHT_DECAY}, warm-up over {TV_WARMUP_SHARE:.0%} of "
        "the budget, then cosine to 0" + (f"; DIVERGED at step {diverged}" if diverged is not None else ""),
    ]
    return rows, notes


def run(
    images: int,
    data: str | None = None,
    budget_s: float | None = None,
    augment: bool = False,
    accuracy: bool = True,
    quick: bool = False,
) -> tuple[list[Row], list[str]]:
    """Both sections; returns the table rows and notes on what ran."""
    import ray

    settings = [f"train.epochs={THROUGHPUT_EPOCHS}", f"train.batch_size={BATCH}", "train.eval_every=2"]
    settings.append(f"data.augment={str(augment).lower()}")
    C.override(C.preset("tiny"), QUICKSTART_SETTINGS)  # a bad setting fails now, not after section 1
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp_name:
        tmp = Path(tmp_name)
        train_n = max(images, DEFAULT_TRAIN_IMAGES if accuracy and not quick else 0)
        val_n = QUICK["val"] if quick else DEFAULT_VAL_IMAGES if accuracy else THROUGHPUT_VAL_IMAGES
        folder = _builtin_dir(data, tmp, train_n, val_n)
        train_json = _subset(folder, "train", images, tmp / "throughput_train.json")
        val_json = _subset(folder, "val", min(THROUGHPUT_VAL_IMAGES, val_n), tmp / "throughput_val.json")
        # the whole built-in dataset (--quick: the small one, also out of a --data folder)
        acc_train = train_json if quick else _annotations(folder, "train")
        acc_val = val_json if quick else _annotations(folder, "val")

        rows, _, names = coco_rows(train_json, folder / "train" / "images")
        cfg = with_classes(C.override(C.preset("tiny"), settings), tuple(names))
        epochs = 1 if quick else 2
        plain = plain_loop_rate(rows, cfg, epochs=epochs)
        plain_note = (
            f"plain loop: {torch.get_num_threads()} torch threads, data work inline; epoch {epochs} "
            f"of {epochs} timed whole ({len(rows) // BATCH * BATCH} images)"
        )

        _start_ray()
        with mock.patch.dict(os.environ, {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}):
            table, notes, runs = _throughput(train_json, val_json, tmp, settings, plain)
            if accuracy and quick:  # a smoke run: one Ray Train start-up less
                quickstart, how = runs[2], "--quick: the 2-worker throughput run stands in"
            elif accuracy:
                how = f"{QUICKSTART_WORKERS} workers, {' '.join(QUICKSTART_SETTINGS)}"
                quickstart = rayssd_train(
                    acc_train, acc_val, tmp / "runs", "bench-acc", QUICKSTART_WORKERS, QUICKSTART_SETTINGS
                )
        ray.shutdown()  # torchvision trains alone, as the baseline loop did
        notes.insert(0, plain_note)
        if accuracy:
            budget = budget_s or (QUICK["budget_s"] if quick else quickstart[1])
            more_rows, more_notes = _accuracy(quickstart, how, acc_train, acc_val, folder, budget)
            table += more_rows
            notes += more_notes
    return table, notes


def format_table(rows: list[Row]) -> str:
    lines = ["| benchmark | rayssd | baseline | ratio | goal | met |", "|---|---|---|---|---|---|"]
    for r in rows:
        base = "-" if r.baseline is None else f"{r.baseline:.{r.digits}f}"
        ratio = f"{r.ours / r.baseline:.2f}x" if r.baseline and r.goal else "-"
        met = "-" if r.met is None else ("yes" if r.met else "NO")
        lines.append(f"| {r.name} | {r.ours:.{r.digits}f} | {base} | {ratio} | {r.goal or '-'} | {met} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2048, help="training images per epoch (default: 2048)")
    parser.add_argument(
        "--data", metavar="BUILTIN_DIR", help="an existing built-in dataset (default: write one)"
    )
    parser.add_argument("--budget-s", type=float, help="torchvision's training budget (default: rayssd's T)")
    parser.add_argument("--augment", action="store_true", help="throughput with data.augment=true")
    parser.add_argument("--skip-accuracy", action="store_true", help="throughput only")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 64/32 images, 20 s budget")
    parser.add_argument("--markdown", help="also write the table to this Markdown file")
    args = parser.parse_args()
    images = QUICK["train"] if args.quick else args.images
    if images < 2 * BATCH:
        parser.error(f"--images {images}: 2 workers need at least {2 * BATCH} images")
    tuned = keep_freed_memory()  # as rayssd's data workers do; the plain loop runs under it too
    load_before = os.getloadavg()[0]
    rows, notes = run(images, args.data, args.budget_s, args.augment, not args.skip_accuracy, args.quick)
    load_after = os.getloadavg()[0]
    if max(load_before, load_after) > (os.cpu_count() or 1):
        notes.append(
            "WARNING: the load average exceeded the CPU count: other processes shared these cores, "
            "so the figures are not comparable with an idle machine's (a 2-thread torch loop suffers most)"
        )
    import ray

    header = (
        f"machine: {machine()}, "
        f"torchvision {torchvision.__version__}, ray {ray.__version__}, malloc tuned: {tuned}; "
        f"preset tiny, batch {BATCH} per worker, {images} train images, augment: {args.augment}; "
        f"load average {load_before:.1f} at the start, {load_after:.1f} at the end"
    )
    table = format_table(rows)
    text = "\n".join([header, "", table, "", *(f"- {n}" for n in notes)])
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
