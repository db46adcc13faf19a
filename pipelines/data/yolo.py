"""YOLO datasets in the Ultralytics layout, read into one `pipelines.data.sources.SourceTable`
(conventions in `pipelines.data.sources`' docstring).

The source is the dataset's YAML file (read with ``yaml.safe_load``: data, never code):

* ``names``: the classes, a list or a dict {class id: name} with ids 0..K-1 (``nc``, if
  given, must agree); class id k is label k + 1;
* ``path``: the dataset root, relative to the YAML file's folder (default: that folder);
* ``train`` / ``val`` / ``test``: each a folder of images, a ``.txt`` file listing image paths
  or a list of those, relative to ``path`` (a ``../x`` that does not exist is tried as ``x``
  inside it, as Ultralytics does). Unlike Ultralytics, a relative ``path`` is taken from the
  YAML's folder (not the working or a datasets directory) and every relative line of an image
  list from the list's folder (not only ``./`` lines). An entry of another split that names
  nothing is skipped with a warning. Pose datasets (``kpt_shape``) are refused.

Each image's labels are the ``.txt`` file at its path with the last ``images`` folder
replaced by ``labels`` (``images/train/a.jpg`` -> ``labels/train/a.txt``); an image without a
label file holds no objects. A line is ``class cx cy w h`` in fractions of the image's width
and height (or ``class x1 y1 x2 y2 ...``, a polygon, boxed by its extremes). Boxes become
pixels once the image check has read each image's displayed size. A line with another count
of numbers is an ``invalid_box``, a class id that is no integer in 0..K-1 an
``unknown_category``; the rest of the file is read.

Splits: ``split=None`` is every image the YAML names (each once); a split name picks that
entry. Image ids are each image's place among all of them, sorted by path, so they are the
same in every split.
"""

from __future__ import annotations

import logging
import posixpath
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from pipelines.data.sources import (
    Location,
    Probe,
    SourceTable,
    _present,
    is_image_name,
    list_files,
    resolve_location,
)
from pipelines.data.validation import IngestReport

logger = logging.getLogger(__name__)

YOLO_SPLITS = ("train", "val", "test")
YAML_EXTENSIONS = (".yaml", ".yml")


def is_yolo_file(name: str) -> bool:
    return name.lower().endswith(YAML_EXTENSIONS)


def load_yaml(location: Location) -> dict:
    """The YAML file as a dict with ``names``; ValueError naming the file and what is wrong."""
    import yaml

    try:
        doc = yaml.safe_load(location.read_bytes())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"{location.uri} is not valid YAML: {exc}") from exc
    if not isinstance(doc, dict) or "names" not in doc:
        keys = sorted(map(str, doc))[:10] if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(
            f"{location.uri} is not a YOLO dataset file: it has no 'names' (found {keys}); expected "
            "names, and train / val entries (folders or lists of images)"
        )
    yolo_class_names(doc, location.uri)  # fail now, before Ray starts
    if "kpt_shape" in doc:
        raise ValueError(
            f"{location.uri} is a YOLO pose dataset (kpt_shape): its label lines hold keypoints, not "
            "detection boxes; give a detection dataset"
        )
    if not any(doc.get(split) for split in YOLO_SPLITS):
        raise ValueError(f"{location.uri} names no images: it has none of {list(YOLO_SPLITS)}")
    return doc


def yolo_class_names(doc: dict, uri: str) -> tuple[str, ...]:
    """The classes in id order, from ``names`` as a list or a dict of ids 0..K-1."""
    names = doc["names"]
    if isinstance(names, dict):
        try:
            by_id = {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError):
            by_id = {}
        if sorted(by_id) != list(range(len(names))):
            shown = sorted(map(str, names))
            raise ValueError(f"{uri}: names has the ids {shown}; expected 0..{len(names) - 1}")
        names = [by_id[i] for i in range(len(by_id))]
    if not isinstance(names, list) or not names or any(not isinstance(n, (str, int)) for n in names):
        raise ValueError(f"{uri}: names must be a non-empty list or dict of class names")
    names = [str(n) for n in names]
    if len(set(names)) != len(names):
        raise ValueError(f"{uri}: names repeats a class: {names}")
    if "nc" in doc and doc["nc"] != len(names):
        raise ValueError(f"{uri}: nc is {doc['nc']} but names lists {len(names)} classes")
    return tuple(names)


def dataset_root(location: Location, doc: dict) -> Location:
    """The folder the YAML's paths are relative to (``path``, itself relative to the YAML's folder)."""
    folder = location.parent
    path = str(doc.get("path") or "")
    if not path:
        return folder
    if "://" in path or posixpath.isabs(path):
        return resolve_location(path)
    return folder.join(path)


def label_path(image_path: str) -> str:
    """Ultralytics' rule: the last ``images`` folder of the path becomes ``labels``, the extension
    ``.txt`` (a path inside a bucket may start with ``images/``)."""
    lead = "" if image_path.startswith("/") else "/"  # so that a leading images/ matches too
    head, sep, tail = (lead + image_path).rpartition("/images/")
    swapped = f"{head}/labels/{tail}" if sep else lead + image_path
    return posixpath.splitext(swapped[len(lead) :])[0] + ".txt"


def _entry_location(root: Location, item: str) -> Location:
    """Where one split entry points: a URI or absolute path as it is, else relative to the root;
    like Ultralytics, a ``../x`` that does not exist is tried as ``x`` inside the root."""
    if "://" in item or posixpath.isabs(item):
        return resolve_location(item)
    where = root.join(item)
    if where.file_type() == pafs.FileType.NotFound and item.startswith("../"):
        inside = root.join(item[3:])
        if inside.file_type() != pafs.FileType.NotFound:
            return inside
    return where


def _split_images(root: Location, entry: Any, uri: str) -> list[str]:
    """Paths inside root's filesystem of the images one split entry names."""
    entries = entry if isinstance(entry, list) else [entry]
    paths: list[str] = []
    for item in map(str, entries):
        where = _entry_location(root, item)
        kind = where.file_type()
        if kind == pafs.FileType.Directory:
            paths += [where.join(name).path for name in list_files(where) if is_image_name(name)]
        elif kind == pafs.FileType.File and where.name.lower().endswith(".txt"):
            for line in where.read_bytes().decode("utf-8").splitlines():  # relative to the list's folder
                line = line.strip()
                if not line or not is_image_name(line):
                    continue
                if "://" in line:
                    paths.append(resolve_location(line).path)
                elif posixpath.isabs(line):
                    paths.append(posixpath.normpath(line))
                else:
                    paths.append(where.parent.join(line.removeprefix("./")).path)
        elif is_image_name(where.name) and kind == pafs.FileType.File:
            paths.append(where.path)
        else:
            raise ValueError(
                f"{uri}: {item!r} ({where.uri}) is no folder of images, image list (.txt) or image"
            )
    return paths


def _split_listings(root: Location, doc: dict, uri: str, split: str | None) -> dict[str, list[str]]:
    """The images each split entry of the YAML names, each entry listed once; an entry of
    another split than `split` that does not exist (exports often name a test folder they
    leave out) is skipped with a warning."""
    listings: dict[str, list[str]] = {}
    for name in YOLO_SPLITS:
        if not doc.get(name):
            continue
        try:
            listings[name] = _split_images(root, doc[name], uri)
        except ValueError:
            if split is None or name == split:
                raise
            logger.warning("%s: the %s entry %r names nothing that exists; skipped", uri, name, doc[name])
    return listings


def read_yolo(
    probe: Probe,
    *,
    split: str | None,
    class_names: tuple[str, ...] | None,
    report: IngestReport,
) -> SourceTable:
    uri = probe.location.uri
    doc = probe.yolo
    root = dataset_root(probe.location, doc)
    names = yolo_class_names(doc, uri)
    if split is not None and not doc.get(split):
        available = [s for s in YOLO_SPLITS if doc.get(s)]
        raise ValueError(f"{uri} has no {split!r} entry; its splits: {available}")
    listings = _split_listings(root, doc, uri, split)
    every = sorted({path for paths in listings.values() for path in paths})
    id_of = {path: index for index, path in enumerate(every)}
    wanted = every if split is None else sorted(set(listings[split]))
    picked = class_names if class_names is not None else names
    unknown = [name for name in picked if name not in names]
    if unknown:
        raise ValueError(f"class_names {unknown} are not classes of {uri} (its names: {list(names)})")
    label_of = {k: picked.index(name) + 1 for k, name in enumerate(names) if name in picked}

    filesystem = root.filesystem
    label_files = [label_path(path) for path in wanted]
    existing = _existing(filesystem, label_files)
    boxes, labels, rows, refs, categories = [], [], [], [], []
    dropped = np.zeros(len(wanted), dtype=bool)
    for row, label_file in enumerate(label_files):
        if label_file not in existing:
            continue  # no label file: an image with no objects
        try:
            with filesystem.open_input_file(label_file) as handle:
                text = handle.read().decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            report.add(
                "unreadable", root.prefix + label_file, id_of[wanted[row]], f"cannot read the labels: {exc}"
            )
            dropped[row] = True  # its objects are unknown: not an image without any
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            values = line.split()
            if not values:
                continue
            box = _box(values[1:])
            ref = f"{posixpath.basename(label_file)} line {number}"
            if np.isnan(box).any():
                ref += f" ({line.strip()!r}: expected class cx cy w h, or class and a polygon's x y pairs)"
            refs.append(ref)
            rows.append(row)
            categories.append(values[0])
            labels.append(label_of.get(_class_id(values[0], len(names)), 0))
            boxes.append(box)
    paths = [root.prefix + path for path in wanted]
    return SourceTable(
        kind="yolo",
        image_root=root.uri,
        split_method="none" if split is None else "source",
        class_names=tuple(picked),
        category_ids=tuple(range(1, len(picked) + 1)),
        category_source=f"the {len(names)} classes of {uri} (ids 0..{len(names) - 1})",
        filesystem=filesystem,
        image_ids=np.asarray([id_of[path] for path in wanted], dtype=np.int64),
        paths=paths,
        fs_paths=list(wanted),
        widths=np.zeros(len(wanted), dtype=np.int64),  # YOLO labels carry no size: read from the image
        heights=np.zeros(len(wanted), dtype=np.int64),
        present=_present(root, wanted),
        annotation_files=[root.prefix + f for f in label_files],
        box_rows=np.asarray(rows, dtype=np.int64),
        boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        labels=np.asarray(labels, dtype=np.int64),
        ignore=np.zeros(len(rows), dtype=bool),
        box_refs=refs,
        box_categories=categories,
        normalized=True,
        dropped=dropped,
    )


def _class_id(token: str, count: int) -> int:
    """The class id of a line's first value, or -1 when it is no integer in 0..count-1."""
    try:
        value = float(token)
    except ValueError:
        return -1
    return int(value) if value.is_integer() and 0 <= value < count else -1


def _box(values: list[str]) -> list[float]:
    """xyxy in fractions of the image from ``cx cy w h`` or a polygon; NaN for another count."""
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        return [float("nan")] * 4
    if len(numbers) == 4:
        cx, cy, w, h = numbers
        return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    if len(numbers) >= 6 and len(numbers) % 2 == 0:
        xs, ys = numbers[0::2], numbers[1::2]
        return [min(xs), min(ys), max(xs), max(ys)]
    return [float("nan")] * 4


def _existing(filesystem: pafs.FileSystem, paths: list[str]) -> set[str]:
    """Which of `paths` exist, from one listing per folder."""
    found: set[str] = set()
    for folder in sorted({posixpath.dirname(p) for p in paths}):
        try:
            infos = filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        except OSError as exc:
            raise ValueError(f"cannot list {folder}: {exc}") from exc
        found |= {info.path for info in infos if info.type == pafs.FileType.File}
    return found
