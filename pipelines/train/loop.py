"""The Ray Train worker loop: train an epoch, evaluate, report and checkpoint, log.

Runs in every training worker of a `TorchTrainer` (`jobs/train.py` builds it). Samples
arrive ready-made from the Ray Data pipeline (`pipelines.data.samples`) through
`ray.train.get_dataset_shard`, so a step is only the network's work: `ssd.step.TrainStep`,
the same step the demo, the tests and the benchmarks run. The Ray calls are the few marked
ones: `prepare_model` (device + DDP), `get_dataset_shard`, `get_checkpoint`, `report`.

Each epoch ends with one `ray.train.report` carrying the epoch's metrics (averaged over
all ranks) and a checkpoint written by rank 0 (`ssd.checkpoint`: model, optimiser, step,
epoch, full config). After a failure Ray Train restarts the workers and
`get_checkpoint()` returns the last reported checkpoint, so the loop continues with the
next epoch: an epoch is either reported whole or not at all, never twice.

Evaluation (every ``train.eval_every`` epochs and after the last) is
`pipelines.train.evaluation`; rank 0 alone logs to MLflow and posts progress.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist

from pipelines.common import keep_freed_memory
from pipelines.train.evaluation import distributed, evaluate, sync_buffers
from pipelines.train.progress import BoardClient
from ssd import checkpoint as ckpt_io
from ssd import config as C
from ssd import layout
from ssd.model import build_ssd
from ssd.optim import build_optimizer
from ssd.step import TrainStep

log = logging.getLogger(__name__)

PROGRESS_EVERY_STEPS = 5
CUDA_PROGRESS_EVERY_STEPS = 50  # a progress line reads the losses back: a host sync on a GPU
PLACEMENT_GROUP_KEY = "placement_group"  # in rank 0's reports when `report_placement_group`


@dataclasses.dataclass(frozen=True)
class Tracking:
    """The MLflow run rank 0 logs to."""

    uri: str
    experiment: str
    run_id: str


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """Everything a worker needs, decided on the driver (`jobs/train.py`)."""

    cfg: C.Config
    dataset: dict[str, Any]  # `DatasetInfo.to_dict()` plus ``num_train``
    steps_per_epoch: int  # per rank; see `steps_per_epoch`
    val_ground_truth: Any  # the val split's COCO dict, or an ObjectRef to it
    threads: int = 1  # torch threads per worker
    clock: str | None = None  # `EpochClock` actor that seeds augmentation by epoch
    board: str | None = None  # `ProgressBoard` actor for live progress
    tracking: Tracking | None = None
    stop_after_epochs: int | None = None  # end this session early; the run stays resumable
    param_digests: bool = False  # post a digest of the parameters per epoch (tests of DDP sync)
    # rank 0's reports name the workers' placement group (PLACEMENT_GROUP_KEY): a Tune trial's
    # run is stopped by killing it, and `rayssd tune` frees the group it leaves behind
    report_placement_group: bool = False
    # ground truth of the fit set (the first training images, ``fit_<rank>`` shards): after
    # the last epoch the model is scored on them too (``fit_map``, ``fit_map50``)
    fit_ground_truth: Any = None
    download_weights: bool = False  # a worker may download model.backbone_weights=imagenet


@dataclasses.dataclass
class _Worker:
    """One rank's training state."""

    settings: LoopSettings
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module  # as Ray prepared it (DDP when world > 1)
    bare: torch.nn.Module  # the SSD itself, for checkpoints and evaluation
    optimizer: torch.optim.Optimizer
    step: TrainStep
    board: BoardClient
    tracker: Any  # `pipelines.track.tracker.Tracker` on rank 0 when tracking, else None
    start_epoch: int = 0
    best_map: float = float("-inf")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config["settings"]`` is a `LoopSettings`. (Ray Train hands
    the loop the dict given as `train_loop_config`.)"""
    import ray.train

    s: LoopSettings = config["settings"]
    w = _start(s)
    t = s.cfg.train
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard(f"val_{w.rank}")
    fit_shard = ray.train.get_dataset_shard(f"fit_{w.rank}") if s.fit_ground_truth is not None else None
    for epoch in range(w.start_epoch, t.epochs):
        _set_clock(s.clock, epoch)
        metrics = _epoch_metrics(_train_epoch(w, train_shard, epoch), epoch, w.optimizer, w.device)
        sync_buffers(w.bare)
        evaluated, pictures = (epoch + 1) % t.eval_every == 0 or epoch + 1 == t.epochs, None
        if evaluated:
            pictures = _evaluate_epoch(w, val_shard, epoch, metrics)
        if fit_shard is not None and epoch + 1 == t.epochs:
            _evaluate_fit(w, fit_shard, metrics)
        if w.best_map > float("-inf"):
            metrics["best_map"] = w.best_map
        if s.param_digests:
            w.board.digest(epoch + 1, w.rank, w.bare)
        _report(w, metrics, epoch + 1)
        if w.rank == 0:
            _log_epoch(w, metrics, epoch + 1, evaluated, pictures)
        if s.stop_after_epochs and epoch + 1 - w.start_epoch >= s.stop_after_epochs and epoch + 1 < t.epochs:
            if w.rank == 0:
                w.board.event(f"stopping after epoch {epoch + 1} as asked; continue with --resume")
            break


def _start(s: LoopSettings) -> _Worker:
    """Model on its device (DDP), optimiser, and the last checkpoint's state if Ray restored one."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(s.threads)
    keep_freed_memory()  # activations and targets are MBs per step: reuse, don't page-fault anew
    t = s.cfg.train
    torch.manual_seed(t.seed)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    device = ray.train.torch.get_device()
    if s.download_weights:  # on a node whose torch cache lacks model.backbone_weights=imagenet
        from ssd.pretrained import DOWNLOAD_ENV

        os.environ[DOWNLOAD_ENV] = "1"
    model = build_ssd(s.cfg)
    channels_last = _agreed_layout(model, s.cfg, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)  # device + DistributedDataParallel (gloo / NCCL)
    bare = model.module if hasattr(model, "module") else model
    optimizer = build_optimizer(bare, t)
    start_epoch, step, best_map, restored = 0, 0, float("-inf"), None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = ckpt_io.load(directory)
        bare.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step, restored = state["epoch"], state["step"], state["metrics"]
        best_map = restored.get("best_map", best_map)
    trainer = TrainStep(
        model,
        optimizer,
        t,
        total_steps=t.epochs * s.steps_per_epoch,
        steps_per_epoch=s.steps_per_epoch,
        step=step,
        device=device,
        channels_last=channels_last,
    )
    board = BoardClient(s.board)
    tracker = _tracker(s.tracking) if rank == 0 else None
    board.register(rank, world, start_epoch)
    if rank == 0 and s.cfg.model.memory_format == "auto" and device.type == "cpu":
        chosen = "channels-last" if channels_last else "contiguous"
        board.event(f"memory layout: {chosen} (measured faster here; model.memory_format overrides)")
    if rank == 0 and restored is not None:
        board.event(f"restored from the checkpoint of epoch {start_epoch} (step {step})")
        if tracker is not None:
            _relog_if_missing(tracker, restored, start_epoch)
    return _Worker(
        s, rank, world, device, model, bare, optimizer, trainer, board, tracker, start_epoch, best_map
    )


def _agreed_layout(model: torch.nn.Module, cfg: C.Config, device: torch.device) -> bool:
    """Channels-last or not (`ssd.layout`), the same on every rank: DDP averages gradients
    element by element in memory order, so all ranks must lay weights out alike.
    Channels-last only where every rank found it faster."""
    chosen = layout.channels_last(model, cfg, batch=cfg.train.batch_size, training=True, device=device)
    if dist.is_available() and dist.is_initialized():
        flag = torch.tensor([int(chosen)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        chosen = bool(flag.item())
    return chosen


def _train_epoch(w: _Worker, shard: Any, epoch: int) -> dict[str, float]:
    """One pass over this rank's shard; returns summed statistics."""
    t = w.settings.cfg.train
    cuda = w.device.type == "cuda"
    w.model.train()
    sums = dict.fromkeys(("loss", "cls", "loc", "num_pos", "images", "steps", "wait_s", "seconds"), 0.0)
    start = waited_from = time.perf_counter()
    batches = shard.iter_torch_batches(
        batch_size=t.batch_size,
        drop_last=True,
        device=w.device,
        pin_memory=cuda,
        prefetch_batches=2,
    )
    # loss, cls, loc (summed per image) and positives stay on the device: reading them back
    # is a host sync, done only for a progress line (every `every` steps) and at the end
    on_device = torch.zeros(4, dtype=torch.float64, device=w.device)
    every = CUDA_PROGRESS_EVERY_STEPS if cuda else PROGRESS_EVERY_STEPS
    try:
        for in_epoch, batch in enumerate(batches, start=1):
            sums["wait_s"] += time.perf_counter() - waited_from
            losses = w.step(batch["image"], batch["cls_targets"], batch["loc_targets"])
            n = batch["image"].shape[0]
            parts = [losses["loss"] * n, losses["cls"] * n, losses["loc"] * n, losses["num_pos"]]
            on_device += torch.stack([part.to(torch.float64) for part in parts])
            sums["images"] += n
            sums["steps"] += 1
            if w.rank == 0 and (in_epoch % every == 0 or in_epoch == 1):
                w.board.post(_step_snapshot(w, {**sums, **_read(on_device)}, start, epoch, in_epoch))
            waited_from = time.perf_counter()
        w.step.check()  # the steps since the last finiteness check
    except FloatingPointError as exc:
        raise FloatingPointError(f"{exc} (epoch {epoch + 1})") from None
    sums.update(_read(on_device))
    sums["seconds"] = time.perf_counter() - start
    return sums


def _read(on_device: torch.Tensor) -> dict[str, float]:
    loss, cls, loc, num_pos = on_device.tolist()  # one host sync
    return {"loss": loss, "cls": cls, "loc": loc, "num_pos": num_pos}


def _step_snapshot(w: _Worker, sums: dict[str, float], start: float, epoch: int, in_epoch: int) -> dict:
    s, step = w.settings, w.step.step
    total = s.cfg.train.epochs * s.steps_per_epoch
    elapsed = time.perf_counter() - start
    per_step = elapsed / in_epoch  # this epoch's pace: the first epoch's warm-up does not linger
    images = max(sums["images"], 1.0)
    return {
        "phase": "train",
        "epoch": epoch + 1,
        "epochs": s.cfg.train.epochs,
        "step_in_epoch": in_epoch,
        "steps_per_epoch": s.steps_per_epoch,
        "step": step,
        "loss": sums["loss"] / images,
        "cls_loss": sums["cls"] / images,
        "loc_loss": sums["loc"] / images,
        "images_per_s": sums["images"] * w.world / max(elapsed, 1e-9),  # all ranks, from this one
        "lr": float(w.optimizer.param_groups[0]["lr"]),
        "eta_s": per_step * (total - step),
    }


def _epoch_metrics(
    sums: dict[str, float], epoch: int, optimizer: torch.optim.Optimizer, device: torch.device
) -> dict[str, float]:
    """Averages over every rank: per-image losses, global images/s, positives per image.
    (On `device`: NCCL all-reduces only CUDA tensors.)"""
    keys = ("loss", "cls", "loc", "num_pos", "images", "steps", "wait_s")
    totals = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    seconds = torch.tensor([sums["seconds"]], dtype=torch.float64, device=device)
    world = 1
    if distributed():
        dist.all_reduce(totals)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # the epoch lasts as long as its slowest rank
        world = dist.get_world_size()
    total = dict(zip(keys, totals.tolist()))
    if total["images"] == 0:
        raise RuntimeError(
            f"epoch {epoch + 1} saw no complete batch: each worker needs at least train.batch_size "
            "training images; use fewer workers or a smaller train.batch_size"
        )
    images = total["images"]
    return {
        "epoch": float(epoch + 1),
        "loss": total["loss"] / images,
        "cls_loss": total["cls"] / images,
        "loc_loss": total["loc"] / images,
        "positives_per_image": total["num_pos"] / images,
        "images_per_s": images / max(seconds.item(), 1e-9),
        "data_wait_share": total["wait_s"] / max(seconds.item() * world, 1e-9),
        "lr": float(optimizer.param_groups[0]["lr"]),
        "epoch_seconds": seconds.item(),
    }


def _evaluate_epoch(w: _Worker, shard: Any, epoch: int, metrics: dict[str, float]) -> dict | None:
    """COCO mAP of the val split into `metrics` (rank 0); returns rank 0's pictures."""
    s = w.settings
    if w.rank == 0:
        w.board.post({"phase": "eval", "epoch": epoch + 1, "epochs": s.cfg.train.epochs, "eta_s": None})
    label_to_cat = {i + 1: int(c) for i, c in enumerate(s.dataset["category_ids"])}
    coco, pictures = evaluate(
        w.bare, s.cfg, shard, w.device, s.val_ground_truth, label_to_cat, w.rank, w.world
    )
    if w.rank == 0:
        from pipelines.track.registry import class_metrics

        metrics.update({k: v for k, v in coco.items() if isinstance(v, float)})
        metrics.update(class_metrics(coco.get("per_class", {})))  # ap.<class>, for the champion gate
        w.best_map = max(w.best_map, metrics["map"])
    return pictures


def _evaluate_fit(w: _Worker, shard: Any, metrics: dict[str, float]) -> None:
    """COCO mAP of the fit set (training images, unaugmented) into `metrics` (rank 0):
    ``fit_map`` and ``fit_map50``, whether the model fits the data it trained on."""
    s = w.settings
    label_to_cat = {i + 1: int(c) for i, c in enumerate(s.dataset["category_ids"])}
    coco, _ = evaluate(w.bare, s.cfg, shard, w.device, s.fit_ground_truth, label_to_cat, w.rank, w.world)
    if w.rank == 0:
        metrics["fit_map"], metrics["fit_map50"] = float(coco["map"]), float(coco["map50"])


def _report(w: _Worker, metrics: dict[str, float], epoch: int) -> None:
    """One report per epoch on every rank (a barrier); rank 0 attaches the checkpoint."""
    import ray.train
    import ray.util

    if w.rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    state = ckpt_io.make_checkpoint(
        w.bare,
        w.settings.cfg,
        w.settings.dataset,
        epoch=epoch,
        step=w.step.step,
        optimizer=w.optimizer,
        metrics=metrics,
    )
    reported = dict(metrics)
    if w.settings.report_placement_group:
        group = ray.util.get_current_placement_group()
        if group is not None:
            reported[PLACEMENT_GROUP_KEY] = group.id.hex()
    with tempfile.TemporaryDirectory(prefix="rayssd-ckpt-") as directory:
        ckpt_io.save(state, directory)
        ray.train.report(
            reported,
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=f"epoch_{epoch:04d}",
        )


def _log_epoch(w: _Worker, metrics: dict[str, float], epoch: int, evaluated: bool, pictures) -> None:
    """Rank 0: MLflow metrics, pictures and the best checkpoint; the progress board's line."""
    if w.tracker is not None:
        w.tracker.log_metrics(metrics, step=epoch)
        if evaluated and pictures is not None:
            _log_pictures(w, epoch, pictures)
        if evaluated and metrics["map"] >= w.best_map:
            _log_best(w, epoch, metrics)
    w.board.record_epoch(metrics)
    w.board.event(_epoch_line(metrics, epoch, w.settings.cfg.train.epochs))


def _log_pictures(w: _Worker, epoch: int, pictures: dict[str, Any]) -> None:
    from pipelines.track import pictures as pics

    names = w.settings.dataset["class_names"]
    grid = pics.detection_grid(pictures["images"], pictures["detections"], pictures["truth"], names)
    w.tracker.log_image(grid, f"pictures/val_epoch_{epoch:03d}.png")
    if epoch == w.settings.cfg.train.epochs and pictures.get("pr_curves"):
        figure = pics.precision_recall_figure(
            pictures["pr_curves"], title=f"precision-recall @0.5, epoch {epoch}"
        )
        w.tracker.log_figure(figure, "pictures/precision_recall.png")


def _log_best(w: _Worker, epoch: int, metrics: dict[str, float]) -> None:
    """The best model so far (by val mAP), as an inference checkpoint artifact."""
    s = w.settings
    state = ckpt_io.make_checkpoint(w.bare, s.cfg, s.dataset, epoch=epoch, step=w.step.step, metrics=metrics)
    with tempfile.TemporaryDirectory(prefix="rayssd-best-") as directory:
        w.tracker.log_artifact(str(ckpt_io.save(state, directory)), "checkpoints/best")
    w.tracker.set_tags({"rayssd.best_epoch": str(epoch), "rayssd.best_map": f"{metrics['map']:.4f}"})


def _relog_if_missing(tracker, metrics: dict[str, float], epoch: int) -> None:
    """A worker can die after a checkpoint was reported and before rank 0 logged that
    epoch; the restored checkpoint carries the epoch's metrics, so log them now if absent."""
    try:
        from mlflow.tracking import MlflowClient

        history = MlflowClient(tracker.uri).get_metric_history(tracker.run_id, "loss")
        if any(m.step == epoch for m in history):
            return
    except Exception as exc:  # the tracker is best effort; it warns on its own failures
        log.warning("could not read back MLflow metrics after a restore: %s", exc)
        return
    tracker.log_metrics(metrics, step=epoch)


def _epoch_line(metrics: dict[str, float], epoch: int, epochs: int) -> str:
    text = (
        f"epoch {epoch}/{epochs}: loss {metrics['loss']:.3f} (cls {metrics['cls_loss']:.3f}, "
        f"loc {metrics['loc_loss']:.3f}), {metrics['images_per_s']:.0f} img/s, "
        f"{metrics['positives_per_image']:.1f} positives/image"
    )
    if "map" in metrics:
        text += f", val mAP {metrics['map']:.3f} mAP@0.5 {metrics['map50']:.3f}"
    return text


def _set_clock(name: str | None, epoch: int) -> None:
    """Tell the data workers which epoch to augment for (every rank, before the epoch runs)."""
    if not name:
        return
    import ray

    from pipelines.common import ACTOR_NAMESPACE

    ray.get(ray.get_actor(name, namespace=ACTOR_NAMESPACE).set.remote(epoch))


def _tracker(tracking: Tracking | None):
    if tracking is None:
        return None
    from pipelines.track.tracker import Tracker

    tracker = Tracker.start(uri=tracking.uri, experiment=tracking.experiment, run_id=tracking.run_id)
    return tracker if tracker.enabled else None


def steps_per_epoch(num_images: int, workers: int, batch_size: int) -> int:
    """Optimiser steps per epoch on each rank: the split gives every rank
    ``num_images // workers`` rows, and incomplete batches are dropped."""
    return (num_images // workers) // batch_size


def check_enough_images(num_images: int, workers: int, batch_size: int) -> None:
    if steps_per_epoch(num_images, workers, batch_size) < 1:
        need = workers * batch_size
        raise ValueError(
            f"{num_images} training images are too few for {workers} workers x train.batch_size="
            f"{batch_size}: every worker needs a full batch (>= {need} images); lower --workers or "
            "train.batch_size"
        )
