"""Model → detections on Ray Data: one detector per actor, fed preprocessed batches.

`detect` maps the samples of `pipelines.preprocess` (``image`` uint8 [3, S, S], ``image_id``,
``width``, ``height`` of the original image) to one row of detections per image:

    image_id  int64
    width     int64          original image, pixels
    height    int64
    boxes     float32 [K, 4] xyxy original pixels; K varies per row and may be 0
    scores    float32 [K]    descending
    labels    int64 [K]      contiguous 1..num_classes-1 (the model's ``dataset["class_names"]``)

`evaluate_dataset` streams those rows into one `ssd.evaluate.CocoEvaluator` on the driver:
workers detect, one place computes mAP with pycocotools.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import torch

from pipelines.datasets import coco_ground_truth, detect_source, read_dataset
from pipelines.preprocess import preprocess
from ssd.detector import Detector
from ssd.evaluate import CocoEvaluator

if TYPE_CHECKING:
    from pipelines.models import LoadedModel

log = logging.getLogger(__name__)

DETECTION_COLUMNS = ("image_id", "width", "height", "boxes", "scores", "labels")
_PASSED_THROUGH = ("image_id", "width", "height")


class BatchDetector:
    """Ray Data callable class: preprocessed samples → detections in original pixels.

    The model is loaded once per actor (`pipelines.models.load_model`); each call runs the
    whole batch through `ssd.detector.Detector` under ``torch.inference_mode()``.
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
    ) -> None:
        from pipelines.models import load_model

        torch.set_num_threads(threads)  # an actor owns its CPUs; no oversubscription
        loaded = load_model(model_uri, tracking_uri=tracking_uri)
        self.detector = Detector(loaded.model.to(device), loaded.cfg)
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


def _per_row(arrays: list[np.ndarray]) -> np.ndarray:
    """An object array [B] holding one array per row, whatever their shapes (Ray Data stores
    it as a tensor column, variable-shaped when the shapes differ)."""
    out = np.empty(len(arrays), dtype=object)
    for i, array in enumerate(arrays):  # element-wise: numpy would merge equal shapes into one array
        out[i] = array
    return out


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
    return samples.map_batches(
        BatchDetector,
        fn_constructor_kwargs={
            "model_uri": model_uri,
            "tracking_uri": tracking_uri,
            "threads": max(1, int(num_cpus)),
            "score_threshold": score_threshold,
            "max_detections": max_detections,
            "device": "cuda" if gpu else "cpu",
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=workers[0], max_size=workers[1]),
        num_cpus=num_cpus,
        num_gpus=1 if gpu else 0,
    )


def pinned_uri(model: LoadedModel) -> str:
    """A URI that names exactly the loaded model: a registry alias resolved to its version, so
    workers cannot load another model if the alias moves while the job runs."""
    if model.name and model.version and model.uri.startswith("models:/"):
        return f"models:/{model.name}/{model.version}"
    return model.uri


def require_labelled_source(source: str) -> str:
    """The kind of `source` ("coco" or "voc"); ValueError for an unusable source or a folder of
    unlabelled images, which has no ground truth to score against."""
    kind = detect_source(source)
    if kind == "folder":
        raise ValueError(
            f"{source} is a folder of unlabelled images; evaluation needs ground truth "
            "(a COCO annotation file or a Pascal VOC root)"
        )
    return kind


def evaluate_dataset(
    source: str,
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
    from pipelines.models import load_model

    require_labelled_source(source)
    model = model if model is not None else load_model(model_uri, tracking_uri=tracking_uri)
    cfg, model_classes = model.cfg, list(model.dataset["class_names"])
    ds, info, _ = read_dataset(
        source, split=split, val_fraction=cfg.data.val_fraction, seed=cfg.data.seed, strict=strict
    )
    if list(info.class_names) != model_classes:
        raise ValueError(
            f"{source} has classes {list(info.class_names)} but model {model.uri} was trained on "
            f"{model_classes}; expected the same classes in the same label order"
        )
    evaluator = CocoEvaluator(coco_ground_truth(ds, info), info.label_to_category_id())
    samples = preprocess(ds, cfg, train=False, batch_size=batch_size, workers=workers)
    rows = detect(
        samples, pinned_uri(model), batch_size=batch_size, workers=workers, tracking_uri=tracking_uri
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
