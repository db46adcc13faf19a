"""`rayssd train`'s orchestration: plan before Ray starts, then data, tracking, Ray Train, registry.

`plan` checks everything that needs no cluster (config values, the data sources — parsed
once here and kept —, the run directory, workers against this machine's CPUs) and raises
ValueError naming what is wrong; `run` starts Ray, builds the data (`pipelines.train.datasets`),
starts the MLflow run, runs the `TorchTrainer` over `pipelines.train.loop`, and registers
the final model. `jobs/train.py` only turns arguments into `TrainOptions`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipelines.common import JobError
from pipelines.data.sources import Location
from ssd import config as C

RUN_FILE = "rayssd_run.json"  # in STORAGE/NAME: the MLflow run id and the config, for --resume
DATA_RESERVE_CPUS = 0.5  # kept free for the data pipeline when training shares a small machine


class TrainRunError(JobError):
    """The workers failed beyond --max-failures; the message holds their error snippets."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says how to resume."""


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """What the user asked for (`rayssd train`'s options, typed)."""

    data: str  # a COCO file, VOC root or prepared samples (path or URI)
    cfg: C.Config  # preset + config file + overrides (a resumed run uses its own)
    val_data: str | None = None
    config_given: bool = False  # a config file or overrides were given (refused with resume)
    workers: int | None = None  # default: train.num_workers
    gpus_per_worker: float = 0.0
    cpus_per_worker: float | None = None  # None: decided from the cluster's CPUs
    name: str | None = None  # default: PRESET-YYYYmmdd-HHMMSS
    storage: str = "rayssd-runs"
    resume: bool = False
    stop_after_epochs: int | None = None
    max_failures: int = 3
    keep_checkpoints: int = 2  # 0: all
    experiment: str = "rayssd"
    register_as: str | None = None  # default rayssd-PRESET; "none" skips
    max_class_drop: float = 0.05  # champion gate: the most a class's AP may fall (registry.champion_gate)
    placement: str = "PACK"
    address: str | None = None
    quiet: bool = False
    param_digests: bool = False
    # A trial of `rayssd tune` (`pipelines.train.tune`): its MLflow run is a child of the
    # search's, and each epoch's report also goes to Ray Tune (TuneReportCallback).
    parent_run_id: str | None = None
    report_to_tune: bool = False
    data_cpus: float | None = None  # CPUs per data task or actor; None: decided from the cluster
    # `rayssd train --sanity N`: fit the first N training images, unaugmented, and say whether
    # the model can (`pipelines.train.sanity`); nothing is registered
    sanity: int | None = None
    download_weights: bool = False  # model.backbone_weights=imagenet may be downloaded (`ssd.pretrained`)
    scratch_warning: bool = True  # say so when training from scratch on a small dataset
    # called on the driver with each progress snapshot (`pipelines.train.loop._step_snapshot`)
    on_progress: Callable[[dict[str, Any]], None] | None = None


@dataclasses.dataclass
class Plan:
    """What `run` will do, decided before Ray starts."""

    options: TrainOptions

    cfg: C.Config
    name: str
    storage: Location  # local folder or object storage (s3://, gs://, ...): Ray Train's storage path
    workers: int
    gpus_per_worker: float
    cpus_per_worker: float | None  # None: decided from the cluster's CPUs
    resume: bool
    run_id: str | None  # MLflow run to continue (resume)
    data: Any  # `pipelines.train.datasets.Source` of --data, looked at (parsed) once
    val_data: Any  # ... of --val-data, or None


# --- planning: every check that needs no cluster ---------------------------------------------


def plan(o: TrainOptions) -> Plan:
    """Validate everything that can be checked before Ray starts; raises ValueError."""
    from pipelines.train.datasets import open_training_source

    if not o.max_class_drop >= 0:
        raise ValueError(f"--max-class-drop {o.max_class_drop}: expected an AP difference >= 0")
    storage = storage_location(o.storage)
    resume = bool(o.resume)
    if o.sanity is not None and (resume or o.sanity < 1):
        raise ValueError("--sanity N needs N >= 1 images and a new run (not --resume)")
    if o.sanity is not None and o.val_data:
        raise ValueError("--sanity scores the model on the images it trained on; drop --val-data")
    if o.sanity is not None and o.cfg.train.steps:
        raise ValueError("--sanity trains its own 150 steps; drop train.steps")
    if resume and not o.name:
        raise ValueError("--resume needs --name: the run to continue")
    name = o.name or None
    run_file = storage.join(name, RUN_FILE) if name else None
    run_id = None
    if resume:
        if run_file is None or not run_file.is_file():
            where = run_file.uri if run_file is not None else RUN_FILE
            raise ValueError(f"no run {name!r} to resume in {storage.uri} (expected {where})")
        if o.config_given:
            raise ValueError("--resume continues a run with its own config; drop --set and --config")
        try:
            saved = json.loads(run_file.read_text())
            cfg = C.from_dict(saved["config"])
        except (KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{run_file.uri} is not a rayssd run record: {exc!r}") from exc
        if saved.get("finished"):
            raise ValueError(
                f"run {name!r} already finished all {cfg.train.epochs} epochs; nothing to resume"
            )
        if saved.get("val_data") != o.val_data:
            raise ValueError(
                f"run {name!r} was started with --val-data {saved.get('val_data')}; resume it with the same"
            )
        if o.workers is not None:
            cfg = C.override(cfg, [f"train.num_workers={o.workers}"])  # any worker count may resume
        run_id = saved.get("mlflow_run_id")
    else:
        cfg = o.cfg
        if o.workers is not None:
            cfg = C.override(cfg, [f"train.num_workers={o.workers}"])
        if o.sanity is not None:
            from pipelines.train.sanity import sanity_config

            cfg = sanity_config(cfg)
        if name and run_file is not None and run_file.exists():
            raise ValueError(
                f"run {name!r} already exists in {storage.uri}; pass --resume to continue it "
                "or choose another --name"
            )
        stem = f"{cfg.name}-sanity" if o.sanity is not None else cfg.name
        name = name or f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    workers = cfg.train.num_workers
    if o.gpus_per_worker < 0 or (o.cpus_per_worker is not None and o.cpus_per_worker <= 0):
        raise ValueError("--gpus-per-worker must be >= 0 and --cpus-per-worker > 0")
    if o.stop_after_epochs is not None and o.stop_after_epochs < 1:
        raise ValueError("--stop-after-epochs must be >= 1")
    if not o.address:
        _check_local_resources(workers, o.gpus_per_worker, o.cpus_per_worker)
    if cfg.model.backbone_weights is not None:
        from ssd.pretrained import resolve

        # here, before Ray starts: a missing file is one line now, and a download happens once
        resolve(cfg.model.backbone, cfg.model.backbone_weights, download=o.download_weights or None)
    data = open_training_source(o.data)
    val_data = open_training_source(o.val_data) if o.val_data else None
    if o.sanity is not None and data.prepared is not None:
        raise ValueError(
            f"--sanity trains on a source's own images (COCO, YOLO or VOC); {o.data} holds prepared "
            "samples: give the source they were prepared from"
        )
    for source in (data, val_data):
        if source is not None and source.prepared is not None:
            source.prepared.check(cfg, what=f"this run ({source.given})")  # another preset: refused now
    return Plan(
        o,
        cfg,
        name,
        storage,
        workers,
        o.gpus_per_worker,
        o.cpus_per_worker,
        resume,
        run_id,
        data,
        val_data,
    )


def _check_local_resources(workers: int, gpus: float, cpus: float | None) -> None:
    import torch

    have = os.cpu_count() or 1
    need = workers * (cpus or 1.0)
    if need > have:
        raise ValueError(
            f"train.num_workers={workers} needs {need:g} CPUs for training workers but this machine has "
            f"{have}; use --workers {have} or fewer (or --cpus-per-worker below 1)"
        )
    if gpus > 0 and torch.cuda.device_count() < workers * gpus:
        raise ValueError(
            f"--gpus-per-worker {gpus:g} x {workers} workers needs {workers * gpus:g} GPUs; "
            f"this machine has {torch.cuda.device_count()}"
        )


# --- running---------------------------------------------------------------------------------


def run(p: Plan) -> dict[str, Any]:
    """Train as planned; returns the outcome (metrics, epochs, checkpoint, registered model,
    history, workers). Raises TrainRunError when the workers failed beyond max_failures and
    Interrupted on Ctrl-C (both say how to resume)."""
    o = p.options
    import ray

    from pipelines.common import start_ray
    from pipelines.data.samples import start_epoch_clock
    from pipelines.train.datasets import training_data

    start_ray(o.address)
    check_storage_shared(p.storage)
    cpus, data_cpus, threads = _cpu_split(p, ray.cluster_resources())
    clock_name, board_name = _actor_names(p)
    _kill_named(clock_name, board_name)  # left by an earlier, interrupted session
    clock = start_epoch_clock(clock_name)  # keep the handle: Ray collects unreferenced actors
    try:
        if o.sanity is not None:
            from pipelines.train.datasets import sanity_data
            from pipelines.train.sanity import repeats

            data = sanity_data(
                p.data,
                p.cfg,
                images=o.sanity,
                repeats=lambda count: repeats(count, p.workers, p.cfg.train.batch_size),
                data_cpus=data_cpus,
            )
            print(
                f"sanity check: {data.num_fit} training images, unaugmented, repeated "
                f"{data.num_train // max(1, data.num_fit)}x per epoch for {p.cfg.train.epochs} epochs, "
                "scored on themselves",
                flush=True,
            )
        else:
            data = training_data(
                p.data, p.val_data, p.cfg, storage=p.storage, epoch_clock=clock_name, data_cpus=data_cpus
            )
        if not p.resume and data.cfg.train.steps > 0:
            data = dataclasses.replace(data, cfg=epochs_for_steps(data.cfg, data.num_train, p.workers))
        if p.resume and data.cfg != p.cfg:
            raise ValueError("the data's classes differ from those the run was started with")
        cfg = data.cfg
        tracker = _start_tracking(o, p, cfg, data)
    except BaseException:
        ray.kill(clock)
        raise
    run_id = tracker.run_id if tracker.enabled else p.run_id
    if o.sanity is None and not p.resume and o.scratch_warning:
        _warn_from_scratch(cfg, data.num_train)
    try:
        _write_run_file(p, cfg, run_id, o.val_data)
        result, board_state = _fit(o, p, data, tracker, clock, cpus, threads)
    except KeyboardInterrupt:
        tracker.end("KILLED")
        raise Interrupted(f"run {p.name} interrupted; continue it with --resume --name {p.name}") from None
    except BaseException:
        tracker.end("FAILED")
        raise
    out = _finish(o, p, cfg, result, tracker)
    if data.num_fit:
        from pipelines.train.sanity import anchor_coverage

        out["num_fit"], out["coverage"] = data.num_fit, anchor_coverage(data.fit_ground_truth, cfg)
    out["sanity"] = o.sanity
    if out.get("epochs_done", 0) >= cfg.train.epochs:
        _write_run_file(p, cfg, run_id, o.val_data, finished=True)
    out["history"] = board_state["epochs"]  # what rank 0 reported, in order (this session)
    out["samples_cached"] = data.prepared
    out["workers"] = {str(rank): info for rank, info in sorted(board_state["workers"].items())}
    out["param_digests"] = {
        str(e): {str(r): d for r, d in v.items()} for e, v in board_state["digests"].items()
    }
    return out


def epochs_for_steps(cfg: C.Config, images: int, workers: int) -> C.Config:
    """`cfg` with train.epochs set to the fewest epochs of `images` on `workers` that hold
    train.steps optimiser steps (said in a line: the run's record keeps the epochs)."""
    from pipelines.train.loop import steps_per_epoch

    t = cfg.train
    per_epoch = max(1, steps_per_epoch(images, workers, t.batch_size))
    epochs = max(1, -(-t.steps // per_epoch))
    print(
        f"train.steps={t.steps}: {images} images give {per_epoch} steps an epoch on {workers} "
        f"worker(s) of batch {t.batch_size}; training {epochs} epochs ({epochs * per_epoch} steps)",
        flush=True,
    )
    return C.override(cfg, [f"train.epochs={epochs}"])


SCRATCH_IMAGES = 3000  # fewer training images than this learn far more from a pretrained backbone


def _warn_from_scratch(cfg: C.Config, images: int) -> None:
    """Say what to do instead of training from scratch on a small dataset."""
    if cfg.model.backbone_weights is not None or images >= SCRATCH_IMAGES:
        return
    if cfg.model.backbone == "tiny":
        advice = (
            "tiny has no pretrained backbone: try --preset ssdlite320 --set model.backbone_weights=imagenet"
        )
    else:
        advice = "start from ImageNet features: --set model.backbone_weights=imagenet"
    print(
        f"warning: training {cfg.name} from scratch on {images} images; detectors trained on fewer than "
        f"a few thousand images learn far more from a pretrained backbone ({advice})",
        flush=True,
    )


def _cpu_split(p: Plan, resources: dict[str, float]) -> tuple[float, float, int]:
    """(CPUs per training worker, CPUs per data worker, torch threads per training worker)."""
    total = float(resources.get("CPU", 0))
    if p.cpus_per_worker is not None:
        cpus = p.cpus_per_worker
    elif total >= p.workers + 2:
        cpus = 1.0
    else:  # a laptop: leave the data pipeline a share instead of starving it
        cpus = max(0.25, min(1.0, (total - DATA_RESERVE_CPUS) / p.workers))
    if p.workers * cpus > total:
        raise ValueError(
            f"train.num_workers={p.workers} x {cpus:g} CPUs exceeds the cluster's {total:g} CPUs; "
            "use fewer --workers"
        )
    data_cpus = 1.0 if total - p.workers * cpus >= 2 else 0.25
    if p.options.data_cpus is not None:  # trials side by side: each its own small share
        data_cpus = p.options.data_cpus
    threads = max(1, int(cpus))
    if p.cpus_per_worker is None and total < p.workers + 2:
        # On a small machine the data pipeline runs ahead and then idles: let the workers'
        # threads cover the cores (one worker on two cores trains with two threads).
        threads = max(1, int(total // p.workers))
    return cpus, data_cpus, threads


def _start_tracking(o: TrainOptions, p: Plan, cfg: C.Config, data):
    from pipelines.track.tracker import Tracker, tracking_uri

    tags = {
        "rayssd.job": "tune-trial" if o.parent_run_id else ("sanity" if o.sanity is not None else "train"),
        "rayssd.preset": cfg.name,
        "rayssd.data": str(o.data),
        "rayssd.storage": p.storage.uri,
        **({"mlflow.parentRunId": o.parent_run_id} if o.parent_run_id else {}),
    }
    tracker = Tracker.start(
        uri=tracking_uri(), experiment=o.experiment, run_name=p.name, tags=tags, run_id=p.run_id
    )
    if tracker.enabled and not p.resume:
        info = data.info
        params = {
            **C.flatten(cfg),
            "run.workers": p.workers,
            "run.gpus_per_worker": p.gpus_per_worker,
            "data.source": o.data,
            "data.val_source": o.val_data or f"{o.data} (val split)",
            "data.train_images": data.num_train,
            "data.val_images": data.num_val,
            "data.prepared_samples": data.prepared,
        }
        if cfg.model.backbone_weights is not None:
            from ssd.pretrained import resolve

            params["model.backbone_weights_file"] = Path(
                resolve(cfg.model.backbone, cfg.model.backbone_weights, download=False)
            ).name
        tracker.log_params(params)
        tracker.log_text(C.to_yaml(cfg), "config.yaml")
        tracker.log_text(json.dumps(info.to_dict(), indent=2), "dataset.json")
    return tracker


def _write_run_file(
    p: Plan, cfg: C.Config, run_id: str | None, val_data: str | None, finished: bool = False
) -> None:
    record = {
        "name": p.name,
        "config": C.to_dict(cfg),
        "mlflow_run_id": run_id,
        "val_data": val_data,
        "finished": finished,
    }
    p.storage.join(p.name, RUN_FILE).write_text(json.dumps(record, indent=2))


def _fit(o: TrainOptions, p: Plan, data, tracker, clock, cpus: float, threads: int):
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.train.loop import (
        LoopSettings,
        Tracking,
        check_enough_images,
        steps_per_epoch,
        train_loop_per_worker,
    )
    from pipelines.train.progress import ProgressPrinter, start_board

    cfg, t = data.cfg, data.cfg.train
    check_enough_images(data.num_train, p.workers, t.batch_size)
    clock_name, board_name = _actor_names(p)
    board = start_board(board_name)  # keep the handle: Ray collects unreferenced actors
    datasets = {"train": data.train}
    for rank, part in enumerate(data.val_parts(p.workers)):
        datasets[f"val_{rank}"] = part
    if data.num_fit:
        for rank, part in enumerate(data.fit_parts(p.workers)):
            datasets[f"fit_{rank}"] = part
    settings = LoopSettings(
        cfg=cfg,
        dataset={**data.info.to_dict(), "num_train": data.num_train},
        steps_per_epoch=steps_per_epoch(data.num_train, p.workers, t.batch_size),
        val_ground_truth=ray.put(data.ground_truth),
        threads=threads,
        clock=clock_name,
        board=board_name,
        tracking=Tracking(tracker.uri, o.experiment, tracker.run_id) if tracker.enabled else None,
        stop_after_epochs=o.stop_after_epochs,
        param_digests=o.param_digests,
        report_placement_group=o.report_to_tune,
        download_weights=o.download_weights,
        fit_ground_truth=ray.put(data.fit_ground_truth) if data.num_fit else None,
    )
    resources = {"CPU": cpus, **({"GPU": p.gpus_per_worker} if p.gpus_per_worker else {})}
    callbacks = []
    if o.report_to_tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"settings": settings},
        scaling_config=ScalingConfig(
            num_workers=p.workers,
            use_gpu=p.gpus_per_worker > 0,
            resources_per_worker=resources,
            placement_strategy=o.placement,
        ),
        run_config=RunConfig(
            name=p.name,
            storage_path=p.storage.uri,
            failure_config=FailureConfig(max_failures=o.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=o.keep_checkpoints or None),
            callbacks=callbacks or None,
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    print(
        f"training {cfg.name} on {data.num_train} images ({data.num_val} val) with {p.workers} "
        f"workers x {cpus:g} CPU{f' + {p.gpus_per_worker:g} GPU' if p.gpus_per_worker else ''}; "
        f"run {p.name} in {p.storage.uri}",
        flush=True,
    )
    from ray.train import TrainingFailedError

    try:
        with ProgressPrinter(board, quiet=o.quiet, on_snapshot=o.on_progress):
            try:
                result = trainer.fit()
            except TrainingFailedError as exc:
                raise TrainRunError(
                    f"run {p.name} failed (resume with --resume --name {p.name}):\n{exc}"
                ) from exc
        state = ray.get(board.state.remote())
    finally:
        for actor in (clock, board):
            ray.kill(actor)
    return result, state


def _actor_names(p: Plan) -> tuple[str, str]:
    """The run's epoch clock and progress board actors."""
    return f"rayssd-clock-{p.name}", f"rayssd-progress-{p.name}"


def _kill_named(*names: str) -> None:
    import ray

    from pipelines.common import ACTOR_NAMESPACE

    for name in names:
        with contextlib.suppress(ValueError):  # none left over: the usual case
            ray.kill(ray.get_actor(name, namespace=ACTOR_NAMESPACE))


def _finish(o: TrainOptions, p: Plan, cfg: C.Config, result, tracker) -> dict[str, Any]:
    from pipelines.track.registry import log_model
    from ssd import checkpoint as ckpt_io

    if result.error is not None:
        tracker.end("FAILED")
        raise RuntimeError(f"training failed: {result.error}") from result.error
    metrics = dict(result.metrics or {})
    final = result.checkpoint
    out: dict[str, Any] = {"name": p.name, "storage": p.storage.uri, "metrics": metrics, "registered": None}
    if final is None:
        tracker.end("FINISHED")
        return _tracked(out, tracker)
    with final.as_directory() as directory:
        state = ckpt_io.load(directory)
    model_dir = p.storage.join(p.name, "model")  # beside the run's checkpoints
    with saved_for_inference(state, model_dir) as model_file:
        out["checkpoint"] = model_dir.join(ckpt_io.FILE_NAME).uri
        out["epochs_done"] = state["epoch"]
        finished = state["epoch"] >= cfg.train.epochs
        register_as = (
            None
            if (o.register_as or "").lower() == "none" or o.sanity is not None
            else (o.register_as or f"rayssd-{cfg.name}")
        )
        if finished and tracker.enabled:
            tracker.log_artifact(str(model_file), "checkpoints/final")
            out["registered"] = log_model(
                tracker, str(model_file), register_as=register_as, max_class_drop=o.max_class_drop
            )
    tracker.end("FINISHED")
    return _tracked(out, tracker)


@contextlib.contextmanager
def saved_for_inference(state: dict[str, Any], folder: Location) -> Iterator[Path]:
    """`state` saved for inference as FOLDER/checkpoint.pt, FOLDER a local folder or one in a
    bucket; yields a local file of it to log and register (a temporary copy for a bucket)."""
    from ssd import checkpoint as ckpt_io

    with tempfile.TemporaryDirectory(prefix="rayssd-model-") as scratch:
        model_file = ckpt_io.save(ckpt_io.for_inference(state), folder.path if folder.is_local else scratch)
        if not folder.is_local:
            folder.join(ckpt_io.FILE_NAME).upload(model_file)
        yield model_file


def _tracked(out: dict[str, Any], tracker) -> dict[str, Any]:
    out["mlflow_run_id"] = tracker.run_id if tracker.enabled else None
    out["mlflow_uri"] = tracker.uri if tracker.enabled else None
    return out


def check_storage_shared(storage: Location, timeout_s: float = 60.0) -> None:
    """On a cluster of several nodes, a local --storage must be a folder every node sees (a
    shared mount): Ray Train's workers write checkpoints there and a restarted worker reads
    them back. A marker file written here is looked for on every alive node; ValueError
    naming the nodes that do not see it (a node-local disk), with what to give instead."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if not storage.is_local or len(nodes) < 2:
        return
    marker = storage.join(f".rayssd-shared-{uuid.uuid4().hex}")
    try:
        marker.write_text("written by rayssd to see whether every node shares this folder\n")
    except OSError as exc:
        raise ValueError(f"--storage {storage.uri}: cannot write there ({exc})") from None
    sees = ray.remote(num_cpus=0)(os.path.exists)
    try:
        seen = ray.get(
            [
                sees.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                ).remote(marker.path)
                for n in nodes
            ],
            timeout=timeout_s,
        )
    except ray.exceptions.GetTimeoutError:  # a node still setting up: it cannot be told
        logging.getLogger(__name__).warning(
            "could not check within %.0f s that every node sees --storage %s", timeout_s, storage.uri
        )
        return
    finally:
        marker.delete()
    blind = [n["NodeManagerAddress"] for n, ok in zip(nodes, seen) if not ok]
    if blind:
        raise ValueError(
            f"--storage {storage.uri} is a local folder that {len(blind)} of the cluster's {len(nodes)} "
            f"nodes do not see ({', '.join(sorted(set(blind)))}); on a cluster give a bucket "
            "(--storage s3://BUCKET/runs, gs://...) or a path every node mounts (NFS, EFS, Filestore)"
        )


def storage_location(storage: str) -> Location:
    """--storage as a `Location`: a local folder (made absolute) or a bucket URI, which Ray Train
    reads and writes through pyarrow with the standard variables (AWS_ENDPOINT_URL, keys, ...).
    ValueError naming the URI when its filesystem cannot be opened, its endpoint does not
    answer, its bucket is missing or it carries query parameters (which Ray's workers would
    not be handed)."""
    from pipelines.data.sources import checked_location

    if "://" in storage and "?" in storage:  # the workers would be handed the URI without it
        raise ValueError(
            f"--storage {storage}: no query parameters; endpoint and credentials come from the "
            "standard variables (AWS_ENDPOINT_URL, AWS_REGION, ...)"
        )
    return checked_location(storage, "--storage")
