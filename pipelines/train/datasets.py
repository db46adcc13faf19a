"""What a training run reads: training samples and the val split's network inputs.

From a source (COCO file, VOC root) or from prepared samples (`pipelines.data.prepare`):

* prepared samples (``--data OUT`` of `rayssd prepare`) are read once into Ray's object
  store as written (compact: the input as a small JPEG, the matches) and expanded by CPU
  workers (`pipelines.data.samples.expand`: a JPEG decode and a gather of the targets, no
  resizing or matching): once, before training, when the expanded samples fit in half of
  the object store, else during every epoch; `PreparedSamples.check` refuses samples made
  for another preset or class list;
* without augmentation (``data.augment=false``) and with ``data.cache`` a source is prepared
  once into ``STORAGE/samples/`` and read back the same way, by this run and any later one
  (`prepare` notices a changed source or config and rebuilds);
* with augmentation every epoch draws new samples from the source rows on CPU workers
  (`pipelines.data.samples.preprocess`, seeded by the epoch clock).

Each source is parsed once (its `Probe` is reused for every split), val inputs never carry
matching targets, and the val ground truth comes from the rows or the prepared samples, not
from another read of the annotation file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.data.datasets import DatasetInfo, coco_ground_truth, read_dataset
from pipelines.data.prepare import PreparedSamples, open_prepared, prepare, sample_hash
from pipelines.data.samples import expand, expanded_sample_bytes, preprocess
from pipelines.data.sources import Location, Probe
from ssd import config as C
from ssd.config import with_classes

log = logging.getLogger(__name__)

FIT_IMAGES = 128  # training images the final model is also scored on: does it fit its data?
EXPAND_ONCE_SHARE = 0.5  # expanded training samples kept in the object store up to this share of it
CACHE_FOLDER = "samples"  # STORAGE/samples/<source>-<digest>: the prepared samples of a source


@dataclasses.dataclass(frozen=True)
class Source:
    """One ``--data`` / ``--val-data`` argument, looked at once before Ray starts: prepared
    samples, or a source with its parsed `Probe`."""

    given: str
    probe: Probe | None = None
    prepared: PreparedSamples | None = None

    @property
    def uri(self) -> str:
        return self.prepared.root.uri if self.prepared is not None else self.probe.location.uri


def open_training_source(path: str) -> Source:
    """`path` as a training source; ValueError naming what is wrong (checked before Ray starts)."""
    from pipelines.data.prepare import is_prepared
    from pipelines.data.sources import open_source

    if is_prepared(path):
        return Source(path, prepared=open_prepared(path))
    probe = open_source(path)
    if probe.kind == "folder":
        raise ValueError(f"{path} is a folder of unlabelled images; training needs COCO, YOLO or VOC labels")
    return Source(path, probe=probe)


@dataclasses.dataclass
class TrainData:
    """What the trainer reads, decided on the driver."""

    cfg: C.Config  # the run's config with the dataset's classes
    info: DatasetInfo  # the training data's
    train: Any  # ray.data.Dataset of training samples (image, cls_targets, loc_targets, ...)
    val: Any  # ray.data.Dataset of val network inputs (image_id, width, height, image)
    ground_truth: dict  # the val split in COCO format
    num_train: int
    num_val: int
    prepared: bool  # training reads prepared samples (given, or prepared by this run)
    # network inputs of the first training images (up to FIT_IMAGES, as evaluated: no
    # augmentation) and their ground truth: the final model is scored on them too
    fit: Any = None
    fit_ground_truth: dict | None = None
    num_fit: int = 0

    def val_parts(self, workers: int) -> list[Any]:
        """The val inputs cut into one contiguous part per rank (rank r evaluates part r)."""
        return _parts(self.val, self.num_val, workers)

    def fit_parts(self, workers: int) -> list[Any]:
        """The fit inputs cut like `val_parts`."""
        return _parts(self.fit, self.num_fit, workers)


def _parts(dataset: Any, rows: int, workers: int) -> list[Any]:
    cuts = [rows * r // workers for r in range(1, workers)]
    return dataset.split_at_indices(cuts) if cuts else [dataset]


def training_data(
    data: Source,
    val_data: Source | None,
    cfg: C.Config,
    *,
    storage: Location,
    epoch_clock: str | None,
    data_cpus: float,
) -> TrainData:
    """Training samples and val inputs for `cfg` (see the module docstring). Without
    `val_data` the val split is the source's own (VOC ImageSets, a seeded fraction of a
    COCO file, or the val split of prepared samples)."""
    if cfg.data.augment and data.prepared is not None:
        print("note: training from prepared samples, which are not augmented: data.augment=false", flush=True)
        cfg = C.override(cfg, ["data.augment=false"])
    cache = cfg.data.cache and not cfg.data.augment
    # beside --val-data the whole source trains, except a YOLO YAML's train split, which names
    # its own val and test images apart
    whole = "train" if data.probe is not None and data.probe.kind == "yolo" else None
    own_splits = ((whole or "all"),) if val_data is not None else ("train", "val")
    prepared = _prepared(data, cfg, storage, own_splits) if cache or data.prepared else None
    if prepared is not None:
        cfg = prepared.check(cfg)
        split = prepared.split_for("train")
        info = prepared.info(split)
        samples = _expanded(prepared, split, cfg, data_cpus)
        fit = prepared.dataset(split, targets=False, num_cpus=data_cpus, limit=FIT_IMAGES).materialize()
        # read off the materialised blocks: no Ray Data operator (an aggregate such as `unique`
        # asks a whole CPU, which a Tune trial's placement group does not have)
        fit_ids = {int(i) for batch in fit.iter_batches(batch_size=None) for i in batch["image_id"]}
        fit_ground_truth = prepared.ground_truth(split, image_ids=fit_ids)
    else:
        rows, info, _ = read_dataset(data.probe, split=whole if val_data else "train", **_split_args(cfg))
        cfg = with_classes(cfg, info.class_names)
        samples = preprocess(rows, cfg, train=True, epoch=epoch_clock, workers=2, num_cpus=data_cpus)
        fit_rows = rows.limit(FIT_IMAGES).materialize()
        fit = preprocess(fit_rows, cfg, train=False, targets=False, workers=1, num_cpus=data_cpus)
        fit, fit_ground_truth = fit.materialize(), coco_ground_truth(fit_rows, info)

    if val_data is None and prepared is not None:
        val = prepared
        if "val" not in val.splits:
            raise ValueError(
                f"{data.uri} holds no prepared val split (only {list(val.splits)}); pass --val-data"
            )
    elif val_data is not None and (cache or val_data.prepared):
        val = _prepared(val_data, cfg, storage, ("all",))
        val.check(cfg, what=f"--data {data.given}")
    else:
        val = None
    if val is not None:
        split = val.split_for("val")
        val_info, inputs, ground_truth = (
            val.info(split),
            val.dataset(split, targets=False, num_cpus=data_cpus),
            val.ground_truth(split),
        )
    else:
        source = val_data or data
        rows, val_info, _ = read_dataset(source.probe, split=None if val_data else "val", **_split_args(cfg))
        rows = rows.materialize()
        inputs = preprocess(rows, cfg, train=False, targets=False, workers=1, num_cpus=data_cpus)
        ground_truth = coco_ground_truth(rows, val_info)
    if tuple(val_info.class_names) != tuple(info.class_names):
        raise ValueError(
            f"--val-data classes {list(val_info.class_names)} differ from --data classes "
            f"{list(info.class_names)}"
        )
    return TrainData(
        cfg=cfg,
        info=info,
        train=samples,
        val=inputs.materialize(),
        ground_truth=ground_truth,
        num_train=info.num_images,
        num_val=val_info.num_images,
        prepared=prepared is not None,
        fit=fit,
        fit_ground_truth=fit_ground_truth,
        num_fit=len(fit_ground_truth["images"]),
    )


def sanity_data(
    data: Source, cfg: C.Config, *, images: int, repeats: Callable[[int], int], data_cpus: float
) -> TrainData:
    """`rayssd train --sanity`: the first `images` training images of `data`, unaugmented,
    trained on `repeats(count)` times per epoch (count: the images found, at most `images`)
    and evaluated as the val split (and the fit set): can the preset fit them at all?
    (`pipelines.train.sanity`)"""
    if data.prepared is not None:
        raise ValueError(
            f"--sanity trains on a source's own images (COCO, YOLO or VOC); {data.given} holds prepared "
            "samples: give the source they were prepared from"
        )
    cfg = C.override(cfg, ["data.augment=false"])
    rows, info, _ = read_dataset(data.probe, split="train", **_split_args(cfg))
    cfg = with_classes(cfg, info.class_names)
    rows = rows.limit(images).materialize()
    count = rows.count()
    times = repeats(count)
    samples = preprocess(rows, cfg, train=True, epoch=0, workers=1, num_cpus=data_cpus).materialize()
    if times > 1:
        samples = samples.union(*[samples] * (times - 1)).materialize()
    inputs = preprocess(rows, cfg, train=False, targets=False, workers=1, num_cpus=data_cpus).materialize()
    ground_truth = coco_ground_truth(rows, info)
    return TrainData(
        cfg=cfg,
        info=info,
        train=samples,
        val=inputs,
        ground_truth=ground_truth,
        num_train=count * times,
        num_val=count,
        prepared=False,
        fit=inputs,
        fit_ground_truth=ground_truth,
        num_fit=count,
    )


def _into_object_store(samples: Any, where: str) -> Any:
    """`samples` read once into Ray's object store (spilled to disk by Ray when it is full).

    Read now, while no trainer holds CPUs: Ray Data's Parquet reads in Ray 2.60 ask a whole
    CPU per listing task whatever `num_cpus` says, so a read streamed during training never
    starts on a machine whose CPUs the trainers took (two workers on two cores)."""
    start = time.perf_counter()
    # In file order, which is the source's: the same batches every run, as from the source.
    samples.context.execution_options.preserve_order = True
    samples = samples.materialize()
    log.info("read the prepared samples of %s in %.1f s", where, time.perf_counter() - start)
    return samples


def expand_once(rows: int, cfg: C.Config, object_store_bytes: float) -> bool:
    """Whether `rows` expanded samples fit in `EXPAND_ONCE_SHARE` of the object store."""
    return rows * expanded_sample_bytes(cfg) <= EXPAND_ONCE_SHARE * object_store_bytes


def _expanded(prepared: PreparedSamples, split: str, cfg: C.Config, data_cpus: float) -> Any:
    """The split's training samples: its compact rows read into the object store, expanded
    there once when that fits (`expand_once`: each epoch then only reads them, as fast as
    training can go), else expanded by CPU workers during every epoch."""
    import ray

    compact = _into_object_store(prepared.read(split), prepared.root.join(split).uri)
    rows, store = prepared.rows(split), ray.cluster_resources().get("object_store_memory", 0.0)
    once = expand_once(rows, cfg, store)
    workers = max(1, min(2, compact.num_blocks()))  # a task per block at most
    samples = expand(compact, cfg, targets=True, workers=workers, num_cpus=1.0 if once else data_cpus)
    samples.context.execution_options.preserve_order = True  # the same batches every run
    gib = rows * expanded_sample_bytes(cfg) / 2**30
    if once:  # now, while no trainer holds CPUs
        start = time.perf_counter()
        samples = samples.materialize()
        log.info("expanded %d samples (%.2f GiB) once in %.1f s", rows, gib, time.perf_counter() - start)
    else:
        print(
            f"{rows} expanded samples would take {gib:.1f} GiB, more than {EXPAND_ONCE_SHARE:.0%} of the "
            f"object store ({store / 2**30:.1f} GiB): CPU workers expand them during every epoch",
            flush=True,
        )
    return samples


def _split_args(cfg: C.Config) -> dict[str, Any]:
    return {"val_fraction": cfg.data.val_fraction, "seed": cfg.data.seed}


def _prepared(source: Source, cfg: C.Config, storage: Location, splits: tuple[str, ...]) -> PreparedSamples:
    """The source's prepared samples: as given, or prepared now (or reused) under STORAGE."""
    if source.prepared is not None:
        return source.prepared
    out = cache_folder(storage, source.uri, cfg)
    wanted = tuple(None if s == "all" else s for s in splits)
    print(f"preparing the samples of {source.uri} once (no augmentation) in {out.uri}", flush=True)
    # the storage may lie inside the data's root (s3://BUCKET/coco/x.json, s3://BUCKET/runs):
    # its checkpoints are no part of the source
    result = prepare(source.probe, out.uri, cfg, splits=wanted, leave_out=(storage.uri,))
    rows = sum(entry["rows"] for entry in result.splits.values())
    verb = "reused" if result.reused else "prepared"
    print(f"{verb} {rows} samples in {result.seconds:.1f} s; every epoch reads them back", flush=True)
    return open_prepared(out.uri)


def cache_folder(storage: Location, source_uri: str, cfg: C.Config) -> Location:
    """STORAGE/samples/<name>-<digest>: one folder per source and sample-relevant config
    (without the classes, which come from the source), so runs of other presets keep theirs."""
    digest = hashlib.sha256(json.dumps([source_uri, sample_hash(cfg)]).encode()).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(source_uri.rstrip("/")).stem)[:40] or "source"
    return storage.join(CACHE_FOLDER, f"{stem}-{digest}")
