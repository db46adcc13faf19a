"""Readers that turn a detection source into one metadata table on the driver.

A source is recognised by its shape (`detect_source`):

- ``coco``: a ``*.json`` file holding ``images``, ``annotations`` and ``categories``;
- ``voc``: a directory holding ``Annotations/`` and ``JPEGImages/`` (Pascal VOC layout);
- ``yolo``: a ``*.yaml`` / ``*.yml`` file holding ``names`` and ``train`` / ``val`` (Ultralytics
  layout, `pipelines.data.yolo`);
- ``folder``: a directory holding image files at any depth (for labelling; no boxes).

Paths are local paths or URIs that pyarrow's filesystems open (``s3://``, ``gs://``,
``hdfs://``, ``file://``), the same ones Ray Data reads.

Labels are contiguous, 1..K (0 is background). COCO: categories sorted by id, so label k is
the k-th smallest category id (the rule of ``ssd.evaluate.label_to_category_id``), unless
``class_names`` picks categories by name, in that order. VOC (`pipelines.data.voc`): ``class_names``,
by default the 20 Pascal VOC classes in their usual order.

Boxes are xyxy pixels with the image covering [0, W] x [0, H]. COCO's [x, y, w, h] becomes
[x, y, x + w, y + h]. VOC's corners are 1-based inclusive pixel indices, so (xmin, ymin,
xmax, ymax) becomes (xmin - 1, ymin - 1, xmax, ymax), as detectron2's VOC loader does.
``ignore`` is COCO's ``iscrowd`` (COCOeval ignores crowd regions the same way and overrides any
``ignore`` key with it) and VOC's ``difficult``.

Splits: ``split=None`` reads the whole source. VOC reads ``ImageSets/Main/<split>.txt``. COCO
has one split per JSON file; ``split="train"``/``"val"`` instead cuts one file by a seeded
fraction, as does VOC without ``ImageSets/Main``. An image folder has no splits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import posixpath
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from pycocotools.coco import COCO

from pipelines.data.validation import IngestReport

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
COCO_KEYS = ("images", "annotations", "categories")
FRACTION_SPLITS = ("train", "val")
ACCEPTED = (
    "expected a COCO annotation file (*.json with images, annotations and categories), a YOLO "
    "dataset file (*.yaml with names and train / val), a Pascal VOC root (a directory with "
    "Annotations/ and JPEGImages/) or a directory of images "
    f"({', '.join(IMAGE_EXTENSIONS)})"
)
# Where a COCO file's images may live, relative to its folder: COCO's own layout
# (annotations/instances_val2017.json + val2017/), the built-in dataset's
# (annotations/instances_val.json + val/images/) and images/ folders beside or above the file.
_ROOT_CANDIDATES = (
    ".",
    "images",
    "{split}",
    "{split}/images",
    "../{split}",
    "../{split}/images",
    "../images",
    "..",
)
_ROOT_PROBES = 8  # images looked up per candidate


TEMPORARY = ".tmp-"  # in the names `Location.open_output` writes to; a killed writer leaves one


def is_temporary(name: str) -> bool:
    """Whether a file name is one of `Location.open_output`'s temporaries (hidden)."""
    return name.startswith(".") and TEMPORARY in name


@dataclasses.dataclass(frozen=True)
class Location:
    """A file or directory: a pyarrow filesystem, the path inside it, and its URI prefix."""

    filesystem: pafs.FileSystem
    path: str
    prefix: str = ""  # "" for local paths, e.g. "s3://" for URIs

    @property
    def uri(self) -> str:
        """What rows and reports show: an absolute local path or a URI."""
        return self.prefix + self.path

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> Location:
        return dataclasses.replace(self, path=posixpath.dirname(self.path))

    def join(self, *parts: str) -> Location:
        return dataclasses.replace(self, path=posixpath.normpath(posixpath.join(self.path, *parts)))

    def file_type(self) -> pafs.FileType:
        return self.filesystem.get_file_info(self.path).type

    @property
    def is_local(self) -> bool:
        return not self.prefix

    def exists(self) -> bool:
        return self.file_type() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.file_type() == pafs.FileType.File

    def read_bytes(self) -> bytes:
        with self.filesystem.open_input_file(self.path) as handle:
            return handle.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_bytes(self, data: bytes) -> None:
        """Write the whole file at once: locally through a temporary file renamed into place,
        in object storage as one upload (an object appears whole or not at all)."""
        if self.is_local:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = Path(f"{self.path}.tmp-{os.getpid()}")
            try:
                tmp.write_bytes(data)
                os.replace(tmp, self.path)
            finally:
                tmp.unlink(missing_ok=True)  # gone already unless the write failed
            return
        with self.filesystem.open_output_stream(self.path) as handle:
            handle.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    @contextlib.contextmanager
    def open_output(self) -> Iterator[pa.NativeFile]:
        """A stream that writes this file whole or not at all, for output written piece by
        piece: into a temporary name beside it, moved into place when the block ends (locally a
        rename, in object storage a copy inside the store). On an error or an interrupt the
        temporary is removed and a file already at this name is left as it was; a killed
        process leaves no object at all (an upload is only committed when its stream closes)."""
        # hidden (list_files, Ray Data and rayssd's readers skip it), unique to this writer
        tmp = posixpath.join(
            posixpath.dirname(self.path), f".{self.name}{TEMPORARY}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        )
        if self.is_local:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        stream = self.filesystem.open_output_stream(tmp)
        try:
            yield stream
            stream.close()
            self.filesystem.move(tmp, self.path)
        except BaseException:
            with contextlib.suppress(Exception):
                stream.close()  # in object storage this commits the temporary, deleted next
            with contextlib.suppress(Exception):
                self.filesystem.delete_file(tmp)
            raise

    def delete(self) -> None:
        """Remove the file or directory (and what it holds), if it is there."""
        kind = self.file_type()
        if kind == pafs.FileType.Directory:
            self.filesystem.delete_dir(self.path)
        elif kind == pafs.FileType.File:
            self.filesystem.delete_file(self.path)

    def upload(self, local_file: str | os.PathLike) -> None:
        """Copy a local file to this location."""
        if self.is_local:
            self.write_bytes(Path(local_file).read_bytes())
            return
        pafs.copy_files(os.fspath(local_file), self.path, destination_filesystem=self.filesystem)

    def download(self, local_file: str | os.PathLike) -> None:
        """Copy this file to a local one (written whole, then renamed into place: a concurrent
        reader sees the whole file or none; nothing is left behind when the copy fails)."""
        tmp = Path(f"{os.fspath(local_file)}.tmp-{os.getpid()}")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            pafs.copy_files(self.path, str(tmp), source_filesystem=self.filesystem)
            tmp.replace(local_file)
        finally:
            tmp.unlink(missing_ok=True)


def resolve_location(path: str | os.PathLike) -> Location:
    """Local paths become absolute; URIs go through ``pyarrow.fs.FileSystem.from_uri``."""
    text = os.fspath(path)
    if "://" not in text or text.startswith("file://"):
        local = os.path.abspath(os.path.expanduser(text.removeprefix("file://")))
        return Location(pafs.LocalFileSystem(), local)
    try:
        filesystem, fs_path = pafs.FileSystem.from_uri(text)
    except (ValueError, OSError) as exc:
        raise ValueError(f"cannot open {text}: {exc}") from exc
    fs_path = fs_path.rstrip("/") or fs_path
    bare = text.split("?", 1)[0].rstrip("/")
    prefix = bare[: -len(fs_path)] if fs_path and bare.endswith(fs_path) else text.split("://", 1)[0] + "://"
    return Location(filesystem, fs_path, prefix)


# How object stores say they refused a request's credentials or permissions (pyarrow's S3 and
# GCS errors carry the service's error code).
_REFUSED = (
    "ACCESS_DENIED",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "ExpiredToken",
    "InvalidToken",
    "HTTP status 403",
)


def storage_error(exc: OSError) -> str:
    """A filesystem error as one line; where an object store refused the request, what to check."""
    text = " ".join(str(exc).split())
    if _refused(exc):
        text += (
            "; the object store refused these credentials or this path: check AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE; GOOGLE_APPLICATION_CREDENTIALS for gs://) and what "
            "they may read and write in the bucket"
        )
    return text


def checked_location(path: str | os.PathLike, flag: str) -> Location:
    """`resolve_location` of a path a command was given as `flag`, checked before any work
    starts: for a URI, its endpoint answers, its bucket is there and the credentials may look
    into it. ValueError ``FLAG URI: why`` (one line) otherwise."""
    text = os.fspath(path)
    try:
        location = resolve_location(text)
    except ValueError as exc:
        raise ValueError(f"{flag} {text}: {exc}") from None
    if location.is_local:
        return location
    bucket = location.path.split("/", 1)[0]
    try:
        # The path itself first: credentials scoped to a prefix may look there and not at the
        # bucket (HeadBucket needs the right to list all of it).
        if location.file_type() != pafs.FileType.NotFound:
            return location
        try:
            found = location.filesystem.get_file_info(bucket).type != pafs.FileType.NotFound
        except OSError as exc:
            if _refused(exc):  # the path answered; the bucket is not ours to look at
                return location
            raise
    except OSError as exc:
        raise ValueError(f"{flag} {text}: {storage_error(exc)}") from None
    if not found:
        raise ValueError(f"{flag} {text}: no bucket {bucket!r} there")
    return location


def _refused(exc: OSError) -> bool:
    return any(code in str(exc) for code in _REFUSED)


def list_files(location: Location, *, recursive: bool = True) -> list[str]:
    """Paths relative to `location` of the files under it, sorted, hidden ones left out."""
    selector = pafs.FileSelector(location.path, recursive=recursive)
    start = len(location.path.rstrip("/")) + 1
    names = []
    for info in location.filesystem.get_file_info(selector):
        relative = info.path[start:]
        if info.type == pafs.FileType.File and not any(p.startswith(".") for p in relative.split("/")):
            names.append(relative)
    return sorted(names)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


@dataclasses.dataclass
class Probe:
    """What `probe_source` found, kept so that a command parses its source once: the reader
    takes the probe (`pipelines.data.datasets.read_dataset`), every split reuses it."""

    kind: str
    location: Location
    coco: dict | None = None  # the parsed annotation file
    yolo: dict | None = None  # the parsed YOLO dataset YAML
    images: list[str] = dataclasses.field(default_factory=list)  # folder: relative image paths
    _coco_index: COCO | None = dataclasses.field(default=None, repr=False)

    def coco_index(self) -> COCO:
        """pycocotools' index of `coco`, built on first use and kept for the other splits."""
        if self._coco_index is None:
            index = COCO()
            index.dataset = self.coco
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                index.createIndex()
            self._coco_index = index
        return self._coco_index


def open_source(path: str | os.PathLike | Probe) -> Probe:
    """Find out what `path` is (parsing a COCO file once); ValueError naming what was found
    when it is no source. Pass the probe on to `read_dataset` instead of the path; a probe
    given here is returned as it is."""
    if isinstance(path, Probe):
        return path
    location = resolve_location(path)
    try:
        return probe_source(location)
    except OSError as exc:  # unreachable, refused, or unreadable: one line naming the source
        raise ValueError(f"{location.uri}: {storage_error(exc)}") from None


def detect_source(path: str | os.PathLike) -> str:
    """The kind of source at `path`: "coco", "yolo", "voc" or "folder"; ValueError naming what was
    found otherwise."""
    return open_source(path).kind


def probe_source(location: Location) -> Probe:
    file_type = location.file_type()
    if file_type == pafs.FileType.NotFound:
        raise ValueError(f"{location.uri} does not exist; {ACCEPTED}")
    if file_type == pafs.FileType.File:
        from pipelines.data.yolo import is_yolo_file, load_yaml

        if is_yolo_file(location.name):
            return Probe("yolo", location, yolo=load_yaml(location))
        return Probe("coco", location, coco=_load_coco_json(location))
    entries = location.filesystem.get_file_info(pafs.FileSelector(location.path))
    found = {posixpath.basename(e.path): e.type for e in entries}
    if found.get("Annotations") == found.get("JPEGImages") == pafs.FileType.Directory:
        return Probe("voc", location)
    if found.get("manifest.json") == pafs.FileType.File and found.get("reports") == pafs.FileType.Directory:
        raise ValueError(
            f"{location.uri} holds prepared samples (rayssd prepare's output), which only rayssd train "
            "reads; give this command the source itself (COCO file, VOC root or image folder)"
        )
    images = [name for name in list_files(location) if is_image_name(name)]
    labels = sorted(name for name in found if name.lower().endswith(".json") or name == "annotations")
    if images and labels:
        logger.warning(
            "reading %s as a folder of unlabelled images although it holds %s; for COCO pass the "
            "annotation file itself",
            location.uri,
            labels,
        )
    if images:
        return Probe("folder", location, images=images)
    shown = sorted(name + ("/" if t == pafs.FileType.Directory else "") for name, t in found.items())
    hint = ""
    if "Annotations" in found or "JPEGImages" in found:
        hint = " (a Pascal VOC root needs both Annotations/ and JPEGImages/)"
    json_files = [name for name in shown if name.lower().endswith(".json")]
    if json_files:
        hint += f" (for COCO, pass the annotation file itself, e.g. {location.join(json_files[0]).uri})"
    contents = ", ".join(shown[:10]) + (", ..." if len(shown) > 10 else "") if shown else "nothing"
    raise ValueError(f"{location.uri} is a directory holding {contents}{hint}; {ACCEPTED}")


def _load_coco_json(location: Location) -> dict:
    if not location.name.lower().endswith(".json"):
        extension = posixpath.splitext(location.name)[1] or "extension-less"
        raise ValueError(f"{location.uri} is a {extension} file; {ACCEPTED}")
    try:
        doc = json.loads(location.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{location.uri} is not valid JSON ({exc}); {ACCEPTED}") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"{location.uri} holds a JSON {type(doc).__name__}, not an object; {ACCEPTED}")
    missing = [key for key in COCO_KEYS if key not in doc]
    if missing:
        raise ValueError(
            f"{location.uri} is JSON but not a COCO annotation file: it lacks {missing} "
            f"(its keys: {sorted(doc)[:10]}); {ACCEPTED}"
        )
    return doc


def fraction_split(keys: Sequence[Any], split: str, val_fraction: float, seed: int) -> np.ndarray:
    """bool [len(keys)]: which unique `keys` fall in `split` ("train" or "val").

    The keys are sorted, shuffled with ``numpy.random.default_rng(seed)``, and the first
    round(n * val_fraction) are "val", so the result depends only on the set of keys and the seed.
    """
    keys = np.asarray(keys)
    order = np.argsort(keys, kind="stable")
    shuffled = order[np.random.default_rng(seed).permutation(len(keys))]
    val = np.zeros(len(keys), dtype=bool)
    val[shuffled[: round(len(keys) * val_fraction)]] = True
    return val if split == "val" else ~val


@dataclasses.dataclass
class SourceTable:
    """Everything read from a source, before the checks: I images and M boxes."""

    kind: str
    image_root: str  # where image paths were resolved (uri)
    split_method: str  # none | source | fraction
    class_names: tuple[str, ...]
    category_ids: tuple[int, ...]
    category_source: str  # what unknown categories were compared with, for messages
    filesystem: pafs.FileSystem
    image_ids: np.ndarray  # int64 [I]
    paths: list[str]  # [I] local path or URI, as rows show it
    fs_paths: list[str]  # [I] path inside `filesystem`
    widths: np.ndarray  # int64 [I] annotated width in pixels, 0 if not annotated
    heights: np.ndarray  # int64 [I]
    present: np.ndarray  # bool [I] False if already found missing
    annotation_files: list[str]  # [I] file holding each image's boxes
    box_rows: np.ndarray  # int64 [M] image row of each box, -1 for an unknown image
    boxes: np.ndarray  # float64 [M, 4] xyxy pixels, NaN where a coordinate is missing
    labels: np.ndarray  # int64 [M] 1..K, 0 for an unknown category
    ignore: np.ndarray  # bool [M] COCO iscrowd / VOC difficult
    box_refs: list[str]  # [M] where each box came from ("annotation 12", "object 3")
    box_categories: list[Any]  # [M] the category as annotated (COCO id, VOC name)
    orphan_file: str = ""  # file named for boxes without an image
    normalized: bool = False  # boxes in fractions of each image's size (YOLO): pixels after the image check
    dropped: np.ndarray | None = None  # bool [I]: reported and dropped already (unreadable YOLO labels)


def _present(root: Location, fs_paths: list[str]) -> np.ndarray:
    """bool [I]: False for paths under `root` missing from one listing of it; others are left to
    the image check on the workers."""
    inside = root.path.rstrip("/") + "/"
    if root.file_type() != pafs.FileType.Directory:
        return np.array([not p.startswith(inside) for p in fs_paths], dtype=bool)
    listed = {root.join(name).path for name in list_files(root)}
    return np.array([p in listed or not p.startswith(inside) for p in fs_paths], dtype=bool)


def read_coco(
    probe: Probe,
    *,
    split: str | None,
    val_fraction: float,
    seed: int,
    class_names: tuple[str, ...] | None,
    image_root: str | None,
    report: IngestReport,
) -> SourceTable:
    uri = probe.location.uri
    try:
        coco = probe.coco_index()
        entries = coco.dataset["images"]
        raw_ids = np.array([int(entry["id"]) for entry in entries], dtype=np.int64)  # [E]
        file_names = [str(entry["file_name"]) for entry in entries]
        names, category_ids = _coco_categories(coco, uri, class_names)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{uri} is not a valid COCO file: an entry lacks or mistypes {exc}") from exc

    _, first = np.unique(raw_ids, return_index=True)
    kept = np.sort(first)  # entries kept, in file order: the first of each id
    rows = kept if split is None else kept[fraction_split(raw_ids[kept], split, val_fraction, seed)]
    root = resolve_location(image_root) if image_root else _coco_image_root(probe.location, file_names)
    row_of = {int(raw_ids[entry]): row for row, entry in enumerate(rows)}
    repeated = np.setdiff1d(np.arange(len(raw_ids)), first)
    for entry in repeated[np.isin(raw_ids[repeated], raw_ids[rows])]:
        detail = f"image entry {entry} of {uri} repeats id {raw_ids[entry]}; the first entry is kept"
        report.add("duplicate_image_id", root.join(file_names[entry]).uri, raw_ids[entry], detail)

    fs_paths = [root.join(file_names[entry]).path for entry in rows]
    return SourceTable(
        kind="coco",
        image_root=root.uri,
        split_method="none" if split is None else "fraction",
        class_names=names,
        category_ids=category_ids,
        category_source="class_names" if class_names is not None else f"the categories of {uri}",
        filesystem=root.filesystem,
        image_ids=raw_ids[rows],
        paths=[root.prefix + path for path in fs_paths],
        fs_paths=fs_paths,
        widths=np.array([positive_int(entries[e].get("width")) for e in rows], dtype=np.int64),
        heights=np.array([positive_int(entries[e].get("height")) for e in rows], dtype=np.int64),
        present=_present(root, fs_paths),
        annotation_files=[uri] * len(rows),
        orphan_file=uri,
        **_coco_boxes(coco.dataset["annotations"], row_of, set(raw_ids.tolist()), category_ids),
    )


def _coco_categories(
    coco: COCO, uri: str, class_names: tuple[str, ...] | None
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(class names, category ids) in label order 1..K."""
    categories = sorted(coco.loadCats(coco.getCatIds()), key=lambda category: int(category["id"]))
    category_ids = tuple(int(category["id"]) for category in categories)
    names = tuple(str(category["name"]) for category in categories)
    if len(set(category_ids)) != len(category_ids):
        raise ValueError(f"{uri}: category ids {list(category_ids)} repeat; each category needs its own id")
    if class_names is None:
        return names, category_ids
    unknown = [name for name in class_names if name not in names]
    if unknown:
        raise ValueError(f"class_names {unknown} are not categories of {uri}; its categories are {names}")
    return class_names, tuple(category_ids[names.index(name)] for name in class_names)


def _coco_boxes(
    annotations: list[dict], row_of: dict[int, int], all_ids: set[int], category_ids: tuple[int, ...]
) -> dict[str, Any]:
    """The box columns of `SourceTable` for the annotations of the images in `row_of`."""
    label_of = {cid: label for label, cid in enumerate(category_ids, start=1)}
    boxes, labels, ignore, box_rows, refs, cats = [], [], [], [], [], []
    for ann in annotations:
        image_id = ann.get("image_id")
        known = isinstance(image_id, int) and image_id in all_ids
        if known and image_id not in row_of:
            continue  # an image of the other split
        category = ann.get("category_id")
        boxes.append(_coco_xyxy(ann.get("bbox")))
        labels.append(label_of.get(category, 0) if isinstance(category, int) else 0)
        ignore.append(bool(ann.get("iscrowd", 0)))  # COCOeval's ignore flag is iscrowd
        box_rows.append(row_of[image_id] if known else -1)
        refs.append(f"annotation {ann.get('id')} of image {image_id}")
        cats.append(category)
    return {
        "boxes": np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        "labels": np.asarray(labels, dtype=np.int64),
        "ignore": np.asarray(ignore, dtype=bool),
        "box_rows": np.asarray(box_rows, dtype=np.int64),
        "box_refs": refs,
        "box_categories": cats,
    }


def _coco_xyxy(bbox: Any) -> list[float]:
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return [np.nan] * 4
    return [x, y, x + w, y + h]


def positive_int(value: Any) -> int:
    try:
        number = int(float(value))
    except (TypeError, ValueError):
        return 0
    return max(number, 0)


def _coco_image_root(location: Location, file_names: list[str]) -> Location:
    """Where a COCO file's relative ``file_name``s live: of `_ROOT_CANDIDATES` next to the JSON
    file, the one holding most of its first few images."""
    split = posixpath.splitext(location.name)[0].rsplit("_", 1)[-1]  # instances_val2017 -> val2017
    folder = location.parent
    candidates = []
    for relative in _ROOT_CANDIDATES:
        candidate = folder.join(relative.format(split=split))
        if candidate not in candidates:
            candidates.append(candidate)
    sample = [name for name in file_names if not name.startswith("/")][:_ROOT_PROBES]
    if not sample:
        return folder
    infos = folder.filesystem.get_file_info([c.join(name).path for c in candidates for name in sample])
    found = np.array([info.type == pafs.FileType.File for info in infos]).reshape(len(candidates), -1)
    hits = found.sum(axis=1)  # [candidates]
    if max(hits) == 0:
        tried = ", ".join(c.uri for c in candidates)
        raise ValueError(
            f"cannot find the images of {location.uri}: none of {sample[:3]} exists under {tried}; "
            "pass image_root= the folder the file_name entries are relative to"
        )
    return candidates[int(np.argmax(hits))]


def read_folder(probe: Probe, *, class_names: tuple[str, ...] | None) -> SourceTable:
    root = probe.location
    files = [root.join(name) for name in probe.images]
    empty = np.zeros(0, dtype=np.int64)
    names = class_names or ()
    return SourceTable(
        kind="folder",
        image_root=root.uri,
        split_method="none",
        class_names=tuple(names),
        category_ids=tuple(range(1, len(names) + 1)),
        category_source="class_names",
        filesystem=root.filesystem,
        image_ids=np.arange(len(files), dtype=np.int64),
        paths=[f.uri for f in files],
        fs_paths=[f.path for f in files],
        widths=np.zeros(len(files), dtype=np.int64),
        heights=np.zeros(len(files), dtype=np.int64),
        present=np.ones(len(files), dtype=bool),
        annotation_files=[f.uri for f in files],
        box_rows=empty,
        boxes=np.zeros((0, 4)),
        labels=empty,
        ignore=np.zeros(0, dtype=bool),
        box_refs=[],
        box_categories=[],
    )
