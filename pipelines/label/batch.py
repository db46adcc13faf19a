"""Model → detections on Ray Data: one detector per actor, fed preprocessed batches.

`detect` maps the samples of `pipelines.data.samples` (``image`` uint8 [3, S, S], ``image_id``,
``width``, ``height`` of the original image) to one row of detections per image:

    image_id  int64
    width     int64          original image, pixels
    height    int64
    boxes     float32 [K, 4] xyxy original pixels; K varies per row and may be 0
    scores    float32 [K]    descending
    labels    int64 [K]      contiguous 1..num_classes-1 (the model's ``dataset["class_names"]``)

`evaluate_dataset` streams those rows into one `ssd.evaluate.CocoEvaluator` on the driver:
workers detect, one place computes mAP with pycocotools.

`label_source` labels every image of a source (`pipelines.data.datasets.read_dataset`: an image
folder, a COCO file or a VOC root, local or a URI): `decode_batch` tasks decode and resize,
`BatchLabeller` actors detect, Ray Data writes Parquet, and the driver turns the Parquet into
a COCO results file. The output directory holds (`outputs.LABEL_OUTPUTS`):

    labels/*.parquet   one row per labelled image, `outputs.LABEL_SCHEMA` (Arrow lists)
    detections.json    COCO results: [{image_id, category_id, bbox [x, y, w, h] px, score}]
    images.json        COCO image info: images [{id, file_name (path), width, height}],
                       categories (the model's), annotations [] — ``COCO(images.json)
                       .loadRes(detections.json)`` joins the two
    errors.json        [{path, image_id, kind, reason}]: images not labelled, and why
    ingest_report.json `pipelines.data.validation.IngestReport` of the source
    samples.jpg        a grid of the first labelled images with their detections
    summary.json       counts, timings, model lineage, mAP with ``evaluate``
    coco-dataset/      with ``dataset_formats``: the detections as a training dataset
    yolo-dataset/      (`pipelines.label.datasets`)

Image ids are the source's: COCO's own ids, a VOC image's place among the annotation files,
and for an image folder 0..N-1 in sorted path order (unreadable files keep their number).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import ray
import torch

from pipelines.data.datasets import DatasetInfo, coco_ground_truth, read_dataset
from pipelines.data.samples import preprocess, read_image
from pipelines.data.sources import Probe, open_source
from pipelines.label import datasets as label_datasets
from pipelines.label import outputs
from pipelines.track.models import pinned_uri
from ssd.evaluate import CocoEvaluator
from ssd.image import network_input

if TYPE_CHECKING:
    from pipelines.track.models import LoadedModel

log = logging.getLogger(__name__)

DETECTION_COLUMNS = ("image_id", "width", "height", "boxes", "scores", "labels")
_PASSED_THROUGH = ("image_id", "width", "height")
# Ray CPUs are logical. Decoding and resizing an image costs a fraction of detecting it (tiny
# preset, one thread: 0.5 ms for a 160 px JPEG, 2 ms for 640 x 480, against ~7 ms) and writing
# Parquet less, so their tasks ask for a quarter CPU each; the detector actors share the rest
# (`detector_cpus`) and run one torch thread each whatever their share. Actors asking for every
# CPU would leave no room for a decode or write task: the stream would stall.
DECODE_CPUS = 0.25
WRITE_CPUS = 0.25


class BatchDetector:
    """Ray Data callable class: preprocessed samples → detections in original pixels.

    The model is loaded once per actor (`pipelines.track.models.load_model`); each call runs the
    whole batch through its detector (`LoadedModel.detector`: torch or ONNX Runtime).
    Thresholds default to the model's ``cfg.inference``.
    """

    def __init__(
        self,
        model_uri: str,
        tracking_uri: str | None = None,
        threads: int = 1,
        score_threshold: float | None = None,
        max_detections: int | None = None,
        device: str = "cpu",
        batch: int = 32,
    ) -> None:
        from pipelines.track.models import load_model

        torch.set_num_threads(threads)  # an actor owns its CPUs; no oversubscription
        loaded = load_model(model_uri, tracking_uri=tracking_uri)
        self.detector = loaded.detector(device=device, threads=threads, batch=batch)
        self.dataset = loaded.dataset  # class_names, category_ids of labels 1..K
        self.score_threshold = score_threshold
        self.max_detections = max_detections

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """batch: ``image`` uint8 [B, 3, S, S], ``image_id`` [B], ``width`` [B], ``height`` [B]
        (original pixels); other columns are ignored. Returns `DETECTION_COLUMNS`, with
        ``boxes``, ``scores`` and ``labels`` as B arrays of K_i rows each."""
        images = batch["image"]
        images = torch.from_numpy(images if images.flags.writeable else images.copy())  # [B, 3, S, S]
        sizes = np.stack([batch["height"], batch["width"]], axis=1).astype(np.int64)  # [B, 2] (h, w)
        detections = self.detector(
            images,
            torch.from_numpy(sizes),
            score_threshold=self.score_threshold,
            max_detections=self.max_detections,
        )
        out = {key: np.asarray(batch[key], dtype=np.int64) for key in _PASSED_THROUGH}
        for key, dtype in (("boxes", np.float32), ("scores", np.float32), ("labels", np.int64)):
            out[key] = _per_row([d[key].numpy().astype(dtype, copy=False) for d in detections])
        return out


class BatchLabeller:
    """Ray Data callable class: `decode_batch` rows → a pyarrow Table of `outputs.LABEL_SCHEMA` rows.

    Takes `BatchDetector`'s arguments and names each label with the model's own classes.
    """

    def __init__(self, **detector_kwargs: Any) -> None:
        self.detector = BatchDetector(**detector_kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        dataset = self.detector.dataset
        return label_table(
            self.detector(batch), batch["path"], dataset["class_names"], dataset["category_ids"]
        )


def _per_row(arrays: list[np.ndarray]) -> np.ndarray:
    """An object array [B] holding one array per row, whatever their shapes (Ray Data stores
    it as a tensor column, variable-shaped when the shapes differ)."""
    out = np.empty(len(arrays), dtype=object)
    for i, array in enumerate(arrays):  # element-wise: numpy would merge equal shapes into one array
        out[i] = array
    return out


def decode_batch(batch: dict[str, np.ndarray], *, image_size: int) -> dict[str, np.ndarray]:
    """Ray Data batch function: source rows (``image_id``, ``path``, ``width``, ``height``) →
    the same columns plus ``image`` uint8 [B, 3, S, S]: each file decoded (`read_image`, a JPEG
    at a reduced scale where the input is much smaller) and made the network's input exactly as
    in evaluation (`ssd.image.network_input`)."""
    images = [network_input(read_image(str(p), reduce_to=image_size), image_size) for p in batch["path"]]
    out = {key: np.asarray(batch[key], dtype=np.int64) for key in _PASSED_THROUGH}
    out["path"] = np.asarray(batch["path"], dtype=object)
    out["image"] = np.stack(images) if images else np.zeros((0, 3, image_size, image_size), np.uint8)
    return out


def label_table(
    detections: dict[str, np.ndarray],
    paths: Sequence[str],
    class_names: Sequence[str],
    category_ids: Sequence[int],
) -> pa.Table:
    """`BatchDetector` output for B images and their paths → B rows of `outputs.LABEL_SCHEMA`.

    Label k (1..K) names ``class_names[k - 1]`` and ``category_ids[k - 1]``.
    """
    counts = np.array([len(s) for s in detections["scores"]], dtype=np.int32)  # [B]
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))

    boxes = _concat(detections["boxes"], np.float32, (4,))  # [M, 4], M = sum of counts
    scores = _concat(detections["scores"], np.float32, ())  # [M]
    labels = _concat(detections["labels"], np.int64, ())  # [M]
    category = np.asarray([0, *category_ids], dtype=np.int64)[labels]  # [M]
    names = np.asarray(["", *class_names], dtype=object)[labels]  # [M]
    corners = pa.FixedSizeListArray.from_arrays(pa.array(boxes.reshape(-1), pa.float32()), 4)
    columns = {
        "image_id": pa.array(np.asarray(detections["image_id"], np.int64)),
        "path": pa.array([str(p) for p in paths], pa.string()),
        "width": pa.array(np.asarray(detections["width"], np.int64)),
        "height": pa.array(np.asarray(detections["height"], np.int64)),
        "boxes": pa.ListArray.from_arrays(offsets, corners),
        "scores": pa.ListArray.from_arrays(offsets, pa.array(scores, pa.float32())),
        "labels": pa.ListArray.from_arrays(offsets, pa.array(labels, pa.int64())),
        "category_ids": pa.ListArray.from_arrays(offsets, pa.array(category, pa.int64())),
        "category_names": pa.ListArray.from_arrays(offsets, pa.array(names, pa.string())),
    }
    return pa.table(columns, schema=outputs.LABEL_SCHEMA)


def _concat(arrays: Sequence[np.ndarray], dtype: type, tail: tuple[int, ...]) -> np.ndarray:
    """Per-row arrays [K_i, *tail] → one array [sum K_i, *tail]."""
    parts = [np.asarray(a, dtype=dtype).reshape(-1, *tail) for a in arrays]
    return np.concatenate(parts) if parts else np.zeros((0, *tail), dtype)


def detector_cpus(cluster_cpus: float, workers: int) -> float:
    """Logical CPUs per detector actor: at most 1, and `workers` actors leave `DECODE_CPUS` +
    `WRITE_CPUS` of the cluster's `cluster_cpus` free for the tasks that feed and drain them."""
    spare = cluster_cpus - DECODE_CPUS - WRITE_CPUS
    if spare <= 0:
        raise ValueError(
            f"a Ray cluster of {cluster_cpus:g} CPUs has no room for detectors beside the decode and write "
            f"tasks ({DECODE_CPUS + WRITE_CPUS:g} CPUs); expected at least 1 CPU"
        )
    return min(1.0, spare / workers)


def _detector_pool(
    samples: ray.data.Dataset,
    detector: type,
    constructor_kwargs: dict[str, Any],
    *,
    batch_size: int,
    workers: tuple[int, int],
    num_cpus: float,
    num_gpus: float,
) -> ray.data.Dataset:
    """`detector` actors (min, max = `workers`) over `samples`, `num_cpus` CPUs (and as many
    torch threads, at least one) and `num_gpus` GPUs each."""
    return samples.map_batches(
        detector,
        fn_constructor_kwargs={
            **constructor_kwargs,
            "threads": max(1, int(num_cpus)),
            "device": "cuda" if num_gpus else "cpu",
            "batch": batch_size,  # the batch its memory layout is chosen for (`ssd.layout`)
        },
        batch_size=batch_size,
        batch_format="numpy",
        # Two tasks in flight keep an actor busy; more would let the first actor up queue
        # blocks its slower-starting peers then wait for.
        compute=ray.data.ActorPoolStrategy(
            min_size=workers[0], max_size=workers[1], max_tasks_in_flight_per_actor=2
        ),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )


def detect(
    samples: ray.data.Dataset,
    model_uri: str,
    *,
    batch_size: int = 32,
    workers: tuple[int, int] = (1, 2),
    num_cpus: float = 1.0,
    tracking_uri: str | None = None,
    use_gpu: bool = False,
    score_threshold: float | None = None,
    max_detections: int | None = None,
) -> ray.data.Dataset:
    """Lazily map preprocessed `samples` to detection rows (module docstring).

    `workers` is the (min, max) size of the autoscaling actor pool, each actor taking
    `num_cpus` CPUs (and torch threads) and, with `use_gpu` on a machine with CUDA, one GPU.
    """
    gpu = use_gpu and torch.cuda.is_available()
    if use_gpu and not gpu:
        log.warning("use_gpu was requested but torch sees no CUDA device here; detecting on CPUs")
    kwargs = {
        "model_uri": model_uri,
        "tracking_uri": tracking_uri,
        "score_threshold": score_threshold,
        "max_detections": max_detections,
    }
    return _detector_pool(
        samples,
        BatchDetector,
        kwargs,
        batch_size=batch_size,
        workers=workers,
        num_cpus=num_cpus,
        num_gpus=1 if gpu else 0,
    )


def label_rows(
    rows: ray.data.Dataset,
    model_uri: str,
    *,
    image_size: int,
    workers: tuple[int, int],
    num_cpus: float,
    batch_size: int = 32,
    decode_cpus: float = DECODE_CPUS,
    num_gpus: float = 0,
    tracking_uri: str | None = None,
    score_threshold: float | None = None,
    max_detections: int | None = None,
) -> ray.data.Dataset:
    """Lazily label source `rows` (`pipelines.data.datasets` columns; boxes are not read): decode
    and resize in `decode_batch` tasks of `decode_cpus` CPUs each, then detect in a pool of
    `BatchLabeller` actors (`_detector_pool`). Returns `outputs.LABEL_SCHEMA` rows.

    Decoding runs in tasks beside the detector actors, so each actor only ever detects;
    `image_size` is the model's input side in pixels.
    """
    samples = rows.map_batches(
        decode_batch,
        fn_kwargs={"image_size": image_size},
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=decode_cpus,
        udf_modifying_row_count=False,
    )
    kwargs = {
        "model_uri": model_uri,
        "tracking_uri": tracking_uri,
        "score_threshold": score_threshold,
        "max_detections": max_detections,
    }
    return _detector_pool(
        samples,
        BatchLabeller,
        kwargs,
        batch_size=batch_size,
        workers=workers,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )


def _worker_uri(model: LoadedModel) -> str:
    """`pinned_uri`, with a checkpoint path made absolute: workers may run in another directory.
    A model in a bucket stays its URI: each worker's node fetches (and caches) its own copy,
    as the driver's local copy is on the driver's disk alone."""
    uri = pinned_uri(model)
    remote = "://" in uri and not uri.startswith("file://")
    return uri if remote or uri.startswith(("models:", "runs:")) else os.path.abspath(model.checkpoint_path)


def require_labelled_source(source: str | Probe) -> Probe:
    """The `Probe` of `source` (its kind: "coco", "voc" or "yolo"; pass it on so the source is parsed
    once); ValueError for an unusable source or a folder of unlabelled images, which has no
    ground truth to score against."""
    probe = open_source(source)
    if probe.kind == "folder":
        raise ValueError(
            f"{probe.location.uri} is a folder of unlabelled images; evaluation needs ground truth "
            "(a COCO annotation file, a YOLO dataset YAML or a Pascal VOC root)"
        )
    return probe


def _evaluator(ds: ray.data.Dataset, info: DatasetInfo, model: LoadedModel, source: str) -> CocoEvaluator:
    """A `CocoEvaluator` holding the ground truth of `ds`; ValueError when the source's classes
    are not the model's (labels would name other categories)."""
    model_classes = list(model.dataset["class_names"])
    if list(info.class_names) != model_classes:
        raise ValueError(
            f"{source} has classes {list(info.class_names)} but model {model.uri} was trained on "
            f"{model_classes}; expected the same classes in the same label order"
        )
    return CocoEvaluator(coco_ground_truth(ds, info), info.label_to_category_id())


def evaluate_dataset(
    source: str | Probe,
    model_uri: str,
    *,
    split: str | None = "val",
    batch_size: int = 32,
    workers: tuple[int, int] = (1, 2),
    tracking_uri: str | None = None,
    strict: bool = False,
    model: LoadedModel | None = None,
) -> dict[str, Any]:
    """COCO bbox metrics of a model on a labelled source (COCO file or VOC root).

    The model (`model` if already loaded from `model_uri`) gives the input size, the
    classes and the fraction split (``cfg.data.val_fraction`` / ``seed``); `split` None is
    the whole source. Raises ValueError when the source's classes are not the model's.

    Returns `CocoEvaluator.summarize`'s dict (``map``, ``map50``, ``map75``, ...,
    ``per_class``, ``per_class50``) plus ``images``, ``detections``, ``seconds`` and
    ``images_per_s`` of the detection pass, ``source``, ``split`` and the model's ``uri``,
    ``name`` and ``version``.
    """
    from pipelines.track.models import load_model

    probe = require_labelled_source(source)
    model = model if model is not None else load_model(model_uri, tracking_uri=tracking_uri)
    cfg = model.cfg
    ds, info, _ = read_dataset(
        probe, split=split, val_fraction=cfg.data.val_fraction, seed=cfg.data.seed, strict=strict
    )
    evaluator = _evaluator(ds, info, model, probe.location.uri)
    inputs = preprocess(ds, cfg, train=False, targets=False, batch_size=batch_size, workers=workers[1])
    rows = detect(
        inputs, pinned_uri(model), batch_size=batch_size, workers=workers, tracking_uri=tracking_uri
    )
    start = time.perf_counter()
    for batch in rows.iter_batches(batch_size=None, batch_format="numpy"):
        evaluator.update(
            batch["image_id"], list(batch["boxes"]), list(batch["scores"]), list(batch["labels"])
        )
    seconds = time.perf_counter() - start
    images = len(evaluator.image_ids)
    metrics = evaluator.summarize()
    metrics.update(
        images=images,
        detections=evaluator.num_detections,
        seconds=seconds,
        images_per_s=images / seconds if seconds > 0 else math.nan,
        source=info.source,
        split=split,
        uri=model.uri,
        name=model.name,
        version=model.version,
    )
    return metrics


# --- labelling a source into an output directory ----------------------------------------


def label_source(
    source: str | Probe,
    model: LoadedModel,
    out: str,
    *,
    batch_size: int = 32,
    workers: int = 2,
    num_cpus: float | None = None,
    num_gpus: float = 0,
    tracking_uri: str | None = None,
    evaluate: bool = False,
    strict: bool = False,
    overwrite: bool = False,
    score_threshold: float | None = None,
    dataset_formats: Sequence[str] = (),
    min_score: float = label_datasets.DEFAULT_MIN_SCORE,
    mlflow_run: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Label every readable image of `source` with `model` and write the files of the module
    docstring to `out` (local or URI; see `outputs.check_output` for `overwrite`).

    Bad images (unreadable, truncated, corrupt, missing; `pipelines.data.validation`) and, in an
    image folder, files without an image extension are listed in ``errors.json``; with
    `strict` the first bad image raises `pipelines.data.datasets.DataValidationError` instead.
    With `evaluate`, the source must be labelled (COCO or VOC) with the model's classes, and
    the summary holds `CocoEvaluator.summarize`'s metrics of the labelled images. Each of
    `dataset_formats` (`pipelines.label.datasets.FORMATS`) also writes the detections scoring
    at least `min_score` as a training dataset (`pipelines.label.datasets`). `workers` detector
    actors take `num_cpus` CPUs each (default `detector_cpus` of the Ray cluster) and
    `num_gpus` GPUs.

    Returns the summary written to ``summary.json``: ``images`` (labelled), ``errors``,
    ``skipped``, ``detections``, ``seconds`` and ``images_per_s`` of the Ray Data pass (decode,
    detect, write Parquet), ``total_seconds`` (reading and checking the source included),
    ``model`` (uri, name, version, run_id, the URI workers loaded), ``input``, ``out``,
    ``files``, ``metrics`` (None without `evaluate`), ``datasets`` (per format: dir, file, images,
    annotations, min_score) and `mlflow_run` as given (the caller's run).
    """
    from pipelines.track.tracker import tracking_uri as resolve_tracking_uri

    start = time.perf_counter()
    location = outputs.check_output(out, overwrite=overwrite)
    probe = require_labelled_source(source) if evaluate else open_source(source)
    outputs.clear_outputs(location)
    ds, info, report = read_dataset(probe, strict=strict, report_dir=location.uri)
    errors = outputs.image_errors(report) + outputs.skipped_files(info)
    outputs.write(location, outputs.ERRORS_FILE, json.dumps(errors, indent=1).encode())
    evaluator = _evaluator(ds, info, model, probe.location.uri) if evaluate else None
    if num_cpus is None:
        num_cpus = detector_cpus(ray.cluster_resources().get("CPU", 0.0), workers)
    # Actors take whole blocks (`read_dataset` makes blocks of 64 rows): an actor beyond one
    # per block would only load the model.
    workers = min(workers, ds.num_blocks())
    rows = label_rows(
        ds,
        _worker_uri(model),
        image_size=model.cfg.model.image_size,
        batch_size=batch_size,
        workers=(workers, workers),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        tracking_uri=resolve_tracking_uri(tracking_uri),
        score_threshold=score_threshold,
    )
    labelled = time.perf_counter()
    rows.write_parquet(
        location.join(outputs.LABELS_DIR).path,
        filesystem=location.filesystem,
        ray_remote_args={"num_cpus": WRITE_CPUS},
    )
    seconds = time.perf_counter() - labelled
    images, detections, samples = outputs.write_results(location, model.dataset, evaluator)
    written = label_datasets.write_datasets(
        location,
        location.join(outputs.LABELS_DIR).path,
        tuple(dataset_formats),
        model.dataset,
        min_score=min_score,
    )
    outputs.write(
        location,
        outputs.SAMPLES_FILE,
        outputs.jpeg(outputs.sample_grid(samples, model.dataset["class_names"])),
    )
    summary = {
        "input": info.source,
        "kind": info.kind,
        "out": location.uri,
        "model": _lineage(model),
        "images": images,
        "errors": sum(1 for e in errors if e["kind"] != outputs.SKIPPED),
        "skipped": sum(1 for e in errors if e["kind"] == outputs.SKIPPED),
        "first_errors": errors[:5],
        "detections": detections,
        "seconds": seconds,
        "images_per_s": images / seconds if seconds > 0 else math.nan,
        "batch_size": batch_size,
        "workers": workers,
        "cpus_per_worker": num_cpus,
        "metrics": outputs.without_text(evaluator.summarize()) if evaluator is not None else None,
        "datasets": written,
        "files": {
            name: location.join(name).uri
            for name in outputs.LABEL_OUTPUTS
            if name not in outputs.DATASET_DIRS or name in {label_datasets.DIRS[f] for f in written}
        },
        "mlflow_run": mlflow_run,
        "total_seconds": time.perf_counter() - start,
    }
    outputs.write(location, outputs.SUMMARY_FILE, json.dumps(outputs.json_safe(summary), indent=2).encode())
    return summary


def _lineage(model: LoadedModel) -> dict[str, Any]:
    """Which model labelled: as given, its registry name and version, its run, as loaded by workers."""
    return {
        "uri": model.uri,
        "name": model.name,
        "version": model.version,
        "run_id": model.run_id,
        "loaded_as": _worker_uri(model),
        "config": model.cfg.name,
    }
