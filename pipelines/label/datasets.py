"""Labels as training datasets (`rayssd label --format coco-dataset|yolo`): the detections
scoring at least ``min_score``, as a dataset that `rayssd train`, CVAT, Label Studio and
Ultralytics read back — the pseudo-label and review loop of batch labelling.

Both layouts hold their own copy of every labelled image (hard links where the source is on
the same local disk), under the image's path relative to the folder all labelled images share:

    coco-dataset/images/<rel>                        the images
    coco-dataset/annotations/instances_default.json  COCO instances: images (the source's ids,
                                                     file_name = <rel>), the model's categories,
                                                     annotations with bbox [x, y, w, h] pixels,
                                                     area, iscrowd 0 and the detection's score
    yolo-dataset/images/<rel>                        the images
    yolo-dataset/labels/<rel without suffix>.txt     "class cx cy w h" normalised to the image,
                                                     class = model label - 1; empty = no object
    yolo-dataset/data.yaml                           names {id: name}; train and val: images

The COCO file is what CVAT's and Label Studio's COCO import takes, and rayssd's COCO reader
finds its images in ``../images``; ``data.yaml`` has no ``path``, so Ultralytics and rayssd
resolve ``images`` beside it. Images without detections above ``min_score`` stay in, with no
objects: a reviewer sees them, and a model trained on them learns that they hold none.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import shutil
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from pipelines.data.sources import Location, resolve_location

log = logging.getLogger(__name__)

FORMATS = ("coco-dataset", "yolo")
DIRS = {"coco-dataset": "coco-dataset", "yolo": "yolo-dataset"}
COCO_FILE = "annotations/instances_default.json"  # CVAT's name for a COCO export's file
YOLO_FILE = "data.yaml"
IMAGES = "images"
DEFAULT_MIN_SCORE = 0.5
COPY_THREADS = 8  # image copies in flight: object stores answer one request at a time per stream


def write_datasets(
    location: Location,
    parquet_dir: str,
    formats: tuple[str, ...],
    dataset: dict,
    *,
    min_score: float = DEFAULT_MIN_SCORE,
) -> dict[str, Any]:
    """Write each of `formats` under `location` from the labelling Parquet at `parquet_dir`
    (rows of `pipelines.label.outputs.LABEL_SCHEMA`). `dataset` is the model's (class_names,
    category_ids). Returns {format: {dir, file, images, annotations}} for the summary."""

    if not formats:
        return {}
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown dataset format(s) {unknown}; expected {', '.join(FORMATS)}")
    table = pads.dataset(parquet_dir, format="parquet", filesystem=location.filesystem)
    paths = table.to_table(columns=["path"]).column("path").to_pylist()
    names = relative_names(paths)
    # Streams are closed (moved into place) only when every image is in: an interrupted or
    # failed run leaves no half-written annotation file.
    with contextlib.ExitStack() as streams, ThreadPoolExecutor(COPY_THREADS) as pool:
        writers = [_WRITERS[fmt](location.join(DIRS[fmt]), dataset, names, streams) for fmt in formats]
        try:
            copies = []
            for batch in table.to_batches():
                copies += _add(batch, writers, names, pool, min_score)
            for copy in copies:
                copy.result()  # an image that cannot be copied fails the run, naming it
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # no queued copy runs after a failure
            raise
        return {fmt: {**writer.close(), "min_score": min_score} for fmt, writer in zip(formats, writers)}


def _add(
    batch: Any, writers: list, names: dict[str, str], pool: ThreadPoolExecutor, min_score: float
) -> list:
    """Add a Parquet batch's rows to each writer (detections scoring `min_score` or more);
    returns the image copies submitted to `pool`."""
    from pipelines.label.outputs import parquet_rows

    copies = []
    for row in parquet_rows(batch):
        keep = row["scores"] >= min_score
        boxes, labels, scores = row["boxes"][keep], row["labels"][keep], row["scores"][keep]
        positive = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # clipped flat: none
        row = {**row, "boxes": boxes[positive], "labels": labels[positive], "scores": scores[positive]}
        name = names[row["path"]]
        for writer in writers:
            if writer.add(row, name):
                copies.append(pool.submit(_copy_image, row["path"], writer.root.join(IMAGES, name)))
    return copies


def relative_names(paths: list[str]) -> dict[str, str]:
    """Each image path (local or URI) → its path relative to the deepest folder all share."""
    if not paths:
        return {}
    inner = {path: resolve_location(path).path for path in paths}
    parents = {posixpath.dirname(p) for p in inner.values()}
    root = posixpath.commonpath(sorted(parents)) if len(parents) > 1 else parents.pop()
    return {path: posixpath.relpath(p, root) for path, p in inner.items()}


def _copy_image(source: str, target: Location) -> None:
    src = resolve_location(source)
    fs = target.filesystem
    fs.create_dir(target.parent.path, recursive=True)
    local = isinstance(src.filesystem, pafs.LocalFileSystem) and isinstance(fs, pafs.LocalFileSystem)
    try:
        if local:
            try:
                os.link(src.path, target.path)  # no second copy of the pixels on the same disk
            except OSError:
                shutil.copyfile(src.path, target.path)
        else:
            pafs.copy_files(
                src.path, target.path, source_filesystem=src.filesystem, destination_filesystem=fs
            )
    except OSError as exc:
        raise OSError(f"cannot copy {src.uri} to {target.uri}: {exc}") from exc


class _Coco:
    def __init__(
        self, root: Location, dataset: dict, names: dict[str, str], streams: contextlib.ExitStack
    ) -> None:
        self.root = root
        self.file = root.join(COCO_FILE)
        self.category = {k: int(c) for k, c in enumerate(dataset["category_ids"], start=1)}
        self.categories = [
            {"id": int(c), "name": n, "supercategory": ""}
            for n, c in zip(dataset["class_names"], dataset["category_ids"])
        ]
        root.filesystem.create_dir(self.file.parent.path, recursive=True)
        self.stream = streams.enter_context(self.file.open_output())
        head = {"info": {"description": "rayssd label"}, "licenses": [], "categories": self.categories}
        self.stream.write(json.dumps(head, indent=1)[:-2].encode() + b',\n "annotations": [')
        self.images: list[dict[str, Any]] = []
        self.annotations = 0

    def add(self, row: dict[str, Any], name: str) -> bool:
        self.images.append(
            {"id": row["image_id"], "file_name": name, "width": row["width"], "height": row["height"]}
        )
        for box, label, score in zip(row["boxes"].tolist(), row["labels"].tolist(), row["scores"].tolist()):
            x, w = _coco_side(box[0], box[2], row["width"])
            y, h = _coco_side(box[1], box[3], row["height"])
            if w <= 0 or h <= 0:  # thinner than the 0.01 px written
                continue
            annotation = {
                "id": self.annotations + 1,
                "image_id": row["image_id"],
                "category_id": self.category[label],
                "bbox": [x, y, w, h],
                "area": round(w * h, 2),
                "iscrowd": 0,
                "score": round(score, 5),
            }
            self.stream.write((b",\n  " if self.annotations else b"\n  ") + json.dumps(annotation).encode())
            self.annotations += 1
        return True

    def close(self) -> dict[str, Any]:
        self.images.sort(key=lambda image: image["id"])
        self.stream.write(b'\n ],\n "images": ' + json.dumps(self.images, indent=1).encode() + b"\n}\n")
        return {
            "dir": self.root.uri,
            "file": self.file.uri,
            "images": len(self.images),
            "annotations": self.annotations,
        }


class _Yolo:
    def __init__(
        self, root: Location, dataset: dict, names: dict[str, str], streams: contextlib.ExitStack
    ) -> None:
        self.root = root
        self.file = root.join(YOLO_FILE)
        self.class_names = list(dataset["class_names"])
        self.images = self.annotations = 0
        # A label file is found by the image's name without its suffix: of a.jpg and a.png in
        # one folder only the first (in path order) can have one; the others are left out, named.
        first: dict[str, str] = {}
        for path, name in sorted(names.items(), key=lambda item: item[1]):
            first.setdefault(posixpath.splitext(name)[0], path)
        self.left_out = set(names) - set(first.values())
        for path in sorted(self.left_out):
            log.warning("yolo dataset: %s left out: another image in its folder has the same name stem", path)

    def add(self, row: dict[str, Any], name: str) -> bool:
        if row["path"] in self.left_out:
            return False
        size = np.array([row["width"], row["height"]] * 2, dtype=np.float64)
        xyxy = np.clip(row["boxes"].astype(np.float64) / size, 0.0, 1.0)
        numbers = [(label, _yolo_numbers(box)) for label, box in zip(row["labels"].tolist(), xyxy.tolist())]
        # A side thinner than the millionth written is no box.
        lines = [f"{label - 1} {text}\n" for label, (text, flat) in numbers if not flat]
        target = self.root.join("labels", posixpath.splitext(name)[0] + ".txt")
        fs = self.root.filesystem
        fs.create_dir(target.parent.path, recursive=True)
        with fs.open_output_stream(target.path) as stream:
            stream.write("".join(lines).encode())
        self.images += 1
        self.annotations += len(lines)
        return True

    def close(self) -> dict[str, Any]:
        import yaml

        names = dict(enumerate(self.class_names))
        text = yaml.safe_dump(
            {"train": IMAGES, "val": IMAGES, "nc": len(names), "names": names}, sort_keys=False
        )
        header = "# rayssd label: detections as a YOLO dataset; paths are relative to this file\n"
        with self.root.filesystem.open_output_stream(self.file.path) as stream:
            stream.write((header + text).encode())
        return {
            "dir": self.root.uri,
            "file": self.file.uri,
            "images": self.images,
            "annotations": self.annotations,
            "left_out": sorted(self.left_out),
        }


def _coco_side(lo: float, hi: float, limit: int) -> tuple[float, float]:
    """(start, length) of a box side in pixels with 2 decimals, such that a reader's
    ``start + length`` stays inside the image (see `_yolo_numbers`)."""
    start = min(max(round(lo, 2), 0.0), float(limit))
    length = round(min(hi, limit) - start, 2)
    while length > 0 and start + length > limit:
        length = round(length - 0.01, 2)
    return start, max(length, 0.0)


def _yolo_numbers(box: list[float]) -> tuple[str, bool]:
    """``cx cy w h`` of an xyxy box in fractions of the image, with 6 decimals, such that a
    reader's ``cx ± w / 2`` stays inside [0, 1]: a side rounded past an edge loses a millionth
    (readers, rayssd's included, report a box past the edge as clipped); and whether a side
    is 0."""
    out = []
    for lo, hi in ((box[0], box[2]), (box[1], box[3])):
        centre, side = float(f"{(lo + hi) / 2:.6f}"), float(f"{hi - lo:.6f}")
        while side > 0 and (centre - side / 2 < 0 or centre + side / 2 > 1):
            side = float(f"{side - 1e-6:.6f}")
        out.append((centre, side))
    (cx, w), (cy, h) = out
    return f"{cx:.6f} {cy:.6f} {w:.6f} {h:.6f}", w <= 0 or h <= 0


_WRITERS = {"coco-dataset": _Coco, "yolo": _Yolo}
