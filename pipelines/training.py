"""The Ray Train worker loop: forward, multibox loss, backward; report, checkpoint, evaluate.

Runs in every training worker of a `TorchTrainer` (`jobs/train.py` builds it). Samples
arrive ready-made from the Ray Data pipeline (`pipelines.preprocess`) through
`ray.train.get_dataset_shard`, so a step is only the network's work. The Ray calls are
the few marked ones: `prepare_model` (device + DDP), `get_dataset_shard`, `get_checkpoint`,
`report`.

Each epoch ends with one `ray.train.report` carrying the epoch's metrics (averaged over
all ranks) and a checkpoint written by rank 0 (`ssd.checkpoint`: model, optimiser, step,
epoch, full config). After a failure Ray Train restarts the workers and
`get_checkpoint()` returns the last reported checkpoint, so the loop continues with the
next epoch: an epoch is either reported whole or not at all, never twice.

Evaluation (every ``train.eval_every`` epochs and after the last) streams: each rank runs
the detector over its own part of the val split (``val_<rank>``), the detections are
gathered on rank 0, and rank 0 alone runs pycocotools. Rank 0 also logs to MLflow.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipelines.memory import keep_freed_memory
from ssd import checkpoint as ckpt_io
from ssd import config as C
from ssd.detector import Detector
from ssd.evaluate import CocoEvaluator, to_coco_results
from ssd.loss import multibox_loss
from ssd.model import build_ssd
from ssd.optim import build_optimizer, learning_rate, set_learning_rate

log = logging.getLogger(__name__)

PROGRESS_EVERY_STEPS = 5
PICTURE_IMAGES = 8


def train_loop_per_worker(settings: dict[str, Any]) -> None:
    """Ray Train entry point; `settings` is built by `jobs.train.loop_settings`."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(int(settings.get("threads", 1)))
    keep_freed_memory()  # activations and targets are MBs per step: reuse, don't page-fault anew
    cfg = C.from_dict(settings["config"])
    t = cfg.train
    torch.manual_seed(t.seed)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    device = ray.train.torch.get_device()
    cuda = device.type == "cuda"

    model = build_ssd(cfg)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)  # device + DistributedDataParallel (gloo / NCCL)
    bare = model.module if hasattr(model, "module") else model
    optimizer = build_optimizer(bare, t)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)

    start_epoch, step, best_map, restored_metrics = 0, 0, float("-inf"), None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = ckpt_io.load(directory)
        bare.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step = state["epoch"], state["step"]
        restored_metrics = state["metrics"]
        best_map = restored_metrics.get("best_map", best_map)

    board = _board(settings.get("board"))
    clock = _clock(settings["clock"])
    tracker = _tracker(settings.get("tracking")) if rank == 0 else None
    _register(board, rank, world, start_epoch)
    if rank == 0 and restored_metrics is not None:
        _event(board, f"restored from the checkpoint of epoch {start_epoch} (step {step})")
        if tracker is not None:
            _relog_if_missing(tracker, restored_metrics, start_epoch)

    steps_per_epoch = int(settings["steps_per_epoch"])
    total_steps = t.epochs * steps_per_epoch
    run_start, steps_at_start = time.perf_counter(), step
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard(f"val_{rank}")
    ground_truth = settings.get("val_ground_truth")
    label_to_cat = {i + 1: int(c) for i, c in enumerate(settings["dataset"]["category_ids"])}

    for epoch in range(start_epoch, t.epochs):
        if clock is not None:
            import ray

            ray.get(clock.set.remote(epoch))  # every rank, before the pipeline runs this epoch
        model.train()
        sums, step = _train_epoch(
            model,
            optimizer,
            scaler,
            train_shard,
            cfg,
            device,
            epoch,
            step,
            total_steps,
            steps_per_epoch,
            board if rank == 0 else None,
            (run_start, steps_at_start),
        )
        metrics = _epoch_metrics(sums, epoch, optimizer)
        _sync_buffers(bare)
        evaluate = (epoch + 1) % t.eval_every == 0 or epoch + 1 == t.epochs
        pictures = None
        if evaluate:
            if rank == 0:
                _post(board, {"phase": "eval", "epoch": epoch + 1, "epochs": t.epochs, "eta_s": None})
            coco, pictures = _evaluate(bare, cfg, val_shard, device, ground_truth, label_to_cat, rank, world)
            if rank == 0:
                metrics.update({k: v for k, v in coco.items() if isinstance(v, float)})
                best_map = max(best_map, metrics["map"])
        if best_map > float("-inf"):
            metrics["best_map"] = best_map
        _digest(board, epoch + 1, rank, bare)
        _report(metrics, bare, optimizer, cfg, settings["dataset"], epoch + 1, step, rank)
        if tracker is not None:
            _log_epoch(tracker, metrics, epoch + 1, evaluate, pictures, settings)
            if evaluate and metrics["map"] >= best_map:
                _log_best(tracker, bare, cfg, settings["dataset"], epoch + 1, step, metrics)
        if rank == 0 and board is not None:
            board.record_epoch.remote({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            _event(board, _epoch_line(metrics, epoch + 1, t.epochs))
        stop_after = settings.get("stop_after_epochs")
        if stop_after is not None and epoch + 1 - start_epoch >= stop_after and epoch + 1 < t.epochs:
            if rank == 0:
                _event(board, f"stopping after epoch {epoch + 1} as asked; continue with --resume")
            break


def _train_epoch(
    model,
    optimizer,
    scaler,
    shard,
    cfg: C.Config,
    device,
    epoch: int,
    step: int,
    total_steps: int,
    steps_per_epoch: int,
    board,
    run_clock: tuple[float, int],
) -> tuple[dict[str, float], int]:
    """One pass over this rank's shard; returns summed statistics and the next global step."""
    t = cfg.train
    cuda = device.type == "cuda"
    sums = dict.fromkeys(("loss", "cls", "loc", "num_pos", "images", "steps", "wait_s", "seconds"), 0.0)
    start = time.perf_counter()
    waited_from = start
    batches = shard.iter_torch_batches(
        batch_size=t.batch_size, drop_last=True, device=device, pin_memory=cuda, prefetch_batches=2
    )
    for in_epoch, batch in enumerate(batches, start=1):
        sums["wait_s"] += time.perf_counter() - waited_from
        lr = learning_rate(t, step, total_steps, steps_per_epoch)
        set_learning_rate(optimizer, lr)
        images = batch["image"]
        if cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, enabled=cuda):
            cls_logits, loc_preds = model(images)
        losses = multibox_loss(
            cls_logits.float(),
            loc_preds.float(),
            batch["cls_targets"].long(),
            batch["loc_targets"],
            neg_pos_ratio=t.neg_pos_ratio,
            alpha=t.loc_weight,
        )
        if not torch.isfinite(losses["loss"]):
            raise FloatingPointError(
                f"non-finite loss ({float(losses['loss'])}) at step {step + 1}, epoch {epoch + 1}: "
                "lower train.lr or set train.grad_clip_norm"
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses["loss"]).backward()
        if t.grad_clip_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()
        step += 1
        n = images.shape[0]
        for key, value in (("loss", losses["loss"]), ("cls", losses["cls"]), ("loc", losses["loc"])):
            sums[key] += float(value) * n
        sums["num_pos"] += float(losses["num_pos"])
        sums["images"] += n
        sums["steps"] += 1
        if board is not None and (in_epoch % PROGRESS_EVERY_STEPS == 0 or in_epoch == 1):
            _post_step(
                board, sums, start, epoch, in_epoch, steps_per_epoch, step, total_steps, lr, t, run_clock
            )
        waited_from = time.perf_counter()
    sums["seconds"] = time.perf_counter() - start
    return sums, step


def _post_step(
    board, sums, start, epoch, in_epoch, steps_per_epoch, step, total_steps, lr, t, run_clock
) -> None:
    elapsed = time.perf_counter() - start
    run_start, steps_at_start = run_clock
    per_step = (time.perf_counter() - run_start) / max(1, step - steps_at_start)
    images = max(sums["images"], 1.0)
    _post(
        board,
        {
            "phase": "train",
            "epoch": epoch + 1,
            "epochs": t.epochs,
            "step_in_epoch": in_epoch,
            "steps_per_epoch": steps_per_epoch,
            "step": step,
            "loss": sums["loss"] / images,
            "cls_loss": sums["cls"] / images,
            "loc_loss": sums["loc"] / images,
            "images_per_s": sums["images"] * dist_world() / max(elapsed, 1e-9),  # all ranks, from this one
            "lr": lr,
            "eta_s": per_step * (total_steps - step),
        },
    )


def _epoch_metrics(sums: dict[str, float], epoch: int, optimizer) -> dict[str, float]:
    """Averages over every rank: per-image losses, global images/s, positives per image."""
    keys = ("loss", "cls", "loc", "num_pos", "images", "steps", "wait_s")
    totals = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
    seconds = torch.tensor([sums["seconds"]], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # the epoch lasts as long as its slowest rank
    total = dict(zip(keys, totals.tolist()))
    images = max(total["images"], 1.0)
    if total["images"] == 0:
        raise RuntimeError(
            f"epoch {epoch + 1} saw no complete batch: each worker needs at least train.batch_size "
            "training images; use fewer workers or a smaller train.batch_size"
        )
    return {
        "epoch": float(epoch + 1),
        "loss": total["loss"] / images,
        "cls_loss": total["cls"] / images,
        "loc_loss": total["loc"] / images,
        "positives_per_image": total["num_pos"] / images,
        "images_per_s": total["images"] / max(seconds.item(), 1e-9),
        "data_wait_share": total["wait_s"] / max(seconds.item() * dist_world(), 1e-9),
        "lr": float(optimizer.param_groups[0]["lr"]),
        "epoch_seconds": seconds.item(),
    }


def dist_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _evaluate(model, cfg, shard, device, ground_truth, label_to_cat, rank: int, world: int):
    """This rank's detections on its val part, gathered to rank 0, which returns the COCO
    summary (other ranks: {}), plus a few images with predictions and targets for pictures."""
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


def _picture_batch(batch, detector: Detector) -> dict[str, Any]:
    """The first few network-input images with their detections, in network-input pixels."""
    k = min(PICTURE_IMAGES, batch["image"].shape[0])
    images = batch["image"][:k].cpu()
    s = images.shape[-1]
    return {
        "images": images.numpy(),
        "detections": detector(images, [(s, s)] * k, score_threshold=0.3, max_detections=50),
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


def _report(metrics, model, optimizer, cfg, dataset, epoch: int, step: int, rank: int) -> None:
    """One report per epoch on every rank (a barrier); rank 0 attaches the checkpoint."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    state = ckpt_io.make_checkpoint(
        model, cfg, dataset, epoch=epoch, step=step, optimizer=optimizer, metrics=metrics
    )
    with tempfile.TemporaryDirectory(prefix="rayssd-ckpt-") as directory:
        ckpt_io.save(state, directory)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=f"epoch_{epoch:04d}",
        )


def _sync_buffers(model) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank. DDP broadcasts
    them before each forward, so after the last forward of an epoch each rank holds the
    statistics of its own last batch; evaluation on every rank must use the same model."""
    if dist.is_available() and dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def _digest(board, epoch: int, rank: int, model) -> None:
    """sha256 of every parameter's bytes: equal on all ranks when DDP keeps them in sync."""
    if board is None:
        return
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    board.digest.remote(epoch, rank, h.hexdigest()[:16])


def _log_epoch(tracker, metrics, epoch: int, evaluated: bool, pictures, settings) -> None:
    tracker.log_metrics(metrics, step=epoch)
    if not evaluated or pictures is None:
        return
    from pipelines import pictures as pics

    names = settings["dataset"]["class_names"]
    grid = pics.detection_grid(pictures["images"], pictures["detections"], pictures["truth"], names)
    tracker.log_image(grid, f"pictures/val_epoch_{epoch:03d}.png")
    if epoch == int(settings["config"]["train"]["epochs"]) and pictures.get("pr_curves"):
        figure = pics.precision_recall_figure(
            pictures["pr_curves"], title=f"precision-recall @0.5, epoch {epoch}"
        )
        tracker.log_figure(figure, "pictures/precision_recall.png")


def _log_best(tracker, model, cfg, dataset, epoch: int, step: int, metrics) -> None:
    """The best model so far (by val mAP), as an inference checkpoint artifact."""
    state = ckpt_io.make_checkpoint(model, cfg, dataset, epoch=epoch, step=step, metrics=metrics)
    with tempfile.TemporaryDirectory(prefix="rayssd-best-") as directory:
        tracker.log_artifact(str(ckpt_io.save(state, directory)), "checkpoints/best")
    tracker.set_tags({"rayssd.best_epoch": str(epoch), "rayssd.best_map": f"{metrics['map']:.4f}"})


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


# --- small Ray helpers (all optional: progress and tracking never stop training) -------------


def _board(name: str | None):
    from pipelines.progress import board_handle

    return board_handle(name)


def _clock(name: str | None):
    if not name:
        return None
    import ray

    from pipelines.preprocess import ACTOR_NAMESPACE

    return ray.get_actor(name, namespace=ACTOR_NAMESPACE)


def _tracker(tracking: dict[str, Any] | None):
    if not tracking or not tracking.get("run_id"):
        return None
    from pipelines.tracking import Tracker

    tracker = Tracker.start(uri=tracking["uri"], experiment=tracking["experiment"], run_id=tracking["run_id"])
    return tracker if tracker.enabled else None


def _post(board, snapshot: dict[str, Any]) -> None:
    if board is not None:
        board.post.remote(snapshot)


def _event(board, message: str) -> None:
    if board is not None:
        board.event.remote({"message": message})


def _register(board, rank: int, world: int, start_epoch: int) -> None:
    if board is None:
        return
    import ray

    board.register.remote(
        rank,
        {
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "hostname": os.uname().nodename,
            "world_size": world,
            "start_epoch": start_epoch,
        },
    )


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
