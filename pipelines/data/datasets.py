"""Detection datasets as Ray Data: one row per image, validated once at ingest.

`read_dataset` takes a COCO annotation file, a YOLO dataset YAML (`pipelines.data.yolo`), a
Pascal VOC root or a folder of images (local
path or any pyarrow filesystem URI Ray Data reads; see `pipelines.data.sources` for labels, box
conventions and splits) and returns a `ray.data.Dataset` of rows

    image_id  int64
    path      str            absolute local path or URI of the image file
    width     int64          width in pixels as displayed (EXIF orientation applied)
    height    int64          height in pixels as displayed
    boxes     float32 [N, 4] xyxy pixels inside [0, W] x [0, H]; N may be 0
    labels    int64 [N]      contiguous 1..K (0 is background and never appears)
    ignore    bool [N]       COCO iscrowd / VOC difficult: for evaluation, not for training

with a `DatasetInfo` and an `IngestReport`. Annotations are parsed and checked on the driver
(vectorised with numpy); every image is read and decoded once, in parallel, by a Ray Data
``map_batches`` pass on the workers. The pass runs eagerly and returns only sizes and problems
(a few numbers per image), so the report's counts are exact when `read_dataset` returns and the
rows are built once from the driver's table. The checks and their rules are in
`pipelines.data.validation`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.data.extensions import ArrowVariableShapedTensorArray

from pipelines.data.sources import (
    FRACTION_SPLITS,
    Probe,
    SourceTable,
    detect_source,
    open_source,
    read_coco,
    read_folder,
)
from pipelines.data.validation import (
    BOX_KINDS,
    BOX_OK,
    REPORT_FILE,
    DataValidationError,
    IngestReport,
    box_kind,
    check_boxes,
    check_images_batch,
    describe_box,
)
from pipelines.data.voc import read_voc
from pipelines.data.yolo import read_yolo

__all__ = [
    "ROW_COLUMNS",
    "DataValidationError",
    "DatasetInfo",
    "IngestReport",
    "coco_ground_truth",
    "detect_source",
    "open_source",
    "read_dataset",
]

logger = logging.getLogger(__name__)

KINDS = ("coco", "voc", "yolo", "folder")
SPLIT_METHODS = ("none", "source", "fraction")
ROW_COLUMNS = ("image_id", "path", "width", "height", "boxes", "labels", "ignore")
# Rows per block of the returned dataset: small enough that a few hundred images already spread
# decoding and augmentation over several CPU workers.
_ROWS_PER_BLOCK = 64
_CHECK_ROWS_PER_BLOCK = 32
_MAX_BLOCKS = 4096
_CLIPPED = BOX_KINDS.index("clipped") + 1


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is, for manifests, checkpoints and MLflow; label k is class_names[k - 1]."""

    kind: str  # coco | voc | folder
    source: str  # the source as given, made absolute (local path or URI)
    split: str | None  # None: the whole source
    class_names: tuple[str, ...]  # object classes in label order 1..K (0 is background)
    category_ids: tuple[int, ...]  # source category id of label k: COCO's ids; VOC and folder: k
    num_images: int
    num_boxes: int  # over all rows, ignored boxes included
    image_root: str = ""  # folder image paths were resolved against
    split_method: str = "none"  # none | source (VOC ImageSets) | fraction (seeded)
    val_fraction: float | None = None  # fraction split only
    seed: int | None = None  # fraction split only

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"DatasetInfo.kind is {self.kind!r}; expected one of {KINDS}")
        if self.split_method not in SPLIT_METHODS:
            raise ValueError(
                f"DatasetInfo.split_method is {self.split_method!r}; expected one of {SPLIT_METHODS}"
            )
        if len(self.class_names) != len(self.category_ids):
            raise ValueError(
                f"DatasetInfo has {len(self.class_names)} class_names but {len(self.category_ids)} "
                "category_ids; expected one category id per class"
            )
        if len(set(self.category_ids)) != len(self.category_ids):
            raise ValueError(f"DatasetInfo.category_ids {self.category_ids} repeat; expected one per class")

    @property
    def num_classes(self) -> int:
        """K, object classes without the background."""
        return len(self.class_names)

    def label_to_category_id(self) -> dict[int, int]:
        return {label: cid for label, cid in enumerate(self.category_ids, start=1)}

    def category_id_to_label(self) -> dict[int, int]:
        return {cid: label for label, cid in enumerate(self.category_ids, start=1)}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-safe dict (lists for tuples)."""
        data = dataclasses.asdict(self)
        data["class_names"] = list(self.class_names)
        data["category_ids"] = list(self.category_ids)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DatasetInfo:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        required = [n for n, f in fields.items() if f.default is dataclasses.MISSING]
        missing = [name for name in required if name not in data]
        if unknown or missing:
            raise ValueError(f"DatasetInfo dict has unknown keys {unknown} and lacks {missing}")
        values = dict(data)
        values["class_names"] = tuple(str(name) for name in values["class_names"])
        values["category_ids"] = tuple(int(cid) for cid in values["category_ids"])
        return cls(**values)


def read_dataset(
    path: str | os.PathLike | Probe,
    *,
    split: str | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    strict: bool = False,
    report_dir: str | None = None,
    class_names: Sequence[str] | None = None,
    image_root: str | None = None,
) -> tuple[ray.data.Dataset, DatasetInfo, IngestReport]:
    """Read and validate a detection source into one row per image (columns in the module doc).

    Args:
        path: a COCO annotation file, a YOLO dataset YAML, a Pascal VOC root or a folder of
            images; local or a URI;
            or the `Probe` of one (`pipelines.data.sources.open_source`), so that reading
            several splits parses the source once.
        split: None for the whole source; VOC: a name of ImageSets/Main/<split>.txt; COCO (and
            VOC without ImageSets/Main): "train" or "val", a seeded `val_fraction` of the images;
            YOLO: an entry of the YAML ("train", "val", "test").
        val_fraction, seed: the fraction split (`pipelines.data.sources.fraction_split`).
        strict: raise `DataValidationError` at the first problem, naming its file.
        report_dir: where to write ``ingest_report.json`` (local or URI); None writes nothing.
        class_names: COCO: the categories to keep, by name, in label order (default: all, sorted
            by id); VOC: the classes in label order (default: the 20 VOC classes); folder: stored.
        image_root: COCO only: the folder ``file_name`` is relative to (default: found next to
            the JSON file).
    """
    probe = open_source(path)
    location = probe.location
    names = _check_arguments(probe.kind, split, val_fraction, class_names, image_root)
    report = IngestReport(source=location.uri, kind=probe.kind, split=split, strict=strict)
    try:
        table = _read_source(probe, split, val_fraction, seed, names, image_root, report)
        keep_images, keep_boxes, boxes, widths, heights = _validate(table, report)
    except DataValidationError:
        _write_report(report, report_dir)
        raise
    report.images_in_source = len(table.image_ids)
    report.boxes_in_source = len(table.boxes)
    report.images_kept = int(keep_images.sum())
    report.boxes_kept = int(keep_boxes.sum())
    _write_report(report, report_dir)
    (logger.warning if report.num_problems else logger.info)("dataset ingest\n%s", report.summary())
    if report.images_kept == 0:
        where = location.uri + (f" (split {split!r})" if split else "")
        raise DataValidationError(f"no usable image left in {where}\n{report.summary()}")
    dataset = _to_dataset(table, keep_images, keep_boxes, boxes, widths, heights)
    info = DatasetInfo(
        kind=table.kind,
        source=location.uri,
        split=split,
        class_names=table.class_names,
        category_ids=table.category_ids,
        num_images=report.images_kept,
        num_boxes=report.boxes_kept,
        image_root=table.image_root,
        split_method=table.split_method,
        val_fraction=val_fraction if table.split_method == "fraction" else None,
        seed=seed if table.split_method == "fraction" else None,
    )
    return dataset, info, report


def _check_arguments(
    kind: str,
    split: str | None,
    val_fraction: float,
    class_names: Sequence[str] | None,
    image_root: str | None,
) -> tuple[str, ...] | None:
    if kind == "folder" and split is not None:
        raise ValueError(f"an image folder has no splits; got split={split!r}, expected None")
    if kind == "coco" and split not in (None, *FRACTION_SPLITS):
        raise ValueError(
            f"split={split!r} for a COCO file; expected None (the whole file; pass each split's JSON "
            f"separately) or one of {FRACTION_SPLITS} (a seeded val_fraction of this file)"
        )
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction}; expected a fraction strictly between 0 and 1")
    if image_root is not None and kind != "coco":
        raise ValueError(f"image_root applies to COCO files only; this source is {kind}")
    if not class_names:
        return None
    names = tuple(class_names)
    if any(not isinstance(name, str) or not name for name in names) or len(set(names)) != len(names):
        raise ValueError(f"class_names {list(names)}: expected distinct, non-empty strings")
    return names


def _read_source(
    probe: Probe,
    split: str | None,
    val_fraction: float,
    seed: int,
    class_names: tuple[str, ...] | None,
    image_root: str | None,
    report: IngestReport,
) -> SourceTable:
    if probe.kind == "coco":
        return read_coco(
            probe,
            split=split,
            val_fraction=val_fraction,
            seed=seed,
            class_names=class_names,
            image_root=image_root,
            report=report,
        )
    if probe.kind == "voc":
        return read_voc(
            probe, split=split, val_fraction=val_fraction, seed=seed, class_names=class_names, report=report
        )
    if probe.kind == "yolo":
        return read_yolo(probe, split=split, class_names=class_names, report=report)
    return read_folder(probe, class_names=class_names)


def _validate(
    table: SourceTable, report: IngestReport
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Run every check in order: missing files, boxes of images with an annotated size, the
    image pass, size mismatches, boxes of the remaining images against their displayed size.

    Returns keep_images bool [I], keep_boxes bool [M], boxes float64 [M, 4] (clipped),
    widths and heights int64 [I] (displayed, EXIF orientation applied).
    """
    for row in np.flatnonzero(~table.present):
        report.add("missing_file", table.paths[row], table.image_ids[row], "no such file")
    rows = table.box_rows
    has_image = rows >= 0
    known = (table.widths > 0) & (table.heights > 0)  # [I]
    box_known = ~has_image
    box_known[has_image] = known[rows[has_image]]
    codes = np.zeros(len(rows), dtype=np.int8)
    boxes = table.boxes.copy()
    _check_boxes(table, box_known, table.widths, table.heights, codes, boxes, report)

    widths, heights, readable = _check_images(table, np.flatnonzero(table.present), report)
    mismatch = readable & known & ((widths != table.widths) | (heights != table.heights))
    for row in np.flatnonzero(mismatch):
        turned = (widths[row], heights[row]) == (table.heights[row], table.widths[row])
        report.add(
            "size_mismatch",
            table.paths[row],
            table.image_ids[row],
            f"shown at {widths[row]}x{heights[row]} pixels, but {table.annotation_files[row]} "
            f"annotates {table.widths[row]}x{table.heights[row]}"
            + (
                " (width and height swapped: an EXIF orientation turns the image; annotate it as shown)"
                if turned
                else ""
            ),
        )
    keep_images = readable & ~mismatch
    if table.dropped is not None:
        keep_images &= ~table.dropped
    if table.normalized:  # YOLO: fractions of the displayed size -> pixels
        scale = np.stack([widths, heights, widths, heights], axis=1)[np.maximum(rows, 0)]
        table = dataclasses.replace(table, boxes=table.boxes * scale)
        boxes = table.boxes.copy()
    box_kept_image = np.zeros(len(rows), dtype=bool)
    box_kept_image[has_image] = keep_images[rows[has_image]]
    _check_boxes(table, ~box_known & box_kept_image, widths, heights, codes, boxes, report)
    keep_boxes = box_kept_image & ((codes == BOX_OK) | (codes == _CLIPPED))
    return keep_images, keep_boxes, boxes, widths, heights


def _check_boxes(
    table: SourceTable,
    subset: np.ndarray,
    widths: np.ndarray,
    heights: np.ndarray,
    codes: np.ndarray,
    boxes: np.ndarray,
    report: IngestReport,
) -> None:
    """Check the boxes in `subset` (bool [M]) against `widths`/`heights` [I]; fills `codes` and
    `boxes` in place and reports each problem box in annotation order."""
    index = np.flatnonzero(subset)
    sub_codes, clipped = check_boxes(
        table.boxes[index], table.labels[index], table.box_rows[index], widths, heights
    )
    codes[index] = sub_codes
    boxes[index] = clipped
    for i in index[sub_codes != BOX_OK]:
        kind, row = box_kind(codes[i]), int(table.box_rows[i])
        if kind == "unknown_image":
            report.add(kind, table.orphan_file, None, f"{table.box_refs[i]}: no image has this id")
            continue
        file, image_id = table.annotation_files[row], table.image_ids[row]
        if kind == "unknown_category":
            detail = f"category {table.box_categories[i]!r} is not in {table.category_source}"
        else:
            detail = describe_box(kind, table.boxes[i], boxes[i], widths[row], heights[row])
        report.add(kind, file, image_id, f"{table.box_refs[i]}: {detail}")


def _check_images(
    table: SourceTable, rows: np.ndarray, report: IngestReport
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode the images at `rows` on the Ray workers (`check_images_batch`).

    Returns widths and heights int64 [I] (displayed pixels, 0 if not read) and readable
    bool [I]. Problems are reported in row order; strict mode stops at the first to arrive.
    """
    count = len(table.image_ids)
    widths, heights = np.zeros(count, dtype=np.int64), np.zeros(count, dtype=np.int64)
    readable = np.zeros(count, dtype=bool)
    if len(rows) == 0:
        return widths, heights, readable
    inputs = pa.table({"row": pa.array(rows, pa.int64()), "fs_path": [table.fs_paths[r] for r in rows]})
    checked = ray.data.from_arrow(
        inputs, override_num_blocks=_num_blocks(len(rows), _CHECK_ROWS_PER_BLOCK)
    ).map_batches(
        check_images_batch,
        batch_format="numpy",
        fn_kwargs={"filesystem": table.filesystem},
        udf_modifying_row_count=False,
    )
    problems = []
    for batch in checked.iter_batches(batch_size=None, batch_format="numpy"):
        batch_rows = batch["row"]
        widths[batch_rows], heights[batch_rows] = batch["width"], batch["height"]
        good = batch["problem"] == ""
        readable[batch_rows[good]] = True
        for j in np.flatnonzero(~good):
            problem = (int(batch_rows[j]), str(batch["problem"][j]), str(batch["detail"][j]))
            if report.strict:
                _report_image_problem(table, report, *problem)  # raises
            problems.append(problem)
    for problem in sorted(problems):
        _report_image_problem(table, report, *problem)
    return widths, heights, readable


def _report_image_problem(table: SourceTable, report: IngestReport, row: int, kind: str, detail: str) -> None:
    report.add(kind, table.paths[row], table.image_ids[row], detail)


def _num_blocks(rows: int, rows_per_block: int) -> int:
    return max(1, min(math.ceil(rows / rows_per_block), _MAX_BLOCKS))


def _to_dataset(
    table: SourceTable,
    keep_images: np.ndarray,
    keep_boxes: np.ndarray,
    boxes: np.ndarray,
    widths: np.ndarray,
    heights: np.ndarray,
) -> ray.data.Dataset:
    """Rows of the kept images with their kept boxes, in source order, in blocks of
    `_ROWS_PER_BLOCK` rows."""
    rows = np.flatnonzero(keep_images)
    kept = np.flatnonzero(keep_boxes)
    kept = kept[np.argsort(table.box_rows[kept], kind="stable")]  # grouped by image, in image order
    counts = np.bincount(table.box_rows[kept], minlength=len(table.image_ids))[rows]
    offsets = np.concatenate([[0], np.cumsum(counts)])
    all_boxes = boxes[kept].astype(np.float32)
    all_labels = table.labels[kept]
    all_ignore = table.ignore[kept]
    block = math.ceil(len(rows) / _num_blocks(len(rows), _ROWS_PER_BLOCK))
    tables = []
    for start in range(0, len(rows), block):
        stop = min(start + block, len(rows))
        first, cuts = offsets[start], offsets[start + 1 : stop] - offsets[start]
        span = slice(first, offsets[stop])
        part = rows[start:stop]
        tables.append(
            pa.table(
                {
                    "image_id": pa.array(table.image_ids[part], pa.int64()),
                    "path": pa.array([table.paths[r] for r in part], pa.string()),
                    "width": pa.array(widths[part], pa.int64()),
                    "height": pa.array(heights[part], pa.int64()),
                    "boxes": ArrowVariableShapedTensorArray.from_numpy(np.split(all_boxes[span], cuts)),
                    "labels": ArrowVariableShapedTensorArray.from_numpy(np.split(all_labels[span], cuts)),
                    "ignore": ArrowVariableShapedTensorArray.from_numpy(np.split(all_ignore[span], cuts)),
                }
            )
        )
    return ray.data.from_arrow(tables)


def _write_report(report: IngestReport, report_dir: str | None) -> None:
    if report_dir is None:
        return
    uri = "://" in report_dir
    target = f"{report_dir.rstrip('/')}/{REPORT_FILE}" if uri else os.path.join(report_dir, REPORT_FILE)
    report.to_json(target)
    logger.info("ingest report written to %s", target)


def coco_ground_truth(rows: ray.data.Dataset | Iterable[Mapping[str, Any]], info: DatasetInfo) -> dict:
    """COCO-format ground truth of `rows` for pycocotools / ``ssd.evaluate.CocoEvaluator``.

    Images keep their ids (COCO's own for a COCO source), labels map back to ``info.category_ids``
    and ``ignore`` becomes ``iscrowd``. ``area`` is the box area: COCO's own is the segment
    area, so AP, AP50 and AP75 match an evaluation on the original file while the small /
    medium / large split can differ for boxes near the area limits. When ``class_names`` put
    labels out of category-id order, pass ``info.label_to_category_id()`` to the evaluator.
    """
    rows = rows.iter_rows() if isinstance(rows, ray.data.Dataset) else rows
    label_to_cat = info.label_to_category_id()
    images, annotations = [], []
    for row in rows:
        image_id = int(row["image_id"])
        images.append(
            {
                "id": image_id,
                "width": int(row["width"]),
                "height": int(row["height"]),
                "file_name": str(row["path"]),
            }
        )
        boxes = np.asarray(row["boxes"], dtype=np.float64).reshape(-1, 4)
        sizes = boxes[:, 2:] - boxes[:, :2]  # [N, 2] w, h
        for box, (w, h), label, crowd in zip(boxes, sizes, row["labels"], row["ignore"]):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label_to_cat[int(label)],
                    "bbox": [float(box[0]), float(box[1]), float(w), float(h)],
                    "area": float(w * h),
                    "iscrowd": int(bool(crowd)),
                }
            )
    categories = [{"id": cid, "name": name} for name, cid in zip(info.class_names, info.category_ids)]
    return {"images": images, "annotations": annotations, "categories": categories}
