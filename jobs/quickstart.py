"""`rayssd quickstart`: the whole system on one machine with one command.

    rayssd quickstart [--out DIR] [--quick] [--port 8000] [--keep-serving S]
    python -m jobs.quickstart ...

On a local Ray (or $RAY_ADDRESS) and the local MLflow store ($MLFLOW_TRACKING_URI, else
sqlite:///mlflow.db in the working directory) it:

1. writes the built-in dataset into DIR/data (reused when already there),
2. trains `tiny` with Ray Train on 2 DDP workers (`pipelines.train.launch`): Ray Data prepares the
   samples once, each epoch is checkpointed, the val split is evaluated at the end, and the
   model is registered in MLflow as `rayssd-quickstart`,
3. labels the val split with the new model version on Ray Data (`pipelines.label.launch`),
4. serves that version with Ray Serve (`pipelines.serve.launch`) and sends it one real request,
5. prints a summary (mAP, speeds, where everything is, how to look at it) and stops Ray.

Every run gets its own name (quickstart-YYYYmmdd-HHMMSS), so re-running is safe: the data
are reused, nothing earlier is overwritten, and the `champion` alias only moves to a
better model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from jobs.options import run_job
from pipelines.common import JobError
from pipelines.train.progress import format_duration

DESCRIPTION = """Run the whole of rayssd on this machine: write the built-in dataset, train the
tiny preset with Ray Train on 2 DDP workers (Ray Data prepares the samples), evaluate it,
register it in MLflow, label the val split with Ray Data, serve it with Ray Serve and send
it a real request, then print where everything is, with the expected duration once the
first steps are timed. About 10 minutes on 2 slow AVX2-only CPU cores (training 9000
images x 5 epochs: 10.0 min measured on a Zen 3 EPYC), less on faster ones (--quick: about 2).
Re-running is safe: the dataset is reused and each run has its own name."""

REGISTERED_NAME = "rayssd-quickstart"
WORKERS = 2
# `tiny` on the built-in dataset (tuned by hand, one place). Width 16 trains 2.5-2.9x faster
# per image than the preset's 32 on a Zen 3 core; smaller batches (8 in all) learned more per
# image seen than 16 or 32 in one-process runs. Measured through
# `rayssd train` on a 2-core AMD EPYC (Zen 3, AVX2 only), 2 workers, no augmentation,
# warm-up 0.3 epoch, lr 3e-3, 500 val images: 6000 images x 6 epochs val mAP@0.5 0.884
# (417 s for the command), 9000 x 5 0.905 (511 s). The settings before (width 32, batch
# 8/worker, lr 5e-3, 12000 x 3) reached 0.934; their training took 1410 s on that CPU class.
SETTINGS = [
    "model.width=16",
    "train.epochs=5",
    "train.batch_size=4",
    "train.lr=3e-3",
    "data.augment=false",
    "train.warmup_epochs=0.3",
    "train.eval_every=5",
]
FULL = {"train_images": 9_000, "val_images": 500, "epochs": 5}
QUICK = {"train_images": 512, "val_images": 100, "epochs": 2}  # the system working, a rough model
# what the stages after training (evaluation, registration, labelling, serving) took, in
# training steps at the measured pace: about 70 s at 14 steps/s (Zen 3)
AFTER_TRAINING_STEPS = 1_000
FIRST_STEPS_SKIPPED = 10  # the pace is measured from here (the first steps are slow)
MAP50_GOAL = 0.9  # what the full run reaches (see SETTINGS)
SERVE_START_TIMEOUT_S = 180.0


class QuickstartError(JobError):
    """A stage did not deliver what the next one needs (the message says which)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        default="rayssd-quickstart",
        metavar="DIR",
        help="where the dataset, training runs and labels go (default: ./rayssd-quickstart)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a short run: {QUICK['train_images']} train / {QUICK['val_images']} val images, "
        f"{QUICK['epochs']} epochs (shows the system working; the model is rough)",
    )
    parser.add_argument(
        "--port", type=int, default=8000, help="HTTP port for the endpoint (default: 8000, else a free one)"
    )
    parser.add_argument(
        "--keep-serving",
        type=float,
        default=0.0,
        metavar="S",
        help="keep the endpoint up S seconds after the test request, to try it (default: 0)",
    )
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray started and stopped here)",
    )


def _free_port(host: str, wanted: int) -> int:
    with socket.socket() as s:
        try:
            s.bind((host, wanted))
            return wanted
        except OSError:
            pass
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class _Stages:
    """Numbered stage headers with the time each took."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.perf_counter()
        self.times: dict[str, float] = {}
        self._current: tuple[str, float] | None = None

    def begin(self, name: str, what: str) -> None:
        self.end()
        self.done += 1
        print(f"\n[{self.done}/{self.total}] {what}", flush=True)
        self._current = (name, time.perf_counter())

    def end(self) -> None:
        if self._current is not None:
            name, since = self._current
            self.times[name] = time.perf_counter() - since
            print(f"      ({self.times[name]:.0f} s)", flush=True)
            self._current = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def current(self) -> str | None:
        """The stage under way, if any."""
        return self._current[0] if self._current is not None else None


class _Expectation:
    """Prints, once, when the quickstart should end: the training's pace measured between two
    progress snapshots a quarter of an epoch apart (after the first steps, which are slow),
    the steps still to go, and what the stages after training took on the machine measured
    (`AFTER_TRAINING_STEPS`) at that pace."""

    def __init__(self, stages: _Stages) -> None:
        self.stages, self.printed = stages, False
        self.first: dict[str, Any] | None = None

    def __call__(self, snapshot: dict[str, Any]) -> None:
        if self.printed or snapshot.get("phase") != "train":
            return
        if self.first is None:
            if snapshot["step"] >= FIRST_STEPS_SKIPPED:
                self.first = snapshot
            return
        steps = snapshot["step"] - self.first["step"]
        seconds = snapshot["time"] - self.first["time"]
        if steps < snapshot["steps_per_epoch"] / 4 or seconds <= 0:
            return
        self.printed = True
        per_step = seconds / steps
        training = per_step * (snapshot["epochs"] * snapshot["steps_per_epoch"] - snapshot["step"])
        total = self.stages.elapsed() + training + per_step * AFTER_TRAINING_STEPS
        print(
            f"      expected: training ends in about {format_duration(training)} ({1 / per_step:.1f} steps/s "
            f"measured); the whole quickstart in about {total / 60:.0f} min",
            flush=True,
        )


@dataclasses.dataclass(frozen=True)
class QuickstartOptions:
    """What `rayssd quickstart` was asked for."""

    out: str = "rayssd-quickstart"
    quick: bool = False
    port: int = 8000  # else a free one
    keep_serving_s: float = 0.0
    address: str | None = None


def run(args: argparse.Namespace) -> dict[str, Any]:
    return quickstart(
        QuickstartOptions(
            out=args.out,
            quick=args.quick,
            port=args.port,
            keep_serving_s=args.keep_serving,
            address=args.address,
        )
    )


def quickstart(o: QuickstartOptions) -> dict[str, Any]:
    """The four stages in order (module docstring); returns the summary it prints and writes."""
    import ray

    from pipelines.common import start_ray
    from pipelines.data.builtin import write_builtin
    from pipelines.label.launch import LabelOptions, label
    from pipelines.track.tracker import tracking_uri
    from pipelines.train.launch import TrainOptions
    from pipelines.train.launch import plan as plan_training
    from pipelines.train.launch import run as run_training
    from ssd import config as C

    if o.keep_serving_s < 0:
        raise ValueError("--keep-serving must be >= 0 seconds")
    size = QUICK if o.quick else FULL
    out = Path(o.out).expanduser().resolve()
    name = time.strftime("quickstart-%Y%m%d-%H%M%S")
    uri = tracking_uri()
    stages = _Stages(4)
    print(f"rayssd quickstart{' --quick' if o.quick else ''}: run {name} in {out}; MLflow at {uri}")

    stages.begin("data", f"built-in dataset: {size['train_images']} train + {size['val_images']} val images")
    data_dir = out / ("data-quick" if o.quick else "data")
    written = write_builtin(
        data_dir, seed=0, train_images=size["train_images"], val_images=size["val_images"]
    )
    print(f"      {'reused' if written['skipped'] else 'written to'} {data_dir}", flush=True)
    train_json, val_json = (str(data_dir / "annotations" / f"instances_{s}.json") for s in ("train", "val"))

    started_ray = start_ray(o.address)
    try:
        stages.begin(
            "train", f"train tiny with Ray Train on {WORKERS} DDP workers (Ray Data prepares the samples)"
        )
        epochs = size["epochs"]
        settings = [*SETTINGS, f"train.epochs={epochs}", f"train.eval_every={epochs}"]  # later ones win
        trained = run_training(
            plan_training(
                TrainOptions(
                    data=train_json,
                    val_data=val_json,
                    cfg=C.override(C.preset("tiny"), settings),
                    config_given=True,
                    workers=WORKERS,
                    storage=str(out / "runs"),
                    name=name,
                    register_as=REGISTERED_NAME,
                    scratch_warning=False,  # the built-in scenes: tiny learns them from scratch
                    on_progress=_Expectation(stages),
                )
            )
        )
        registered = trained["registered"]
        if registered is None:
            raise QuickstartError(f"the model was not registered in MLflow at {uri}; see the warnings above")
        model_uri = f"models:/{registered.name}/{registered.version}"

        stages.begin("label", f"label the val split with {model_uri} on Ray Data")
        labels_dir = out / "labels" / name
        labelled = label(
            LabelOptions(
                model=model_uri, input=val_json, out=str(labels_dir), evaluate=True, run_name=f"label-{name}"
            )
        )

        stages.begin("serve", f"serve {model_uri} with Ray Serve and send it a request")
        served = _serve_and_ask(o, model_uri, data_dir)

        stages.end()
        summary = _summary(o, name, out, uri, trained, model_uri, labelled, labels_dir, served, stages)
        print()
        _print_summary(summary)
        (out / f"{name}.json").write_text(json.dumps(summary, indent=2, default=str))
        return summary
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the stage under way has ended its own MLflow run
        raise KeyboardInterrupt(
            f"stopped during {stages.current or 'start-up'}; run it again for a new run "
            f"(the dataset in {data_dir} is reused)"
        ) from None
    finally:
        if started_ray:
            ray.shutdown()


def _serve_and_ask(o: QuickstartOptions, model_uri: str, data_dir: Path) -> dict[str, Any]:
    """Serve `model_uri` in a thread, POST one val image, stop it; the answer and timings."""
    from pipelines.serve.deployments import wait_until_healthy
    from pipelines.serve.launch import ServeOptions, serve

    host = "127.0.0.1"
    port = _free_port(host, o.port)
    options = ServeOptions(model=model_uri, host=host, port=port, metrics_every_s=5.0)
    stop = threading.Event()
    outcome: dict[str, Any] = {}

    def serving() -> None:
        try:
            outcome["result"] = serve(options, stop=stop)
        except BaseException as exc:  # reported by the caller
            outcome["error"] = exc

    thread = threading.Thread(target=serving, name="rayssd-serve", daemon=True)
    thread.start()
    url = f"http://{host}:{port}"
    try:
        _wait_healthy(wait_until_healthy, url, thread, outcome)
        image = sorted((data_dir / "val" / "images").iterdir())[0]
        start = time.perf_counter()
        request = urllib.request.Request(
            f"{url}/detect?score_threshold=0.05&max_detections=5",
            data=image.read_bytes(),
            headers={"Content-Type": "image/jpeg"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        latency_ms = 1000 * (time.perf_counter() - start)
        found = ", ".join(f"{c} {s:.2f}" for c, s in zip(answer["names"], answer["scores"])) or "nothing"
        print(
            f"      POST {url}/detect ({image.name}): {len(answer['scores'])} detections "
            f"in {latency_ms:.0f} ms: {found}"
        )
        if o.keep_serving_s:
            print(f"      serving {url} for {o.keep_serving_s:g} s more (try {url}/docs)", flush=True)
            stop.wait(o.keep_serving_s)
    finally:
        stop.set()
        thread.join(timeout=120)
    if "error" in outcome:
        raise outcome["error"]
    return {
        "url": url,
        "image": str(image),
        "answer": answer,
        "latency_ms": latency_ms,
        **outcome.get("result", {}),
    }


def _wait_healthy(
    wait_until_healthy: Any, url: str, thread: threading.Thread, outcome: dict[str, Any]
) -> None:
    deadline = time.monotonic() + SERVE_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if "error" in outcome:
            raise outcome["error"]
        if not thread.is_alive():
            raise QuickstartError("the endpoint stopped before it answered")
        try:
            wait_until_healthy(url, timeout_s=5)
            return
        except ValueError:
            continue
    raise QuickstartError(f"the endpoint at {url} did not become healthy within {SERVE_START_TIMEOUT_S:g} s")


def _summary(
    o: QuickstartOptions, name, out, uri, trained, model_uri, labelled, labels_dir, served, stages
) -> dict[str, Any]:
    metrics, history = trained["metrics"], trained.get("history") or []
    return {
        "run": name,
        "quick": o.quick,
        "seconds": stages.elapsed(),
        "stage_seconds": stages.times,
        "map50": metrics.get("map50"),
        "map": metrics.get("map"),
        "map50_goal": None if o.quick else MAP50_GOAL,
        "train_images_per_s": history[-1]["images_per_s"] if history else None,  # all workers
        "model_uri": model_uri,
        "champion": trained["registered"].champion,
        "checkpoint": trained.get("checkpoint"),
        "train_mlflow_run": trained.get("mlflow_run_id"),
        "label_images_per_s": labelled["images_per_s"],
        "label_map50": (labelled.get("metrics") or {}).get("map50"),
        "labels": str(labels_dir),
        "serve": {
            "url": served["url"],
            "detections": len(served["answer"]["scores"]),
            "latency_ms": served["latency_ms"],
            "model": served["answer"]["model"],
            "mlflow_run": served.get("run_id"),
        },
        "tracking_uri": uri,
        "out": str(out),
    }


def _print_summary(s: dict[str, Any]) -> None:
    goal = "" if s["map50_goal"] is None else f" (goal >= {s['map50_goal']})"
    tracking = s["tracking_uri"]
    ui = f"mlflow ui --backend-store-uri {tracking}" if not tracking.startswith("http") else tracking
    lines = [
        f"rayssd quickstart {s['run']} done in {s['seconds'] / 60:.1f} min",
        f"  val mAP@0.5 {s['map50']:.3f}{goal}, mAP@[.5:.95] {s['map']:.3f}"
        + (" (--quick: a short run, not trained to accuracy)" if s["quick"] else ""),
        f"  training: {s['train_images_per_s']:.0f} images/s on {WORKERS} workers; labelling: "
        f"{s['label_images_per_s']:.0f} images/s; one request served in {s['serve']['latency_ms']:.0f} ms "
        f"({s['serve']['detections']} detections)",
        f"  model: {s['model_uri']}" + (" (now the champion)" if s["champion"] else " (champion unchanged)"),
        f"  checkpoint: {s['checkpoint']}",
        f"  labels: {s['labels']} (labels/*.parquet, detections.json, samples.jpg)",
        f"  MLflow: {tracking} — open it with: {ui}",
        f"  serve it again: rayssd serve --model models:/{REGISTERED_NAME}@champion",
        "    curl -X POST 'http://127.0.0.1:8000/detect?score_threshold=0.3' "
        "-H 'Content-Type: image/jpeg' --data-binary @image.jpg",
        f"  summary: {s['out']}/{s['run']}.json",
    ]
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> None:
    run_job("quickstart", DESCRIPTION, add_arguments, run, argv)


if __name__ == "__main__":
    main()
