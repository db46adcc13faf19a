"""Matched, non-augmented samples written once, reused by any later run while nothing changed.

`prepare` writes ``OUT/<split>/*.parquet`` with the compact rows of `pipelines.data.samples`
(image_id, width, height, the network input as JPEG ``image_jpeg``, each default box's match
``matches`` int16 [A] with the ``target_boxes`` / ``target_labels`` it indexes, and the
source's boxes, labels and ignore flags for evaluation; zstd-compressed Parquet: fewer bytes
per image than a 640x480 source JPEG at SSD300); ``OUT/reports/<split>/ingest_report.json``
the validation report; ``OUT/manifest.json`` what they were made from:

* ``source_fingerprint`` — sha256 over the annotation files and the (path, size, mtime) of
  every file under the source's root, so an edited label or a replaced image is noticed
  without decoding anything;
* ``sample_hash`` — the config fields that change a sample (input size, default boxes,
  IoU threshold, classes); a new learning rate keeps the samples, a new preset does not;
* ``split_params`` — the seeded val fraction that chose the train / val images;
* per split: rows, Parquet files, problems found at ingest, the split's `DatasetInfo`.

`open_prepared` reads such a folder back as a data source: `rayssd train --data OUT` trains
from it with no resizing or matching (`PreparedSamples.dataset`: a small JPEG decoded and the
targets gathered from the matches, on CPU workers), after `PreparedSamples.check` made sure
the samples fit the run's config. This folder is the only sample cache: `rayssd train` without
augmentation prepares its source into ``STORAGE/samples/`` the same way (`data.cache`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.data.datasets import DatasetInfo, read_dataset
from pipelines.data.samples import preprocess
from pipelines.data.sources import Location, Probe, open_source, resolve_location
from pipelines.data.yolo import dataset_root, is_yolo_file
from ssd import config as C
from ssd.config import with_classes

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# 2: samples keep the source's boxes, labels and ignore flags; 3: images as shown (EXIF
# orientation), JPEGs decoded at a reduced scale (`ssd.image.reduce_for`); 4: compact (the
# input as JPEG, matches instead of targets), zstd
FORMAT_VERSION = 4
PARQUET_COMPRESSION = "zstd"


def sample_hash(cfg: C.Config) -> str:
    """Hash of what a prepared sample depends on (not optimiser or serving settings)."""
    relevant = {
        "image_size": cfg.model.image_size,
        "num_classes": cfg.model.num_classes,
        "class_names": list(cfg.data.class_names),
        "anchors": C.to_dict(cfg)["anchors"],
        "iou_threshold": cfg.train.iou_threshold,
        "format": FORMAT_VERSION,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _source_root(path: str) -> tuple[pafs.FileSystem, str, bool]:
    """(filesystem, root to fingerprint, source is a file). A COCO file's images usually sit
    beside its folder (``coco/annotations/x.json`` + ``coco/val2017``): fingerprint the
    grandparent; a YOLO YAML's dataset root is its ``path``."""
    location = resolve_location(path)
    fs, inner = location.filesystem, location.path
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"data source {path} does not exist")
    is_file = info.type == pafs.FileType.File
    root = os.path.dirname(os.path.dirname(inner)) if is_file else inner
    if is_file and is_yolo_file(inner):  # a YOLO YAML names its dataset's root
        probe = open_source(path)
        dataset = dataset_root(probe.location, probe.yolo)
        fs, root = dataset.filesystem, dataset.path
    return fs, root, is_file


def source_fingerprint(path: str, ignore: tuple[str, ...] = ()) -> str:
    """sha256 over the source's annotation file and the listing of every file under its root.

    `ignore`: folders (paths or URIs) to leave out where they lie inside the source's root: the
    output directory, a run storage beside the data (its checkpoints change every run).
    """
    fs, root, is_file = _source_root(path)
    digest = hashlib.sha256()
    if is_file:  # through its own filesystem: a YOLO YAML's dataset may lie on another
        digest.update(resolve_location(path).read_bytes())
    folders = [resolve_location(folder) for folder in ignore]
    # a folder is compared by its path inside its filesystem, so only one of the source's kind
    ignored = tuple(f.path.rstrip("/") + "/" for f in folders if type(f.filesystem) is type(fs))
    files = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    entries = sorted(
        (f.path, f.size, f.mtime_ns)
        for f in files
        if f.type == pafs.FileType.File and not f.path.startswith(ignored)
    )
    for name, size, mtime in entries:
        digest.update(f"{os.path.relpath(name, root)}\t{size}\t{mtime}\n".encode())
    return digest.hexdigest()


@dataclass
class PrepareResult:
    out_dir: str
    reused: bool
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    manifest: dict[str, Any] = field(default_factory=dict)


def _read_manifest(out: Location) -> dict[str, Any] | None:
    try:
        return json.loads(out.join(MANIFEST).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _parquet_files(split_dir: Location) -> list[str]:
    """The split's Parquet files (paths inside its filesystem), sorted; none if it is missing."""
    if split_dir.file_type() != pafs.FileType.Directory:
        return []
    infos = split_dir.filesystem.get_file_info(pafs.FileSelector(split_dir.path))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))


def _parquet_rows(split_dir: Location) -> tuple[int, int]:
    files = _parquet_files(split_dir)
    fs = split_dir.filesystem
    return sum(pq.ParquetFile(f, filesystem=fs).metadata.num_rows for f in files), len(files)


def prepare(
    source: str | Probe,
    out_dir: str | os.PathLike,
    cfg: C.Config,
    *,
    splits: tuple[str | None, ...] = ("train", "val"),
    strict: bool = False,
    force: bool = False,
    batch_size: int = 32,
    leave_out: tuple[str, ...] = (),
) -> PrepareResult:
    """Validate `source` and write its matched samples per split, or reuse an up-to-date copy.

    A split of None means the whole source. `source` is a path or URI, or its `Probe`
    (`pipelines.data.sources.open_source`): every split then reuses the one parse. Raises
    ValueError for a bad source (see `pipelines.data.datasets.read_dataset`),
    `DataValidationError` in strict mode. `leave_out`: folders besides `out_dir` that the
    source's fingerprint does not cover (`source_fingerprint`).
    """
    start = time.perf_counter()
    probe = source if isinstance(source, Probe) else None
    source = probe.location.uri if probe is not None else str(source)
    out = resolve_location(out_dir)
    fingerprint = source_fingerprint(source, ignore=(out.uri, *leave_out))
    previous = _read_manifest(out)
    split_names = [s or "all" for s in splits]
    split_params = {"val_fraction": cfg.data.val_fraction, "seed": cfg.data.seed}
    if not force and _up_to_date(previous, out, fingerprint, cfg, split_names, split_params):
        log.info("prepared samples in %s are up to date; reusing them", out.uri)
        splits_done = {s: previous["splits"][s] for s in split_names}
        return PrepareResult(out.uri, True, splits_done, time.perf_counter() - start, previous)
    out.filesystem.create_dir(out.path, recursive=True)
    out.join(MANIFEST).delete()  # a half-written cache is never taken for a good one
    manifest: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "source": source,
        "source_fingerprint": fingerprint,
        "split_params": split_params,
        "splits": {},
    }
    info: DatasetInfo | None = None
    for split, name in zip(splits, split_names):
        split_dir, report_dir = out.join(name), out.join("reports", name)
        _clear_split(split_dir)
        if probe is None:  # parsed once, on the first split that needs it
            probe = open_source(source)
        ds, info, report = read_dataset(
            probe,
            split=split,
            strict=strict,
            report_dir=report_dir.uri,
            val_fraction=cfg.data.val_fraction,
            seed=cfg.data.seed,
        )
        split_cfg = with_classes(cfg, info.class_names)
        workers = max(1, min(2, ds.num_blocks()))  # a task per block at most
        samples = preprocess(
            ds, split_cfg, train=False, batch_size=batch_size, workers=workers, annotations=True, compact=True
        )
        samples.write_parquet(split_dir.uri, compression=PARQUET_COMPRESSION)
        rows, files = _parquet_rows(split_dir)
        manifest["splits"][name] = {
            "rows": rows,
            "files": files,
            "images_in_source": report.images_in_source,
            "problems": report.num_problems,
            "report": report_dir.join("ingest_report.json").uri,
            "info": info.to_dict(),
        }
    assert info is not None
    final_cfg = with_classes(cfg, info.class_names)
    manifest.update(
        {
            "sample_hash": sample_hash(final_cfg),
            "config": C.to_dict(final_cfg),
            "info": info.to_dict(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )
    out.join(MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return PrepareResult(out.uri, False, manifest["splits"], time.perf_counter() - start, manifest)


def _up_to_date(
    previous: dict | None,
    out: Location,
    fingerprint: str,
    cfg: C.Config,
    splits: list[str],
    split_params: dict[str, Any],
) -> bool:
    """Same source, same sample-relevant config and split, every split present with all its rows."""
    if not previous or previous.get("source_fingerprint") != fingerprint:
        return False
    if previous.get("format") != FORMAT_VERSION or previous.get("split_params") != split_params:
        return False
    cfg_prev = with_classes(cfg, tuple(previous["info"]["class_names"]))
    if previous.get("sample_hash") != sample_hash(cfg_prev) or not set(splits) <= set(previous["splits"]):
        return False
    return all(_parquet_rows(out.join(s))[0] == previous["splits"][s]["rows"] for s in splits)


def _clear_split(split_dir: Location) -> None:
    for path in _parquet_files(split_dir):
        split_dir.filesystem.delete_file(path)
    split_dir.filesystem.create_dir(split_dir.path, recursive=True)


# --- reading prepared samples back ----------------------------------------------------------


def is_prepared(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder written by `prepare` (it holds a manifest with a sample hash)."""
    try:
        location = resolve_location(path)
    except ValueError:
        return False
    manifest = _read_manifest(location)
    return manifest is not None and "sample_hash" in manifest


def describe_samples(cfg: C.Config) -> str:
    """What a sample depends on, in words, for messages."""
    a = cfg.anchors
    return (
        f"preset {cfg.name} ({cfg.model.image_size}px, {a.num_default_boxes()} default boxes, IoU "
        f"{cfg.train.iou_threshold:g}, {len(cfg.data.class_names)} classes {list(cfg.data.class_names)})"
    )


@dataclass(frozen=True)
class PreparedSamples:
    """A folder `prepare` wrote, as a data source (see the module docstring)."""

    root: Location  # a local folder or one in object storage
    manifest: dict[str, Any]

    @property
    def cfg(self) -> C.Config:
        """The config the samples were prepared with (classes included)."""
        return C.from_dict(self.manifest["config"])

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.manifest["splits"])

    def split_for(self, role: str) -> str:
        """The split that serves as `role` ("train" or "val"): the split of that name, or "all"
        when the whole source was prepared. ValueError when there is neither."""
        for name in (role, "all"):
            if name in self.manifest["splits"]:
                return name
        raise ValueError(
            f"{self.root.uri} holds the prepared splits {list(self.splits)}, none for {role}: prepare "
            f"it with --splits train,val, or give the {role} data separately"
        )

    def info(self, split: str):
        """The split's `DatasetInfo`."""
        from pipelines.data.datasets import DatasetInfo

        return DatasetInfo.from_dict(self.manifest["splits"][split]["info"])

    def rows(self, split: str) -> int:
        return int(self.manifest["splits"][split]["rows"])

    def check(self, cfg: C.Config, what: str = "this run") -> C.Config:
        """`cfg` with the samples' classes; ValueError naming both configs when the samples were
        prepared for another preset, default boxes, IoU threshold or class list."""
        names = tuple(self.manifest["info"]["class_names"])
        wanted = with_classes(cfg, names)
        if list(cfg.data.class_names) not in ([], list(names)):
            wanted = cfg  # the run asks for other classes: let the hashes differ
        if sample_hash(wanted) != self.manifest.get("sample_hash"):
            raise ValueError(
                f"{self.root.uri} holds samples prepared for {describe_samples(self.cfg)}, but {what} "
                f"needs {describe_samples(wanted)}; prepare them again (rayssd prepare --data "
                f"{self.manifest.get('source')} --out {self.root.uri} --preset {cfg.name} --force), or "
                "train from the source itself"
            )
        return wanted

    def read(self, split: str, *, targets: bool = True) -> Any:
        """The split's compact rows as written (`pipelines.data.samples.COMPACT_COLUMNS`, and
        with `targets` the `MATCH_COLUMNS`), a lazy `ray.data.Dataset`; `expand` them, or
        use `dataset`."""
        import ray

        from pipelines.data.samples import COMPACT_COLUMNS, MATCH_COLUMNS

        columns = list(COMPACT_COLUMNS) + (list(MATCH_COLUMNS) if targets else [])
        files = int(self.manifest["splits"][split]["files"])
        # One block per file, as `prepare` wrote them (blocks of the source's rows): the same
        # blocks, so the same shards and batches, as a run that preprocesses the source.
        ds = ray.data.read_parquet(self.root.join(split).uri, override_num_blocks=files)
        return ds.select_columns(columns)

    def dataset(
        self,
        split: str,
        *,
        targets: bool = True,
        workers: int = 1,
        num_cpus: float = 1.0,
        limit: int | None = None,
    ) -> Any:
        """The split's samples as a lazy `ray.data.Dataset` with the columns `preprocess`
        gives (`pipelines.data.samples.expand`); `targets=False` reads and gives the network
        inputs only (evaluation: no matches are read); `limit`: only the first rows read."""
        from pipelines.data.samples import expand

        rows = self.read(split, targets=targets)
        if limit is not None:
            rows = rows.limit(limit)
        return expand(rows, self.cfg, targets=targets, workers=workers, num_cpus=num_cpus)

    def ground_truth(self, split: str, image_ids: set[int] | None = None) -> dict:
        """The split's COCO-format ground truth (`coco_ground_truth`), from the samples' own
        boxes: no annotation file is read. `image_ids`: only those images'."""
        import ray

        from pipelines.data.datasets import coco_ground_truth

        columns = ["image_id", "width", "height", "boxes", "labels", "ignore"]
        rows = ray.data.read_parquet(self.root.join(split).uri).select_columns(columns).iter_rows()
        if image_ids is not None:
            rows = (row for row in rows if int(row["image_id"]) in image_ids)
        named = ({**row, "path": f"{self.root.join(split).uri}#{row['image_id']}"} for row in rows)
        return coco_ground_truth(named, self.info(split))


def open_prepared(path: str | os.PathLike) -> PreparedSamples:
    """The prepared samples at `path`; ValueError when it is not (or no longer) a complete,
    current `prepare` output."""
    root = resolve_location(path)
    manifest = _read_manifest(root)
    if manifest is None or "sample_hash" not in manifest:
        raise ValueError(f"{root.uri} holds no prepared samples (no complete {MANIFEST}); run rayssd prepare")
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"{root.uri} holds samples in format {manifest.get('format')}, this rayssd reads format "
            f"{FORMAT_VERSION}; prepare them again (rayssd prepare ... --force)"
        )
    for split, entry in manifest["splits"].items():
        rows, _ = _parquet_rows(root.join(split))
        if rows != entry["rows"]:
            raise ValueError(
                f"{root.join(split).uri} has {rows} samples, its manifest {entry['rows']}: the folder was "
                "changed after prepare; prepare it again (--force)"
            )
    return PreparedSamples(root, manifest)
