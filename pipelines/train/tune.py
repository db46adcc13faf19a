"""`rayssd tune`: hyperparameter search on Ray Tune, each trial a real `rayssd train` run.

Each trial is a Tune function trainable that plans and runs `pipelines.train.launch` with the
trial's config (the preset with its sampled values, `pipelines.train.search`): the same data
pipeline, Ray Train loop, checkpoints and MLflow logging as ``rayssd train``, with a
`TuneReportCallback` that hands every epoch's report (val mAP included: trials evaluate
every epoch) to Tune. ASHA stops weak trials at epoch rungs; trials run side by side, as many
as the cluster holds (one training worker each: fractional CPUs on a laptop, a GPU each on a
cluster). The search is one MLflow run (experiment ``rayssd-tune``) whose child runs are the
trials; at the end it holds the space, the trial table, a plot of mAP against epochs for every
trial, and the best trial's final model, registered through the champion gate
(`pipelines.track.registry`). ``--resume`` continues an interrupted search (Tune's own restore;
a trial cut off mid-way resumes its Ray Train run from its last checkpoint).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from pipelines.common import JobError
from pipelines.data.sources import Location, resolve_location
from ssd import config as C

log = logging.getLogger(__name__)

SEARCH_FILE = "rayssd_tune.json"  # in STORAGE/NAME: the MLflow run, the options, for --resume
TRIALS_DIR = "trials"  # STORAGE/NAME/trials/<trial run>: each trial's Ray Train run
METRIC = "map"
STOPPED_WHY = "early stopping (ASHA or --time-budget-s)"  # tag rayssd.tune_stopped of a stopped trial's run
DATA_CPUS = 0.25  # per data task or actor of a trial beside others
TRIAL_DATA_CPUS = 3 * DATA_CPUS  # its training pipeline's two actors and its val pipeline
TRIAL_DRIVER_CPUS = 0.001  # the Tune trial's own actor waits for its Ray Train run (Tune refuses 0)
TRIAL_RESTARTS = 1  # Tune restarts a failed trial this often, from its last checkpoint


@dataclasses.dataclass(frozen=True)
class TuneOptions:
    """What `rayssd tune` was asked for."""

    data: str
    cfg: C.Config  # the preset (+ config file + --set), before each trial's values
    val_data: str | None = None
    trials: int = 8
    max_concurrent: int | None = None  # default: as many as the cluster holds
    search: tuple[str, ...] = ()  # KEY=SPEC; default `search.default_space`
    time_budget_s: float | None = None
    grace_epochs: int = 1  # ASHA: epochs every trial runs before it may be stopped
    reduction_factor: int = 2  # ASHA: 1 in this many trials goes on at each rung
    storage: str = "rayssd-runs"
    name: str | None = None  # default tune-PRESET-YYYYmmdd-HHMMSS
    resume: bool = False
    experiment: str = "rayssd-tune"
    register_as: str | None = None  # default rayssd-PRESET; "none" skips
    max_class_drop: float = 0.05
    gpus_per_trial: float | None = None  # default: 1 when the cluster has GPUs, else 0
    seed: int = 0
    address: str | None = None


def tune(o: TuneOptions) -> dict[str, Any]:
    """Run (or resume) the search; returns the summary (trials, best, registered)."""
    import ray
    from ray import tune as ray_tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from pipelines.common import start_ray
    from pipelines.train.launch import Interrupted, check_storage_shared, storage_location
    from pipelines.train.loop import PLACEMENT_GROUP_KEY
    from pipelines.train.search import build_space

    storage = storage_location(o.storage)  # a folder or a bucket URI, as for rayssd train
    name, saved = _name_and_record(o, storage)
    cfg = C.from_dict(saved["config"]) if saved else o.cfg
    cfg = C.override(cfg, ["train.eval_every=1"])  # ASHA compares val mAP at every epoch
    specs = [f"{k}={v}" for k, v in saved["search"].items()] if saved else list(o.search)
    space, shown = build_space(cfg, specs)
    if cfg.train.steps or any(spec.partition("=")[0].strip() == "train.steps" for spec in specs):
        raise ValueError(
            "rayssd tune sizes trials in epochs (ASHA counts them); set train.epochs, not train.steps"
        )
    if o.trials < 1 or o.grace_epochs < 1 or o.reduction_factor < 2:
        raise ValueError("--trials and --grace-epochs must be >= 1 and --reduction-factor >= 2")
    if o.max_concurrent is not None and o.max_concurrent < 1:
        raise ValueError(f"--max-concurrent {o.max_concurrent}: expected >= 1")
    if not o.max_class_drop >= 0:
        raise ValueError(f"--max-class-drop {o.max_class_drop}: expected an AP difference >= 0")
    from pipelines.train.datasets import open_training_source

    for source in (o.data, o.val_data):
        if source:
            open_training_source(source)  # a bad source fails here, before Ray starts

    # With the dashboard: Ray Train's placement-group cleaner asks its state API whether a
    # trial's controller is gone, and a trial that ASHA stops leaves its workers' placement
    # group to that cleaner (without it the group's CPUs stay taken and the search stalls).
    start_ray(o.address, include_dashboard=True)
    check_storage_shared(storage)
    count = o.trials * math.prod(len(d["grid_search"]) for d in space.values() if isinstance(d, dict))
    concurrent, cpus, gpus = _packing(o, count, ray.cluster_resources())
    tracker = _start_tracking(o, name, cfg, shown, concurrent, cpus, gpus, saved)
    parent = tracker.run_id if tracker.enabled else None
    _write_record(storage.join(name), o, cfg, shown, parent)
    trial = functools.partial(
        run_trial,
        settings={
            "config": C.to_dict(cfg),
            "data": _absolute(o.data),  # trials run in their own working directories
            "val_data": _absolute(o.val_data) if o.val_data else None,
            "tracking_uri": tracker.uri if tracker.enabled else None,
            "search": name,
            "storage": storage.join(name, TRIALS_DIR).uri,
            "experiment": o.experiment,
            "parent_run_id": parent,
            "cpus_per_worker": cpus,
            "gpus_per_worker": gpus,
            "data_cpus": DATA_CPUS if cpus is not None else None,
        },
    )
    trainable = ray_tune.with_resources(trial, {"CPU": TRIAL_DRIVER_CPUS})
    path = storage.join(name, "tune").uri
    print(
        f"tuning {cfg.name} on {o.data}: {count} trials, {concurrent} at a time "
        f"(1 worker{f' x {cpus:g} CPU' if cpus else ''}{f' + {gpus:g} GPU' if gpus else ''} each), ASHA over "
        f"{cfg.train.epochs} epochs; search {name} in {storage.uri}",
        flush=True,
    )
    try:
        if o.resume and ray_tune.Tuner.can_restore(path):
            tuner = ray_tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
        else:
            tuner = ray_tune.Tuner(
                trainable,
                param_space=space,
                tune_config=ray_tune.TuneConfig(
                    num_samples=o.trials,
                    time_budget_s=o.time_budget_s,
                    scheduler=ASHAScheduler(
                        time_attr="epoch",
                        metric=METRIC,
                        mode="max",
                        # past the last epoch: a trial that trains every epoch ends by itself
                        # (registering its model in its run), not by a stop at the last rung
                        max_t=cfg.train.epochs + 1,
                        grace_period=o.grace_epochs,
                        reduction_factor=o.reduction_factor,
                    ),
                    search_alg=BasicVariantGenerator(random_state=o.seed, max_concurrent=concurrent),
                ),
                run_config=ray_tune.RunConfig(
                    name="tune",
                    storage_path=storage.join(name).uri,
                    verbose=0,
                    # a trial whose workers fail is restarted by Tune (resuming its run from
                    # its last checkpoint), not by Ray Train: see `run_trial`
                    failure_config=ray_tune.FailureConfig(max_failures=TRIAL_RESTARTS),
                    callbacks=[free_placement_groups()],
                ),
            )
        handler = signal.getsignal(signal.SIGINT)
        results = tuner.fit()
        interrupted = _interrupted(handler)
    except KeyboardInterrupt:
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    for result in results:  # trials the time budget stopped were not freed as they ended
        remove_placement_group((result.metrics or {}).get(PLACEMENT_GROUP_KEY))
    if interrupted or results.num_terminated + results.num_errors < len(results):
        tracker.end("KILLED")
        raise Interrupted(f"search {name} interrupted; continue it with --resume --name {name}")
    return _finish(o, name, storage, cfg, results, tracker, shown)


def _interrupted(before: Any) -> bool:
    """Whether Tune's fit just ended on Ctrl-C (SIGINT).

    Tune catches the first SIGINT itself: it stops the search, saves its state for a restore
    (the running trials stay resumable) and returns as if done. Its handler puts back the one
    it found (`before`) when the signal comes and stays in place otherwise, which tells the two
    apart; the handler from before the search is put back either way."""
    if threading.current_thread() is not threading.main_thread():
        return False
    tune_catches = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") == "0"
    caught = tune_catches and signal.getsignal(signal.SIGINT) is before
    if before is not None:
        signal.signal(signal.SIGINT, before)
    return caught


def run_trial(config: dict[str, Any], *, settings: dict[str, Any]) -> None:
    """One trial (inside Ray Tune): `rayssd train` with the trial's values, reporting to Tune."""
    from ray import tune as ray_tune

    from pipelines.train import launch
    from pipelines.train.search import trial_config

    if settings["tracking_uri"]:  # the search's store, not one relative to the trial's directory
        os.environ["MLFLOW_TRACKING_URI"] = settings["tracking_uri"]
    trial_id = ray_tune.get_context().get_trial_id()
    name = f"{settings['search']}-{trial_id}"
    storage = resolve_location(settings["storage"])
    resume = storage.join(name, launch.RUN_FILE).exists()  # Tune restored this trial
    options = launch.TrainOptions(
        data=settings["data"],
        val_data=settings["val_data"],
        cfg=trial_config(C.from_dict(settings["config"]), config),
        workers=1,
        cpus_per_worker=settings["cpus_per_worker"],
        gpus_per_worker=settings["gpus_per_worker"],
        data_cpus=settings["data_cpus"],
        name=name,
        storage=storage.uri,
        resume=resume,
        # 0: a stopped trial's workers die with their placement group (`free_placement_groups`),
        # and Ray Train must not start them again in a new one; Tune restarts failed trials
        max_failures=0,
        experiment=settings["experiment"],
        register_as="none",
        quiet=True,
        parent_run_id=settings["parent_run_id"],
        report_to_tune=True,
    )
    launch.run(launch.plan(options))


def free_placement_groups() -> Any:
    """A Tune callback that frees the placement group of each trial's Ray Train workers once
    the trial has ended.

    Tune stops a trial (ASHA, the time budget, an error) by ending its actor, and with it the
    Ray Train controller the actor started; the controller's placement group is scoped to the
    job, so it would keep the workers' CPUs (and GPUs) until the search ends and the next trial
    would wait for them forever. Ray Train leaves such a group to a detached cleaner that asks
    the dashboard's state API whether the controller is gone, which on a loaded machine may
    not answer; here rank 0 names the group in every report (`loop.PLACEMENT_GROUP_KEY`) and
    the group is removed as the trial ends. A trial that finished removed its own already."""
    from ray.tune import Callback

    from pipelines.train.loop import PLACEMENT_GROUP_KEY

    class FreePlacementGroups(Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._free(trial)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._free(trial)

        @staticmethod
        def _free(trial: Any) -> None:
            hex_id = (trial.last_result or {}).get(PLACEMENT_GROUP_KEY)
            try:
                remove_placement_group(hex_id)
            except Exception as exc:  # Tune would count it as the trial's failure
                log.warning("trial %s: could not free placement group %s: %s", trial, hex_id, exc)

    return FreePlacementGroups()


def remove_placement_group(hex_id: str | None) -> bool:
    """Remove the placement group `hex_id` unless it is gone; True when this removed it."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table
    from ray.util.placement_group import remove_placement_group as remove

    if not hex_id:
        return False
    group = PlacementGroup(PlacementGroupID.from_hex(hex_id))
    if placement_group_table(group).get("state", "REMOVED") == "REMOVED":
        return False
    remove(group)
    return True


def _absolute(source: str) -> str:
    return source if "://" in source else os.path.abspath(os.path.expanduser(source))


def _name_and_record(o: TuneOptions, storage: Location) -> tuple[str, dict | None]:
    if o.resume:
        if not o.name:
            raise ValueError("--resume needs --name: the search to continue")
        record = storage.join(o.name, SEARCH_FILE)
        if not record.is_file():
            raise ValueError(f"no search {o.name!r} to resume in {storage.uri} (expected {record.uri})")
        try:
            return o.name, json.loads(record.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{record.uri} is not a rayssd search record: {exc}") from None
    name = o.name or f"tune-{o.cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if storage.join(name, SEARCH_FILE).exists():
        raise ValueError(f"search {name!r} already exists in {storage.uri}; pass --resume or another --name")
    return name, None


def _packing(o: TuneOptions, count: int, resources: dict[str, float]) -> tuple[int, float | None, float]:
    """(trials at a time, CPUs per trial's worker or None for `rayssd train`'s own split, GPUs
    per trial's worker) for the cluster.

    A trial side by side with others holds its worker's CPU and `TRIAL_DATA_CPUS` for its data
    pipeline (three tasks or actors at `DATA_CPUS` each), and one whole CPU stays free: a
    trial reads its source (Ray Data tasks of a CPU each) before its workers start. A machine
    with fewer CPUs than two such trials need runs one at a time, split as `rayssd train`
    splits it (a laptop: the worker and the data pipeline share the cores)."""
    total_cpus, total_gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    gpus = o.gpus_per_trial if o.gpus_per_trial is not None else (1.0 if total_gpus >= 1 else 0.0)
    if gpus > 0 and total_gpus < gpus:
        raise ValueError(f"--gpus-per-trial {gpus:g}: the cluster has {total_gpus:g} GPUs")
    budget = 1.0 + TRIAL_DATA_CPUS + TRIAL_DRIVER_CPUS
    fit = max(1, int((total_cpus - 1.0) // budget))
    if gpus > 0:
        fit = min(fit, int(total_gpus // gpus))
    concurrent = min(count, fit, o.max_concurrent or fit)
    return concurrent, (1.0 if concurrent > 1 else None), gpus


def _start_tracking(o, name, cfg, shown, concurrent, cpus, gpus, saved):
    from pipelines.track.tracker import Tracker, tracking_uri

    tags = {"rayssd.job": "tune", "rayssd.preset": cfg.name, "rayssd.data": str(o.data)}
    run_id = saved.get("mlflow_run_id") if saved else None
    tracker = Tracker.start(
        uri=tracking_uri(), experiment=o.experiment, run_name=name, tags=tags, run_id=run_id
    )
    if tracker.enabled and not saved:
        tracker.log_params(
            {
                **{f"search.{k}": v for k, v in shown.items()},
                "tune.trials": o.trials,
                "tune.max_concurrent": concurrent,
                "tune.scheduler": f"ASHA(epoch, max_t={cfg.train.epochs}, grace={o.grace_epochs}, "
                f"reduction={o.reduction_factor})",
                "tune.time_budget_s": o.time_budget_s,
                "tune.cpus_per_trial": cpus,
                "tune.gpus_per_trial": gpus,
                "tune.seed": o.seed,
                "data.source": o.data,
                "data.val_source": o.val_data or f"{o.data} (val split)",
                "preset": cfg.name,
            }
        )
        tracker.log_text(C.to_yaml(cfg), "config.yaml")
        tracker.log_text(json.dumps(shown, indent=2), "search_space.json")
    return tracker


def _write_record(
    directory: Location, o: TuneOptions, cfg: C.Config, shown: dict, run_id: str | None
) -> None:
    record = {"config": C.to_dict(cfg), "search": shown, "mlflow_run_id": run_id, "data": o.data}
    directory.join(SEARCH_FILE).write_text(json.dumps(record, indent=2))


def _finish(o, name, storage, cfg, results, tracker, shown) -> dict[str, Any]:
    trials = [_trial_row(result, cfg.train.epochs, storage.prefix) for result in results]
    if trials and all(t["status"] == "failed" for t in trials):
        tracker.end("FAILED")
        first = next(result for result in results if result.error is not None)
        raise JobError(f"every trial of search {name} failed; the first: {_error_line(first.error)}")
    trials.sort(key=lambda t: -t["final_map"] if not math.isnan(t["final_map"]) else math.inf)
    out: dict[str, Any] = {"name": name, "trials": trials, "best": None, "registered": None}
    table = format_trials(trials, list(shown))
    if tracker.enabled:
        tracker.log_text(table + "\n", "trials.md")
        tracker.log_text(json.dumps(trials, indent=2, default=str), "trials.json")
        figure = map_figure(results)
        if figure is not None:
            tracker.log_figure(figure, "pictures/map_by_epoch.png")
        tracker.log_metrics(
            {
                "trials_finished": sum(t["status"] == "finished" for t in trials),
                "trials_stopped_early": sum(t["status"] == "stopped early" for t in trials),
                "trials_failed": sum(t["status"] == "failed" for t in trials),
            },
            step=0,
        )
        _close_stopped_trials(tracker, name, trials)
    best = next((t for t in trials if t["checkpoint"] and not math.isnan(t["final_map"])), None)
    if best is not None:
        out["best"] = best
        _register_best(o, cfg, storage.join(name, "best"), best, tracker, out)
    tracker.end("FINISHED")
    out["table"] = table
    out["mlflow_run_id"] = tracker.run_id if tracker.enabled else None
    out["mlflow_uri"] = tracker.uri if tracker.enabled else None
    return out


def _register_best(o, cfg, best_dir: Location, best: dict, tracker, out: dict) -> None:
    """The best trial's model saved for inference in STORAGE/NAME/best (`best_dir`), logged
    and registered from a local copy."""
    from ray.train import Checkpoint

    from pipelines.track.registry import log_model
    from pipelines.train.launch import saved_for_inference
    from ssd import checkpoint as ckpt_io

    trial = resolve_location(best["checkpoint"])
    with Checkpoint(trial.path, filesystem=trial.filesystem).as_directory() as directory:
        state = ckpt_io.load(directory)
    with saved_for_inference(state, best_dir) as model_file:
        out["checkpoint"] = best_dir.join(ckpt_io.FILE_NAME).uri
        if tracker.enabled:
            tracker.log_metrics({"best_map": best["final_map"]}, step=0)
            tracker.set_tags({"rayssd.best_trial": best["trial"]})
            tracker.log_artifact(str(model_file), "checkpoints/best")
            skip = (o.register_as or "").lower() == "none"
            register_as = None if skip else (o.register_as or f"rayssd-{cfg.name}")
            out["registered"] = log_model(
                tracker, str(model_file), register_as=register_as, max_class_drop=o.max_class_drop
            )


def _trial_row(result: Any, epochs: int, prefix: str = "") -> dict[str, Any]:
    """A trial's outcome; its checkpoint as a path or URI (Ray Train reports the path inside
    the storage's filesystem: `prefix` is the storage's scheme, s3:// say)."""
    metrics = result.metrics or {}
    frame = result.metrics_dataframe
    history = [float(v) for v in frame[METRIC].tolist()] if frame is not None and METRIC in frame else []
    done = int(metrics.get("epoch", 0) or 0)
    if result.error is not None:
        status = "failed"
    elif done >= epochs:
        status = "finished"
    else:
        status = "stopped early"
    config = {k: (v.item() if hasattr(v, "item") else v) for k, v in (result.config or {}).items()}
    return {
        "trial": str(metrics.get("trial_id") or (Path(result.path).name if result.path else "?")),
        "status": status,
        "epochs": done,
        "final_map": float(metrics.get(METRIC, math.nan)),
        "best_map": max(history) if history else math.nan,
        "config": config,
        "checkpoint": prefix + metrics["checkpoint_path"] if metrics.get("checkpoint_path") else None,
        "error": _error_line(result.error) if result.error is not None else None,
    }


def _error_line(error: BaseException) -> str:
    """The last line of a trial's error (its exception), as Tune wraps it."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1][:300] if lines else repr(error)


def format_trials(trials: list[dict[str, Any]], keys: list[str]) -> str:
    """A Markdown table of the trials, best final mAP first."""
    head = ["trial", "status", "epochs", "final mAP", "best mAP", *keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in trials:
        values = [_short(t["config"].get(k)) for k in keys]
        lines.append(
            f"| {t['trial']} | {t['status']} | {t['epochs']} | {t['final_map']:.4f} | {t['best_map']:.4f} | "
            + " | ".join(values)
            + " |"
        )
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def map_figure(results: Any) -> Any:
    """val mAP against epochs, one line per trial (None when no trial reported)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    drawn = 0
    for result in results:
        frame = result.metrics_dataframe
        if frame is None or METRIC not in frame or "epoch" not in frame:
            continue
        label = str((result.metrics or {}).get("trial_id") or Path(result.path).name[:20])
        axes.plot(frame["epoch"], frame[METRIC], marker="o", label=label)
        drawn += 1
    if not drawn:
        return None
    axes.set_xlabel("epoch")
    axes.set_ylabel("val mAP@[.5:.95]")
    axes.set_title("rayssd tune: val mAP per trial (ASHA stops the weak ones)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    return figure


def _close_stopped_trials(tracker: Any, name: str, trials: list[dict[str, Any]]) -> None:
    """Trials the search stopped were killed mid-run: their child runs end as KILLED, tagged
    why (a stopped run's training may have ended it FAILED as its workers went)."""
    stopped = {f"{name}-{t['trial']}" for t in trials if t["status"] == "stopped early"}
    client = tracker.client
    run = client.get_run(tracker.run_id)
    children = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{tracker.run_id}'"
    )
    for child in children:
        was_stopped = child.info.run_name in stopped and child.info.status in ("RUNNING", "FAILED")
        if was_stopped or child.info.status == "RUNNING":
            client.set_tag(child.info.run_id, "rayssd.tune_stopped", STOPPED_WHY)
            client.set_terminated(child.info.run_id, "KILLED")
