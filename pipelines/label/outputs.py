"""What `rayssd label` writes into its output directory (`LABEL_OUTPUTS`; the layout is in
`pipelines.label.batch`'s docstring): the output check before a run, the Parquet rows'
schema, the COCO results and image files streamed from that Parquet, the errors list, the
sample picture and JSON that holds no NaN.
"""

from __future__ import annotations

import heapq
import io
import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from pipelines.data.datasets import DatasetInfo
from pipelines.data.samples import read_image
from pipelines.data.sources import (
    Location,
    checked_location,
    is_image_name,
    is_temporary,
    list_files,
    resolve_location,
    storage_error,
)
from pipelines.data.validation import IMAGE_KINDS, REPORT_FILE, IngestReport
from pipelines.track.pictures import detection_grid
from ssd.evaluate import CocoEvaluator, to_coco_results

if TYPE_CHECKING:
    from PIL import Image

# Written by Ray Data as plain list columns, so any Parquet reader gets [K, 4] boxes without
# Ray's tensor extension types (a block whose rows all have K detections would otherwise
# become a fixed-shape tensor column, and the next one a variable-shaped one).
LABEL_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("path", pa.string()),
        ("width", pa.int64()),  # original image, pixels
        ("height", pa.int64()),
        ("boxes", pa.list_(pa.list_(pa.float32(), 4))),  # [K, 4] xyxy original pixels
        ("scores", pa.list_(pa.float32())),  # [K] descending
        ("labels", pa.list_(pa.int64())),  # [K] model labels 1..num classes
        ("category_ids", pa.list_(pa.int64())),  # [K] the model's dataset["category_ids"]
        ("category_names", pa.list_(pa.string())),  # [K] the model's dataset["class_names"]
    ]
)
LABELS_DIR = "labels"
DETECTIONS_FILE = "detections.json"
IMAGES_FILE = "images.json"
ERRORS_FILE = "errors.json"
SAMPLES_FILE = "samples.jpg"
SUMMARY_FILE = "summary.json"
DATASET_DIRS = ("coco-dataset", "yolo-dataset")  # `pipelines.label.datasets.DIRS`, with --format
LABEL_OUTPUTS = (
    LABELS_DIR,
    DETECTIONS_FILE,
    IMAGES_FILE,
    ERRORS_FILE,
    REPORT_FILE,
    SAMPLES_FILE,
    SUMMARY_FILE,
    *DATASET_DIRS,
)
SKIPPED = "not_an_image"  # errors.json kind of a folder file without an image extension
SAMPLE_IMAGES = 8
SAMPLE_SIDE = 256  # pixels: sample pictures are shrunk to fit, so a grid of photos stays small
SAMPLE_SCORE_THRESHOLD = 0.3  # detections drawn on the samples


def check_output(out: str, *, overwrite: bool = False) -> Location:
    """The output directory `out` (local path or URI). ValueError (one line) if it is a file, a
    directory that already holds something and `overwrite` is False, or in a bucket that is not
    there or refuses the credentials."""
    location = checked_location(out, "--out")
    try:
        kind = location.file_type()
        held: list[str] = []
        if kind == pafs.FileType.Directory and not overwrite:
            found = location.filesystem.get_file_info(pafs.FileSelector(location.path))
            held = sorted(info.base_name for info in found if not is_temporary(info.base_name))
    except OSError as exc:
        raise ValueError(f"--out {location.uri}: {storage_error(exc)}") from None
    if kind == pafs.FileType.File:
        raise ValueError(f"output directory {location.uri} is a file; expected a new or empty directory")
    if held:
        shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
        raise ValueError(
            f"output directory {location.uri} already holds {shown}; pass --overwrite to replace "
            f"the labelling outputs in it ({', '.join(LABEL_OUTPUTS)}), or choose another directory"
        )
    return location


def clear_outputs(location: Location) -> None:
    """Delete the `LABEL_OUTPUTS` of an earlier run and the temporaries a killed run's writers
    left (nothing else), and make sure the directory exists."""
    fs = location.filesystem
    if location.file_type() == pafs.FileType.Directory:  # and what a killed run's writer left
        for info in fs.get_file_info(pafs.FileSelector(location.path)):
            if info.type == pafs.FileType.File and is_temporary(info.base_name):
                fs.delete_file(info.path)
    for name in LABEL_OUTPUTS:
        location.join(name).delete()
    fs.create_dir(location.path, recursive=True)


def image_errors(report: IngestReport) -> list[dict[str, Any]]:
    return [
        {"path": e.file, "image_id": e.image_id, "kind": e.kind, "reason": e.detail}
        for e in report.entries
        if e.kind in IMAGE_KINDS
    ]


def skipped_files(info: DatasetInfo) -> list[dict[str, Any]]:
    """Files of an image folder that the reader passes over for their name."""
    if info.kind != "folder":
        return []
    root = resolve_location(info.image_root)
    return [
        {
            "path": root.join(name).uri,
            "image_id": None,
            "kind": SKIPPED,
            "reason": "not read: the name has no image extension",
        }
        for name in list_files(root)
        if not is_image_name(name)
    ]


def write_results(
    location: Location, dataset: dict, evaluator: CocoEvaluator | None
) -> tuple[int, int, list[dict[str, Any]]]:
    """Stream the written Parquet into ``detections.json`` (and `evaluator`), then write
    ``images.json``. Returns (images, detections, the `SAMPLE_IMAGES` rows of lowest id)."""
    label_to_cat = {label: int(cid) for label, cid in enumerate(dataset["category_ids"], start=1)}
    parquet = pads.dataset(location.join(LABELS_DIR).path, format="parquet", filesystem=location.filesystem)
    images: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    detections = 0
    with location.join(DETECTIONS_FILE).open_output() as stream:  # whole, or not there
        stream.write(b"[")
        for batch in parquet.to_batches():
            rows = parquet_rows(batch)
            for row in rows:
                results = to_coco_results(
                    row["image_id"], row["boxes"], row["scores"], row["labels"], label_to_cat
                )
                if results:
                    stream.write((b",\n" if detections else b"\n") + json.dumps(results)[1:-1].encode())
                detections += len(results)
                images.append(
                    {
                        "id": row["image_id"],
                        "file_name": row["path"],
                        "width": row["width"],
                        "height": row["height"],
                    }
                )
            if evaluator is not None and rows:
                evaluator.update(
                    *([row[k] for row in rows] for k in ("image_id", "boxes", "scores", "labels"))
                )
            samples = heapq.nsmallest(SAMPLE_IMAGES, samples + rows, key=lambda row: row["image_id"])
        stream.write(b"\n]\n")
    categories = [{"id": int(c), "name": n} for n, c in zip(dataset["class_names"], dataset["category_ids"])]
    images.sort(key=lambda image: image["id"])
    info = {"images": images, "categories": categories, "annotations": []}
    write(location, IMAGES_FILE, json.dumps(info, indent=1).encode())
    return len(images), detections, samples


def parquet_rows(batch: pa.RecordBatch) -> list[dict[str, Any]]:
    """`LABEL_SCHEMA` rows as dicts of numbers, paths and numpy arrays (boxes [K, 4])."""
    cuts = np.cumsum(batch.column("scores").value_lengths().to_numpy(zero_copy_only=False))[:-1]
    boxes = np.split(batch.column("boxes").flatten().flatten().to_numpy().reshape(-1, 4), cuts)
    scores = np.split(batch.column("scores").flatten().to_numpy(), cuts)
    labels = np.split(batch.column("labels").flatten().to_numpy(), cuts)
    plain = {key: batch.column(key).to_pylist() for key in ("image_id", "path", "width", "height")}
    return [
        {**{key: plain[key][i] for key in plain}, "boxes": boxes[i], "scores": scores[i], "labels": labels[i]}
        for i in range(batch.num_rows)
    ]


def sample_grid(rows: Sequence[dict[str, Any]], class_names: Sequence[str]) -> Image.Image:
    """The images of `rows` (``path``, ``boxes`` [K, 4] xyxy pixels, ``scores``, ``labels``),
    each shrunk to fit `SAMPLE_SIDE` pixels, with their detections scoring at least
    `SAMPLE_SCORE_THRESHOLD`, four to a row (`pipelines.track.pictures.detection_grid`)."""
    from PIL import Image

    pictures, detections = [], []
    for row in rows:
        pixels = read_image(row["path"])
        height, width = pixels.shape[:2]
        scale = min(1.0, SAMPLE_SIDE / max(height, width))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        if scale < 1.0:
            pixels = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR))
        factor = np.array([size[0] / width, size[1] / height] * 2, dtype=np.float32)
        pictures.append(pixels)
        detections.append({"boxes": row["boxes"] * factor, "scores": row["scores"], "labels": row["labels"]})
    return detection_grid(
        pictures, detections, class_names=class_names, score_threshold=SAMPLE_SCORE_THRESHOLD
    )


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write(location: Location, name: str, data: bytes) -> None:
    with location.filesystem.open_output_stream(location.join(name).path) as stream:
        stream.write(data)


def without_text(metrics: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in metrics.items() if key != "summary_text"}


def json_safe(value: Any) -> Any:
    """NaN (e.g. no ground truth of a size) becomes null: JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(v) for key, v in value.items()}
    return value
