"""Precompute matched, non-augmented samples to Parquet, and reuse them while nothing changed.

``OUT/<split>/*.parquet`` holds the rows of `pipelines.preprocess` (image uint8 [3, S, S],
cls_targets, loc_targets, image_id, width, height); ``OUT/reports/<split>/ingest_report.json``
the validation report; ``OUT/manifest.json`` what they were made from:

* ``source_fingerprint`` — sha256 over the annotation files and the (path, size, mtime) of
  every file under the source's root, so an edited label or a replaced image is noticed
  without decoding anything;
* ``sample_hash`` — the config fields that change a sample (input size, default boxes,
  IoU threshold, classes); a new learning rate keeps the cache, a new preset does not;
* per split: rows, Parquet files, problems found at ingest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.datasets import DatasetInfo, read_dataset
from pipelines.preprocess import preprocess
from ssd import config as C

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def with_classes(cfg: C.Config, class_names: tuple[str, ...]) -> C.Config:
    """The config with the dataset's classes (labels 1..K, 0 = background)."""
    return C.override(
        cfg, [f"model.num_classes={len(class_names) + 1}", f"data.class_names={list(class_names)}"]
    )


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
    beside its folder (``coco/annotations/x.json`` + ``coco/val2017``): fingerprint the grandparent."""
    fs, inner = (
        pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), os.path.abspath(path))
    )
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"data source {path} does not exist")
    is_file = info.type == pafs.FileType.File
    root = os.path.dirname(os.path.dirname(inner)) if is_file else inner
    return fs, root, is_file


def source_fingerprint(path: str, ignore: str | None = None) -> str:
    """sha256 over the source's annotation file and the listing of every file under its root.

    `ignore`: a folder to leave out (the output directory, if it lies inside the source).
    """
    fs, root, is_file = _source_root(path)
    digest = hashlib.sha256()
    if is_file:
        with fs.open_input_stream(
            pafs.FileSystem.from_uri(path)[1] if "://" in path else os.path.abspath(path)
        ) as f:
            digest.update(f.read())
    ignored = os.path.abspath(ignore) if ignore and "://" not in ignore else ignore
    files = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    entries = sorted(
        (f.path, f.size, f.mtime_ns)
        for f in files
        if f.type == pafs.FileType.File and not (ignored and f.path.startswith(ignored.rstrip("/") + "/"))
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


def _read_manifest(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _parquet_rows(split_dir: Path) -> tuple[int, int]:
    files = sorted(split_dir.glob("*.parquet"))
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files), len(files)


def prepare(
    source: str,
    out_dir: str | os.PathLike,
    cfg: C.Config,
    *,
    splits: tuple[str | None, ...] = ("train", "val"),
    strict: bool = False,
    force: bool = False,
    batch_size: int = 32,
) -> PrepareResult:
    """Validate `source` and write its matched samples per split, or reuse an up-to-date copy.

    A split of None means the whole source. Raises ValueError for a bad source (see
    `pipelines.datasets.read_dataset`), `DataValidationError` in strict mode.
    """
    start = time.perf_counter()
    out = Path(out_dir).resolve()
    fingerprint = source_fingerprint(source, ignore=str(out))
    previous = _read_manifest(out)
    split_names = [s or "all" for s in splits]
    if not force and _up_to_date(previous, out, fingerprint, cfg, split_names):
        log.info("prepared samples in %s are up to date; reusing them", out)
        splits_done = {s: previous["splits"][s] for s in split_names}
        return PrepareResult(str(out), True, splits_done, time.perf_counter() - start, previous)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # a half-written cache is never taken for a good one
    manifest: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "source": source,
        "source_fingerprint": fingerprint,
        "splits": {},
    }
    info: DatasetInfo | None = None
    for split, name in zip(splits, split_names):
        split_dir, report_dir = out / name, out / "reports" / name
        _clear_split(split_dir)
        ds, info, report = read_dataset(
            source,
            split=split,
            strict=strict,
            report_dir=str(report_dir),
            val_fraction=cfg.data.val_fraction,
            seed=cfg.data.seed,
        )
        split_cfg = with_classes(cfg, info.class_names)
        samples = preprocess(ds, split_cfg, train=False, batch_size=batch_size)
        samples.write_parquet(str(split_dir))
        rows, files = _parquet_rows(split_dir)
        manifest["splits"][name] = {
            "rows": rows,
            "files": files,
            "images_in_source": report.images_in_source,
            "problems": report.num_problems,
            "report": str(report_dir / "ingest_report.json"),
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
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return PrepareResult(str(out), False, manifest["splits"], time.perf_counter() - start, manifest)


def _up_to_date(previous: dict | None, out: Path, fingerprint: str, cfg: C.Config, splits: list[str]) -> bool:
    """Same source, same sample-relevant config, every split present with all its rows."""
    if not previous or previous.get("source_fingerprint") != fingerprint:
        return False
    cfg_prev = with_classes(cfg, tuple(previous["info"]["class_names"]))
    if previous.get("sample_hash") != sample_hash(cfg_prev) or not set(splits) <= set(previous["splits"]):
        return False
    return all(_parquet_rows(out / s)[0] == previous["splits"][s]["rows"] for s in splits)


def _clear_split(split_dir: Path) -> None:
    if split_dir.exists():
        for f in split_dir.iterdir():
            if f.is_file() and f.suffix == ".parquet":
                f.unlink()
    split_dir.mkdir(parents=True, exist_ok=True)
