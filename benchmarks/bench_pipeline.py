"""The Ray Data preprocessing pipeline against a torch DataLoader doing the same work.

    python -m benchmarks.bench_pipeline [--images 1024] [--quick] [--markdown FILE]

1. Training-sample throughput (decode JPEG → SSD augmentation → resize → match + encode),
   steady-state images/s over one pass of the built-in dataset (from the first batch on:
   worker start-up is a per-pass constant), `tiny` preset: rayssd's Ray Data
   pipeline (k tasks at once, 1 CPU each, matching a whole batch at once) vs
   `torch.utils.data.DataLoader` with k worker processes running the same per-image
   transform and the same matcher per sample, as a DataLoader pipeline is written
   (default collation); k = 1 and 2.                    goal: >= 1.0x at each k
   For reference, also a DataLoader given rayssd's batched matching in its collate
   function: then both sides do identical work and parity is the expected outcome.
2. Feeding the `tiny` model: one data worker, the training loop in this process on the
   other core (1 torch thread); the share of wall time the loop waits for its next batch.
                                                        goal: <= 5 %
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from benchmarks.report import machine, publish
from pipelines.common import keep_freed_memory, start_ray
from pipelines.data.builtin import write_builtin
from pipelines.data.datasets import read_dataset
from pipelines.data.samples import SamplePreprocessor, preprocess
from ssd import config as C
from ssd.config import with_classes
from ssd.loss import multibox_loss
from ssd.matching import encode_targets
from ssd.model import build_ssd

BATCH = 32


class _TorchDataset(torch.utils.data.Dataset):
    """The same rows and per-image work as `SamplePreprocessor`, one image per item."""

    def __init__(self, rows: list[dict], config: dict):
        self.rows, self.config, self.pre = rows, config, None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple:
        if self.pre is None:  # built once per worker process, like the Ray actor
            self.pre = SamplePreprocessor(self.config, train=True)
        return self.rows[i], self.pre._sample(self.rows[i])


class _PerSampleDataset(_TorchDataset):
    """What a hand-written DataLoader pipeline does: each item fully prepared on its own,
    matching included (the same GridMatcher, one image at a time), then default collation."""

    def __getitem__(self, i: int) -> dict:
        _, (image, boxes, labels) = super().__getitem__(i)
        cls_t, loc_t = encode_targets(
            torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
            self.pre.default_boxes,
            self.pre.cfg.train.iou_threshold,
            self.pre.matcher,
        )
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "cls_targets": cls_t,
            "loc_targets": loc_t,
        }


def _collate(pre_config: dict):
    state: dict = {}

    def collate(items: list[tuple]) -> dict:
        if "pre" not in state:
            state["pre"] = SamplePreprocessor(pre_config, train=True)
        pre = state["pre"]
        samples = [s for _, s in items]
        images = np.stack([s[0].transpose(2, 0, 1) for s in samples])
        boxes = [torch.from_numpy(np.ascontiguousarray(s[1], dtype=np.float32)) for s in samples]
        labels = [torch.from_numpy(np.ascontiguousarray(s[2], dtype=np.int64)) for s in samples]
        from ssd.matching import encode_targets_batch

        cls_t, loc_t = encode_targets_batch(
            boxes, labels, pre.default_boxes, pre.cfg.train.iou_threshold, pre.matcher
        )
        return {"image": torch.from_numpy(images), "cls_targets": cls_t, "loc_targets": loc_t}

    return collate


def _dataloader_rate(rows: list[dict], config: dict, workers: int, batched_matching: bool) -> float:
    """A DataLoader with `workers` processes: per-sample matching and default collation, or
    (`batched_matching`) rayssd's batched matching moved into its collate function."""
    dataset = _TorchDataset(rows, config) if batched_matching else _PerSampleDataset(rows, config)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=BATCH,
        num_workers=workers,
        collate_fn=_collate(config) if batched_matching else None,
        multiprocessing_context="fork",
    )
    return _steady_rate(iter(loader))


def _ray_rate(ds, cfg: C.Config, workers: int) -> float:
    samples = preprocess(ds, cfg, train=True, batch_size=BATCH, workers=workers)
    return _steady_rate(iter(samples.iter_batches(batch_size=BATCH, batch_format="numpy")))


def _steady_rate(batches) -> float:
    """Images/s after the first batch: worker start-up (process spawn, imports) is a
    once-per-pass cost that both sides pay differently and that a long epoch amortises."""
    next(batches)
    start, seen = time.perf_counter(), 0
    for batch in batches:
        seen += len(batch["image"])
    return seen / (time.perf_counter() - start)


def _wait_fraction(rows: list[dict], cfg: C.Config, steps: int) -> tuple[float, float]:
    """(share of the loop's wall time spent waiting for data, training images/s)."""
    torch.set_num_threads(1)
    model = build_ssd(cfg).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    import ray

    needed = (steps + 2) * BATCH
    ds = ray.data.from_items((rows * (needed // len(rows) + 1))[:needed])
    samples = preprocess(ds, cfg, train=True, batch_size=BATCH, workers=1)
    it = iter(samples.iter_torch_batches(batch_size=BATCH, drop_last=True, prefetch_batches=2))
    waited, trained, seen = 0.0, 0.0, 0
    next(it)  # start-up (actor creation, first batch) is not steady state
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        cls_logits, loc_preds = model(batch["image"])
        loss = multibox_loss(cls_logits, loc_preds, batch["cls_targets"], batch["loc_targets"])["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        waited += t1 - t0
        trained += time.perf_counter() - t1
        seen += BATCH
    del it  # close the stream while Ray is up
    return waited / (waited + trained), seen / (waited + trained)


def run(images: int, quick: bool) -> list[tuple]:
    import ray

    start_ray(None, num_cpus=2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    keep_freed_memory()
    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        write_builtin(tmp, seed=0, train_images=images, val_images=8)
        ds, info, _ = read_dataset(os.path.join(tmp, "annotations", "instances_train.json"))
        ds = ds.materialize()
        rows = ds.take_all()
        cfg = with_classes(C.preset("tiny"), info.class_names)
        config = C.to_dict(cfg)
        for k in (1, 2):
            ours = _ray_rate(ds, cfg, k)
            per_sample = _dataloader_rate(rows, config, k, batched_matching=False)
            batched = _dataloader_rate(rows, config, k, batched_matching=True)
            label = f"{k} worker{'s' if k > 1 else ''}"
            rows_out.append((f"training samples, {label} (img/s)", ours, per_sample, 1.0))
            rows_out.append((f"  same, DataLoader given our batched matching, {label}", ours, batched, None))
        share, rate = _wait_fraction(rows, cfg, steps=10 if quick else 40)
        rows_out.append(("tiny training, share of time waiting for data (%)", 100 * share, None, 5.0))
        rows_out.append(("  tiny training rate while fed, 1 thread (img/s)", rate, None, None))
    ray.shutdown()
    return rows_out


def format_table(rows: list[tuple]) -> str:
    lines = ["| benchmark | rayssd | DataLoader | ratio | goal | met |", "|---|---|---|---|---|---|"]
    for name, ours, theirs, goal in rows:
        if theirs is not None and goal is None:
            lines.append(f"| {name} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x | reference | - |")
        elif theirs is not None:
            ratio = ours / theirs
            met = "yes" if ratio >= goal else "NO"
            lines.append(f"| {name} | {ours:.1f} | {theirs:.1f} | {ratio:.2f}x | >= {goal:g}x | {met} |")
        elif goal is not None:
            lines.append(f"| {name} | {ours:.1f} | - | - | <= {goal:g} | {'yes' if ours <= goal else 'NO'} |")
        else:
            lines.append(f"| {name} | {ours:.1f} | - | - | - | - |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=1024, help="training images per pass (default: 1024)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 256 images, fewer steps")
    parser.add_argument("--markdown", help="also write the table to this Markdown file")
    args = parser.parse_args()
    images = 256 if args.quick else args.images
    table = format_table(run(images, args.quick))
    header = f"machine: {machine()}; {images} built-in images, preset tiny"
    publish(header, table, args.markdown)


if __name__ == "__main__":
    main()
