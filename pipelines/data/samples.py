"""Rows → training samples or network inputs on CPU workers: decode, augment, resize, match.

Trainers only run forward and backward; everything here runs in Ray Data `map_batches`
anywhere in the cluster. Input rows follow `pipelines.data.datasets` (``image_id``, ``path``,
``width``, ``height``, ``boxes`` [N, 4] xyxy pixels, ``labels`` [N], ``ignore`` [N]).
Output rows are ``image_id``, ``width``, ``height`` (of the original image) and ``image``
uint8 [3, S, S]; training samples add ``cls_targets`` int16 [A] and ``loc_targets``
float32 [A, 4] (matched to the default boxes), and prepared samples keep the row's
``boxes``, ``labels`` and ``ignore`` for evaluation. Network inputs (evaluation) skip the
matching altogether.

Prepared samples (`pipelines.data.prepare`) are written compact and expanded as they are
read: the input image JPEG-encoded (``image_jpeg``: quality 95, no chroma subsampling; at
300 px from 640x480 photos about two thirds of the source JPEG's bytes and on average 1.2
levels of 255 from the pixels it encodes, `benchmarks.bench_scale`) and, instead of the
targets, ``matches`` int16 [A] (each default box's index into ``target_boxes`` float32
[M, 4] / ``target_labels`` int32 [M], the boxes matching was given; -1 = background).
`expand` turns them back into the same ``image`` / ``cls_targets`` / ``loc_targets``
columns on CPU workers: a JPEG decode and a gather per sample.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow.fs
import torch
from PIL import Image

from pipelines.common import ACTOR_NAMESPACE, keep_freed_memory
from ssd import config as C
from ssd.anchors import default_boxes
from ssd.grid_matching import GridMatcher
from ssd.image import decode_image
from ssd.matching import match_ground_truth, pad_ground_truth, targets_from_matches
from ssd.transforms import eval_transform, rng_for, smallest_object, train_transform

log = logging.getLogger(__name__)

INPUT_COLUMNS = ("image_id", "width", "height", "image")  # network inputs
_ROW_KEYS = ("image_id", "path", "width", "height", "boxes", "labels", "ignore")  # what a sample reads
TARGET_COLUMNS = ("cls_targets", "loc_targets")  # training samples add these
ANNOTATION_COLUMNS = ("boxes", "labels", "ignore")  # prepared samples add these
COMPACT_COLUMNS = ("image_id", "width", "height", "image_jpeg")  # prepared network inputs
MATCH_COLUMNS = ("matches", "target_boxes", "target_labels")  # prepared targets
JPEG_QUALITY = 95  # prepared images: with no chroma subsampling (see the module docstring)


def read_image(path: str, reduce_to: int | None = None) -> np.ndarray:
    """Decode an image file (local path or any pyarrow filesystem URI) to uint8 [H, W, 3] RGB
    (`ssd.image.decode_image`; `reduce_to`: a JPEG possibly at a reduced scale)."""
    if "://" in path:
        fs, inner = pyarrow.fs.FileSystem.from_uri(path)
        with fs.open_input_file(inner) as f:
            return decode_image(f.read(), reduce_to)
    return decode_image(path, reduce_to)


def class_target_dtype(num_classes: int) -> np.dtype:
    """Smallest integer type that holds every class index exactly."""
    return np.dtype(np.int16) if num_classes <= np.iinfo(np.int16).max else np.dtype(np.int32)


class SamplePreprocessor:
    """A batch of source rows → a batch of samples.

    Built once per worker process (default boxes, the grid matcher, allocator settings:
    `preprocess_batch`); each call
    decodes the batch's images, applies `ssd.transforms.train_transform` seeded by
    (seed, epoch, image_id) — so a run repeats exactly — or the deterministic
    `eval_transform`, then matches and encodes the whole batch at once (unless `targets`
    is False: network inputs only). Boxes flagged ``ignore`` (COCO crowd, VOC difficult)
    are left out of the targets; `annotations` passes the row's boxes through unchanged;
    `compact` writes prepared samples: the image as JPEG and the matches, not the targets.
    """

    def __init__(
        self,
        config: dict[str, Any],
        train: bool,
        epoch: int | str = 0,
        threads: int = 1,
        targets: bool = True,
        annotations: bool = False,
        compact: bool = False,
    ):
        self.cfg = C.from_dict(config)
        self.train = train and self.cfg.data.augment
        self.targets, self.annotations, self.compact = targets, annotations, compact
        self.epoch = 0
        # an int fixes the epoch; a str names an `EpochClock` actor the training loop advances
        # (looked up by name on every call: a resumed run makes a new actor of the same name)
        self.clock = epoch if isinstance(epoch, str) else None
        if self.clock is not None:
            _clock_handle(self.clock)  # fail here, naming it, if there is none
        else:
            self.epoch = epoch
        self.size = self.cfg.model.image_size
        self.min_object = smallest_object(self.cfg)
        self.default_boxes = default_boxes(self.cfg)
        self.matcher = GridMatcher.from_config(self.cfg, self.default_boxes) if targets else None
        self.cls_dtype = class_target_dtype(self.cfg.model.num_classes)
        torch.set_num_threads(threads)  # a data worker owns one CPU; no oversubscription
        keep_freed_memory()

    def _sample(self, row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        keep = ~np.asarray(row["ignore"], dtype=bool)
        boxes = np.asarray(row["boxes"], dtype=np.float32).reshape(-1, 4)[keep]
        labels = np.asarray(row["labels"], dtype=np.int64).reshape(-1)[keep]
        if self.train:  # crops zoom in: the full decode
            image = read_image(str(row["path"]))
            rng = rng_for(self.cfg.data.seed, self.epoch, int(row["image_id"]))
            return train_transform(image, boxes, labels, self.size, rng, min_object=self.min_object)
        # Resized to the input next: a JPEG may decode at a reduced scale, boxes follow it.
        image = read_image(str(row["path"]), reduce_to=self.size)
        height, width = image.shape[:2]
        scale = np.array([width / row["width"], height / row["height"]] * 2, np.float32)
        resized, unit_boxes = eval_transform(image, boxes * scale, self.size)
        return resized, unit_boxes, labels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.clock is not None and self.train:
            import ray

            self.epoch = int(ray.get(_clock_handle(self.clock).get.remote()))
        rows = [{key: batch[key][i] for key in _ROW_KEYS} for i in range(len(batch["image_id"]))]
        samples = [self._sample(row) for row in rows]  # decode + augment: per image by nature
        out = {
            "image_id": np.asarray(batch["image_id"], dtype=np.int64),
            "width": np.asarray(batch["width"], dtype=np.int64),
            "height": np.asarray(batch["height"], dtype=np.int64),
        }
        if self.compact:
            out["image_jpeg"] = _objects([encode_jpeg(s[0]) for s in samples])
        else:
            out["image"] = np.stack([np.ascontiguousarray(s[0].transpose(2, 0, 1)) for s in samples])
        if self.targets:
            boxes = [torch.from_numpy(np.ascontiguousarray(s[1], dtype=np.float32)) for s in samples]
            labels = [torch.from_numpy(np.ascontiguousarray(s[2], dtype=np.int64)) for s in samples]
            matches, padded_boxes, padded_labels = match_ground_truth(
                boxes, labels, self.default_boxes, self.cfg.train.iou_threshold, self.matcher
            )
            if self.compact:
                out.update(_compact_matches(matches, boxes, labels, rows))
            else:
                cls_targets, loc_targets = targets_from_matches(
                    matches, padded_boxes, padded_labels, self.default_boxes
                )
                out["cls_targets"] = cls_targets.numpy().astype(self.cls_dtype)
                out["loc_targets"] = loc_targets.numpy()
        if self.annotations:
            for key in ANNOTATION_COLUMNS:
                out[key] = batch[key]
        return out


def _objects(items: list[Any]) -> np.ndarray:
    """A 1-D object array of `items` (bytes, or arrays of differing shapes), one per row."""
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def encode_jpeg(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] RGB -> JPEG bytes at `JPEG_QUALITY`, full-resolution chroma."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buffer.getvalue()


def decode_input(data: bytes) -> np.ndarray:
    """JPEG bytes from `encode_jpeg` -> uint8 [3, H, W] (PIL's libjpeg-turbo decoder)."""
    with Image.open(io.BytesIO(data)) as image:
        return np.ascontiguousarray(np.asarray(image.convert("RGB")).transpose(2, 0, 1))


def _compact_matches(
    matches: torch.Tensor, boxes: list[torch.Tensor], labels: list[torch.Tensor], rows: list[dict]
) -> dict[str, np.ndarray]:
    """The prepared form of a batch's targets (`MATCH_COLUMNS`)."""
    limit = np.iinfo(np.int16).max
    for row, image_boxes in zip(rows, boxes):
        if image_boxes.shape[0] > limit:
            raise ValueError(
                f"image {row['image_id']} ({row['path']}) has {image_boxes.shape[0]} boxes; prepared "
                f"samples hold at most {limit} per image"
            )
    return {
        "matches": matches.numpy().astype(np.int16),
        "target_boxes": _objects([b.numpy().reshape(-1, 4) for b in boxes]),
        "target_labels": _objects([lab.numpy().astype(np.int32) for lab in labels]),
    }


class SampleExpander:
    """A batch of prepared (compact) samples -> the samples `SamplePreprocessor` makes.

    ``image_jpeg`` is decoded to ``image`` uint8 [3, S, S] (`decode_input`); with `targets`,
    ``matches`` and the target boxes become ``cls_targets`` and ``loc_targets`` by
    `ssd.matching.targets_from_matches`, exactly as when they were matched.
    """

    def __init__(self, config: dict[str, Any], targets: bool = True):
        self.cfg = C.from_dict(config)
        self.targets = targets
        self.default_boxes = default_boxes(self.cfg) if targets else None
        self.cls_dtype = class_target_dtype(self.cfg.model.num_classes)
        torch.set_num_threads(1)
        keep_freed_memory()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = [decode_input(data) for data in batch["image_jpeg"]]
        out = {key: np.asarray(batch[key], dtype=np.int64) for key in ("image_id", "width", "height")}
        size = self.cfg.model.image_size
        out["image"] = np.stack(images) if images else np.zeros((0, 3, size, size), dtype=np.uint8)
        if self.targets:
            boxes = [torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4) for b in batch["target_boxes"]]
            labels = [torch.as_tensor(n, dtype=torch.int64).reshape(-1) for n in batch["target_labels"]]
            padded_boxes, padded_labels, _ = pad_ground_truth(boxes, labels)
            matches = torch.from_numpy(np.asarray(batch["matches"], dtype=np.int64))
            cls_targets, loc_targets = targets_from_matches(
                matches, padded_boxes.to(self.default_boxes), padded_labels, self.default_boxes
            )
            out["cls_targets"] = cls_targets.numpy().astype(self.cls_dtype)
            out["loc_targets"] = loc_targets.numpy()
        return out


class EpochClock:
    """The current epoch, held by a named actor so that data workers seed augmentation by
    epoch: Ray Data runs the pipeline afresh each epoch, in workers that don't know which.
    Create with `start_epoch_clock`; the training loop calls ``set`` before each epoch."""

    def __init__(self) -> None:
        self.epoch = 0

    def set(self, epoch: int) -> None:
        self.epoch = epoch

    def get(self) -> int:
        return self.epoch


def start_epoch_clock(name: str) -> Any:
    """Create (or find) the named `EpochClock` actor; returns its handle."""
    import ray

    actor = ray.remote(num_cpus=0)(EpochClock)
    return actor.options(name=name, namespace=ACTOR_NAMESPACE, get_if_exists=True).remote()


def _clock_handle(name: str) -> Any:
    import ray

    try:
        return ray.get_actor(name, namespace=ACTOR_NAMESPACE)
    except ValueError as exc:
        raise ValueError(
            f"no epoch clock actor named {name!r}: call start_epoch_clock({name!r}) first"
        ) from exc


_WORKERS: dict[str, Callable] = {}  # per worker process: see `preprocess_batch`
_KEEP_WORKERS = 4


def _cached(factory: Callable[..., Callable], **settings: Any) -> Callable:
    """The worker process's `factory(**settings)`, built on first use and kept (a few)."""
    import json

    key = json.dumps([factory.__name__, settings], sort_keys=True)
    worker = _WORKERS.get(key)
    if worker is None:
        while len(_WORKERS) >= _KEEP_WORKERS:
            _WORKERS.pop(next(iter(_WORKERS)))
        worker = _WORKERS[key] = factory(**settings)
    return worker


def preprocess_batch(batch: dict[str, np.ndarray], **settings: Any) -> dict[str, np.ndarray]:
    """`SamplePreprocessor(**settings)` as a Ray task: the preprocessor is built once per
    worker process and settings, then reused by every later task there (Ray keeps task
    workers alive).

    Tasks instead of an actor pool because Ray Data starts an actor pool afresh each time a
    dataset runs, and a training run runs its samples once per epoch: new processes that
    import torch and build the default boxes cost seconds per epoch (measured: 4.3 s against
    0.3 s for an epoch of 128 `tiny` samples on 2 cores).
    """
    return _cached(SamplePreprocessor, **settings)(batch)


def expand_batch(batch: dict[str, np.ndarray], **settings: Any) -> dict[str, np.ndarray]:
    """`SampleExpander(**settings)` as a Ray task, built once per process as `preprocess_batch`."""
    return _cached(SampleExpander, **settings)(batch)


def preprocess(
    ds: Any,
    cfg: C.Config,
    *,
    train: bool,
    epoch: int | str = 0,
    batch_size: int = 32,
    workers: int = 2,
    num_cpus: float = 1.0,
    targets: bool = True,
    annotations: bool = False,
    compact: bool = False,
) -> Any:
    """Lazily map a source `ray.data.Dataset` to samples (see module docstring).

    `epoch` is a fixed epoch or the name of an `EpochClock`; at most `workers` tasks run at
    once (`preprocess_batch`), each taking `num_cpus`, which may be fractional to share CPUs
    with co-located trainers. `targets=False` gives network inputs only (no matching:
    evaluation); `annotations` keeps the rows' boxes and `compact` writes the images as JPEG
    and the matches instead of the targets (both: prepared samples).
    """
    from ray.data import TaskPoolStrategy

    return ds.map_batches(
        preprocess_batch,
        fn_kwargs={
            "config": C.to_dict(cfg),
            "train": train,
            "epoch": epoch,
            "targets": targets,
            "annotations": annotations,
            "compact": compact,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=TaskPoolStrategy(size=workers),
        num_cpus=num_cpus,
    )


def expanded_sample_bytes(cfg: C.Config) -> int:
    """Bytes one expanded training sample takes (image, targets, ids)."""
    size, anchors = cfg.model.image_size, cfg.anchors.num_default_boxes()
    return 3 * size * size + anchors * (class_target_dtype(cfg.model.num_classes).itemsize + 16) + 24


def expand(
    ds: Any,
    cfg: C.Config,
    *,
    targets: bool = True,
    batch_size: int = 32,
    workers: int = 2,
    num_cpus: float = 1.0,
) -> Any:
    """Lazily map prepared (compact) samples to the samples `preprocess` makes: network
    inputs, and with `targets` the training targets (see the module docstring). At most
    `workers` tasks at once, each taking `num_cpus` (fractional beside trainers)."""
    from ray.data import TaskPoolStrategy

    return ds.map_batches(
        expand_batch,
        fn_kwargs={"config": C.to_dict(cfg), "targets": targets},
        batch_size=batch_size,
        batch_format="numpy",
        compute=TaskPoolStrategy(size=workers),
        num_cpus=num_cpus,
    )
