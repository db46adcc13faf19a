"""`rayssd train`: train an SSD with Ray Train (DDP) on a Ray Data pipeline, tracked in MLflow.

Also runs as ``ray job submit --working-dir . -- python -m jobs.train --data ... --preset ...``.
Everything that can be checked without a cluster (config values, the data source, the
run directory, workers against this machine's CPUs) is checked before Ray starts.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from jobs.options import add_config_arguments, config_from_args
from ssd import config as C

DESCRIPTION = """Train an SSD with Ray Train: N DDP workers (gloo on CPU, NCCL on GPU), fed by a
Ray Data pipeline that decodes, augments and matches images on CPU workers. Each epoch is
reported and checkpointed (model, optimiser, step, full config); a lost worker or node
restarts the run from the last checkpoint (--max-failures); --resume continues a stopped
run. Without augmentation the samples are prepared once and read back from Ray's object
store every epoch (data.cache). The val split is evaluated with COCO mAP every
train.eval_every epochs and at the end. Rank 0 logs params, metrics, pictures and the best
checkpoint to MLflow ($MLFLOW_TRACKING_URI, default sqlite:///mlflow.db); the final model is
registered and takes the `champion` alias if its mAP beats the current champion's."""

RUN_FILE = "rayssd_run.json"  # in STORAGE/NAME: the MLflow run id and the config, for --resume
DATA_RESERVE_CPUS = 0.5  # kept free for the data pipeline when training shares a small machine
CACHE_STORE_SHARE = 0.5  # prepared samples are cached only if they take at most this share


class TrainRunError(RuntimeError):
    """The workers failed beyond --max-failures; the message holds their error snippets."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says how to resume."""


@dataclasses.dataclass
class Plan:
    """What `run` will do, decided before Ray starts."""

    cfg: C.Config
    name: str
    storage: Path
    workers: int
    gpus_per_worker: float
    cpus_per_worker: float | None  # None: decided from the cluster's CPUs
    resume: bool
    run_id: str | None  # MLflow run to continue (resume)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="SOURCE", help="COCO .json, VOC root (path or URI)")
    parser.add_argument(
        "--val-data",
        metavar="SOURCE",
        help="separate validation source (e.g. COCO's val JSON); default: the source's own val split "
        "(VOC ImageSets) or a seeded data.val_fraction of it (COCO)",
    )
    add_config_arguments(parser)
    parser.add_argument("--workers", type=int, help="training workers (default: train.num_workers)")
    parser.add_argument(
        "--gpus-per-worker", type=float, default=0.0, help="GPUs per worker (default: 0, CPU)"
    )
    parser.add_argument(
        "--cpus-per-worker",
        type=float,
        help="CPUs reserved per training worker (default: 1, or less on a small machine so the data "
        "pipeline keeps some)",
    )
    parser.add_argument("--name", help="run name (default: PRESET-YYYYmmdd-HHMMSS)")
    parser.add_argument(
        "--storage",
        default="rayssd-runs",
        help="where runs keep checkpoints (default: ./rayssd-runs; on a cluster a path every node mounts)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue run --name from its last checkpoint, with its config"
    )
    parser.add_argument(
        "--stop-after-epochs",
        type=int,
        metavar="N",
        help="end this session after N epochs (the run stays resumable with --resume)",
    )
    parser.add_argument("--max-failures", type=int, default=3, help="worker/node failures to recover from")
    parser.add_argument(
        "--keep-checkpoints", type=int, default=2, help="latest checkpoints kept on storage (0: all)"
    )
    parser.add_argument("--experiment", default="rayssd", help="MLflow experiment (default: rayssd)")
    parser.add_argument(
        "--register-as", help="MLflow registered model name (default: rayssd-PRESET); 'none' to skip"
    )
    parser.add_argument(
        "--placement",
        default="PACK",
        choices=["PACK", "SPREAD", "STRICT_SPREAD"],
        help="where workers go: PACK fills nodes, SPREAD / STRICT_SPREAD put them on different nodes",
    )
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster address, e.g. auto or ray://head:10001 (default: $RAY_ADDRESS, else a local Ray)",
    )
    parser.add_argument("--quiet", action="store_true", help="no live progress line, only per-epoch lines")
    parser.add_argument(
        "--summary-json",
        metavar="FILE",
        help="also write the outcome (metrics, epochs, workers, model) as JSON",
    )


# --- planning: every check that needs no cluster ---------------------------------------------


def plan(args: argparse.Namespace) -> Plan:
    """Validate everything that can be checked before Ray starts; raises ValueError."""
    from pipelines.datasets import detect_source

    if "://" in args.storage:
        raise ValueError(
            f"--storage {args.storage}: object-store URIs are not supported yet; give a local path, or on "
            "a cluster a path every node mounts (e.g. NFS)"
        )
    storage = Path(args.storage).expanduser().resolve()
    resume = bool(args.resume)
    if resume and not args.name:
        raise ValueError("--resume needs --name: the run to continue")
    name = args.name or None
    run_file = storage / name / RUN_FILE if name else None
    run_id = None
    if resume:
        if run_file is None or not run_file.is_file():
            raise ValueError(f"no run {name!r} to resume in {storage} (expected {run_file})")
        if args.overrides or args.config:
            raise ValueError("--resume continues a run with its own config; drop --set and --config")
        try:
            saved = json.loads(run_file.read_text())
            cfg = C.from_dict(saved["config"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{run_file} is not a rayssd run record: {exc!r}") from exc
        if saved.get("finished"):
            raise ValueError(
                f"run {name!r} already finished all {cfg.train.epochs} epochs; nothing to resume"
            )
        if saved.get("val_data") != args.val_data:
            raise ValueError(
                f"run {name!r} was started with --val-data {saved.get('val_data')}; resume it with the same"
            )
        if args.workers is not None:
            cfg = C.override(cfg, [f"train.num_workers={args.workers}"])  # any worker count may resume
        run_id = saved.get("mlflow_run_id")
    else:
        cfg = config_from_args(args)
        if args.workers is not None:
            cfg = C.override(cfg, [f"train.num_workers={args.workers}"])
        if name and run_file is not None and run_file.exists():
            raise ValueError(
                f"run {name!r} already exists in {storage}; pass --resume to continue it "
                "or choose another --name"
            )
        name = name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    workers = cfg.train.num_workers
    if args.gpus_per_worker < 0 or (args.cpus_per_worker is not None and args.cpus_per_worker <= 0):
        raise ValueError("--gpus-per-worker must be >= 0 and --cpus-per-worker > 0")
    if args.stop_after_epochs is not None and args.stop_after_epochs < 1:
        raise ValueError("--stop-after-epochs must be >= 1")
    detect_source(args.data)
    if args.val_data:
        detect_source(args.val_data)
    if not args.address:
        _check_local_resources(workers, args.gpus_per_worker, args.cpus_per_worker)
    return Plan(cfg, name, storage, workers, args.gpus_per_worker, args.cpus_per_worker, resume, run_id)


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


# --- running ---------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    p = plan(args)
    import ray

    from jobs.prepare import quiet_ray_data

    quiet_ray_data()
    if not ray.is_initialized():
        ray.init(
            address=args.address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING
        )
    cpus, data_cpus, threads = _cpu_split(p, ray.cluster_resources())
    data = _datasets(args, p)
    cfg = data["cfg"]
    tracker = _start_tracking(args, p, cfg, data)
    run_id = tracker.run_id if tracker.enabled else p.run_id
    _write_run_file(p, cfg, run_id, args.val_data)
    try:
        result, board_state = _fit(args, p, data, tracker, cpus, data_cpus, threads)
    except KeyboardInterrupt:
        tracker.end("KILLED")
        raise Interrupted(f"run {p.name} interrupted; continue it with --resume --name {p.name}") from None
    except BaseException:
        tracker.end("FAILED")
        raise
    out = _finish(args, p, cfg, result, tracker)
    if out.get("epochs_done", 0) >= cfg.train.epochs:
        _write_run_file(p, cfg, run_id, args.val_data, finished=True)
    out["history"] = board_state["epochs"]  # what rank 0 reported, in order (this session)
    out["samples_cached"] = board_state["samples_cached"]
    out["workers"] = {str(rank): info for rank, info in sorted(board_state["workers"].items())}
    out["param_digests"] = {
        str(e): {str(r): d for r, d in v.items()} for e, v in board_state["digests"].items()
    }
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(out, indent=2, default=_jsonable))
    return out


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return str(value)


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
    threads = max(1, int(cpus))
    if p.cpus_per_worker is None and total < p.workers + 2:
        # On a small machine the data pipeline runs ahead and then idles: let the workers'
        # threads cover the cores (one worker on two cores trains with two threads).
        threads = max(1, int(total // p.workers))
    return cpus, data_cpus, threads


def _datasets(args: argparse.Namespace, p: Plan) -> dict[str, Any]:
    """Source rows for train and val, the config with the dataset's classes, val ground truth."""
    from pipelines.datasets import coco_ground_truth, detect_source, read_dataset
    from pipelines.prepare import with_classes

    d = p.cfg.data
    kind = detect_source(args.data)
    if kind == "folder":
        raise ValueError(f"{args.data} is a folder of unlabelled images; training needs COCO or VOC labels")
    common = {"val_fraction": d.val_fraction, "seed": d.seed}
    if args.val_data:
        train_rows, info, _ = read_dataset(args.data, split=None, **common)
        val_rows, val_info, _ = read_dataset(args.val_data, split=None, **common)
        if val_info.class_names != info.class_names:
            raise ValueError(
                f"--val-data classes {list(val_info.class_names)} differ from --data classes "
                f"{list(info.class_names)}"
            )
    else:
        train_rows, info, _ = read_dataset(args.data, split="train", **common)
        val_rows, val_info, _ = read_dataset(args.data, split="val", **common)
    cfg = with_classes(p.cfg, info.class_names)
    if p.resume and cfg != p.cfg:
        raise ValueError("the data's classes differ from those the run was started with")
    val_rows = val_rows.materialize()
    return {
        "cfg": cfg,
        "info": info,
        "train_rows": train_rows,
        "val_rows": val_rows,
        "ground_truth": coco_ground_truth(val_rows, val_info),
        "num_train": info.num_images,
        "num_val": val_info.num_images,
    }


def _start_tracking(args: argparse.Namespace, p: Plan, cfg: C.Config, data: dict[str, Any]):
    from pipelines.tracking import Tracker, tracking_uri

    tags = {
        "rayssd.job": "train",
        "rayssd.preset": cfg.name,
        "rayssd.data": str(args.data),
        "rayssd.storage": str(p.storage),
    }
    tracker = Tracker.start(
        uri=tracking_uri(), experiment=args.experiment, run_name=p.name, tags=tags, run_id=p.run_id
    )
    if tracker.enabled and not p.resume:
        info = data["info"]
        params = {
            **C.flatten(cfg),
            "run.workers": p.workers,
            "run.gpus_per_worker": p.gpus_per_worker,
            "data.source": args.data,
            "data.val_source": args.val_data or f"{args.data} (val split)",
            "data.train_images": data["num_train"],
            "data.val_images": data["num_val"],
        }
        tracker.log_params(params)
        tracker.log_text(C.to_yaml(cfg), "config.yaml")
        tracker.log_text(json.dumps(info.to_dict(), indent=2), "dataset.json")
    return tracker


def _write_run_file(
    p: Plan, cfg: C.Config, run_id: str | None, val_data: str | None, finished: bool = False
) -> None:
    directory = p.storage / p.name
    directory.mkdir(parents=True, exist_ok=True)
    record = {
        "name": p.name,
        "config": C.to_dict(cfg),
        "mlflow_run_id": run_id,
        "val_data": val_data,
        "finished": finished,
    }
    (directory / RUN_FILE).write_text(json.dumps(record, indent=2))


def _fit(args, p: Plan, data: dict[str, Any], tracker, cpus: float, data_cpus: float, threads: int):
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.preprocess import preprocess, start_epoch_clock
    from pipelines.progress import ProgressPrinter, start_board
    from pipelines.training import check_enough_images, steps_per_epoch, train_loop_per_worker

    cfg, t = data["cfg"], data["cfg"].train
    check_enough_images(data["num_train"], p.workers, t.batch_size)
    clock_name, board_name = f"rayssd-clock-{p.name}", f"rayssd-progress-{p.name}"
    _kill_named(clock_name, board_name)  # left over by an earlier, interrupted session of this run
    clock = start_epoch_clock(clock_name)  # keep the handles: Ray collects unreferenced actors
    board = start_board(board_name)
    datasets = {
        "train": preprocess(
            data["train_rows"], cfg, train=True, epoch=clock_name, workers=(1, 2), num_cpus=data_cpus
        )
    }
    n_val = data["num_val"]
    cuts = [n_val * r // p.workers for r in range(1, p.workers)]
    parts = data["val_rows"].split_at_indices(cuts) if cuts else [data["val_rows"]]
    for rank, part in enumerate(parts):
        datasets[f"val_{rank}"] = preprocess(part, cfg, train=False, workers=(1, 1), num_cpus=data_cpus)
    cached = _cache_samples(cfg, data["num_train"] + n_val)
    if cached:
        datasets = _materialize(datasets, data["num_train"] + n_val)
    settings = {
        "config": C.to_dict(cfg),
        "dataset": {**data["info"].to_dict(), "num_train": data["num_train"]},
        "steps_per_epoch": steps_per_epoch(data["num_train"], p.workers, t.batch_size),
        "clock": clock_name,
        "board": board_name,
        "threads": threads,
        "stop_after_epochs": args.stop_after_epochs,
        "val_ground_truth": ray.put(data["ground_truth"]),
        "tracking": {"uri": tracker.uri, "experiment": args.experiment, "run_id": tracker.run_id}
        if tracker.enabled
        else None,
    }
    resources = {"CPU": cpus, **({"GPU": p.gpus_per_worker} if p.gpus_per_worker else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=settings,
        scaling_config=ScalingConfig(
            num_workers=p.workers,
            use_gpu=p.gpus_per_worker > 0,
            resources_per_worker=resources,
            placement_strategy=args.placement,
        ),
        run_config=RunConfig(
            name=p.name,
            storage_path=str(p.storage),
            failure_config=FailureConfig(max_failures=args.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=args.keep_checkpoints or None),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    print(
        f"training {cfg.name} on {data['num_train']} images ({data['num_val']} val) with {p.workers} "
        f"workers x {cpus:g} CPU{f' + {p.gpus_per_worker:g} GPU' if p.gpus_per_worker else ''}; "
        f"run {p.name} in {p.storage}",
        flush=True,
    )
    from ray.train import TrainingFailedError

    try:
        with ProgressPrinter(board, quiet=args.quiet):
            try:
                result = trainer.fit()
            except TrainingFailedError as exc:
                raise TrainRunError(
                    f"run {p.name} failed (resume with --resume --name {p.name}):\n{exc}"
                ) from exc
        state = {**ray.get(board.state.remote()), "samples_cached": cached}
    finally:
        for actor in (clock, board):
            ray.kill(actor)
    return result, state


def _cache_samples(cfg: C.Config, images: int) -> bool:
    """Whether to prepare the samples once (`data.cache`): only without augmentation (the
    samples are then the same every epoch) and when they take at most half of the object store."""
    import ray

    from pipelines.preprocess import sample_bytes

    if not cfg.data.cache or cfg.data.augment:
        return False
    need = images * sample_bytes(cfg)
    store = ray.cluster_resources().get("object_store_memory", 0.0)
    if need > CACHE_STORE_SHARE * store:
        print(
            f"note: not caching the prepared samples ({need / 2**30:.1f} GiB; the object store "
            f"holds {store / 2**30:.1f} GiB): they are prepared afresh every epoch",
            flush=True,
        )
        return False
    return True


def _materialize(datasets: dict[str, Any], images: int) -> dict[str, Any]:
    """Run the preprocessing once and keep the samples in the object store (see `_cache_samples`)."""
    start = time.perf_counter()
    print(f"preparing {images} samples once (no augmentation: every epoch reads them back)", flush=True)
    cached = {name: ds.materialize() for name, ds in datasets.items()}
    print(f"prepared {images} samples in {time.perf_counter() - start:.1f} s", flush=True)
    return cached


def _kill_named(*names: str) -> None:
    import ray

    from pipelines.preprocess import ACTOR_NAMESPACE

    for name in names:
        with contextlib.suppress(ValueError):  # none left over: the usual case
            ray.kill(ray.get_actor(name, namespace=ACTOR_NAMESPACE))


def _finish(args, p: Plan, cfg: C.Config, result, tracker) -> dict[str, Any]:
    from pipelines.registry import log_model
    from ssd import checkpoint as ckpt_io

    if result.error is not None:
        tracker.end("FAILED")
        raise RuntimeError(f"training failed: {result.error}") from result.error
    metrics = dict(result.metrics or {})
    final = result.checkpoint
    out: dict[str, Any] = {"name": p.name, "storage": str(p.storage), "metrics": metrics, "registered": None}
    if final is not None:
        with final.as_directory() as directory:
            state = ckpt_io.load(directory)
        model_file = ckpt_io.save(ckpt_io.for_inference(state), p.storage / p.name / "model")
        out["checkpoint"] = str(model_file)
        out["epochs_done"] = state["epoch"]
        finished = state["epoch"] >= cfg.train.epochs
        register_as = (
            None if (args.register_as or "").lower() == "none" else (args.register_as or f"rayssd-{cfg.name}")
        )
        if finished and tracker.enabled:
            tracker.log_artifact(str(model_file), "checkpoints/final")
            out["registered"] = log_model(tracker, str(model_file), register_as=register_as)
    tracker.end("FINISHED")
    out["mlflow_run_id"] = tracker.run_id if tracker.enabled else None
    _print_summary(out, tracker)
    return out


def _print_summary(out: dict[str, Any], tracker) -> None:
    m = out["metrics"]
    print(f"run {out['name']}: {out.get('epochs_done', '?')} epochs, loss {m.get('loss', float('nan')):.3f}")
    if "map" in m:
        print(
            f"  val mAP {m['map']:.3f}  mAP@0.5 {m['map50']:.3f}  mAP@0.75 {m.get('map75', float('nan')):.3f}"
        )
    if out.get("checkpoint"):
        print(f"  model checkpoint: {out['checkpoint']}")
    if tracker.enabled:
        print(f"  MLflow run {tracker.run_id} at {tracker.uri}")
    reg = out.get("registered")
    if reg is not None:
        state = "now champion" if reg.champion else f"champion stays version {reg.previous_champion}"
        print(f"  registered models:/{reg.name}/{reg.version} ({reg.metric} {reg.value:.3f}; {state})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jobs.train", description=DESCRIPTION)
    add_arguments(parser)
    try:
        run(parser.parse_args(argv))
    except (ValueError, FileNotFoundError) as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except TrainRunError as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as exc:
        print(f"train: {exc or 'interrupted'}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
