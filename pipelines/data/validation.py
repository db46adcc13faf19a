"""Ingest checks for detection datasets, and the report that counts what they found.

Every problem has a kind, is counted, and is listed with the file it was found in.
Nothing is dropped without an entry. The rules:

kind                level  effect         found when
------------------  -----  -------------  ---------------------------------------------------------------
duplicate_image_id  image  later dropped  an image id (COCO) or name (VOC split list) is seen again; the
                                          first is kept and every annotation of the id goes to it
missing_file        image  dropped        the image, or a VOC annotation XML, does not exist
unreadable          image  dropped        the file cannot be read or is not an image PIL knows (also an
                                          annotation XML that does not parse)
truncated           image  dropped        decoding stops early: the file was cut short
too_large           image  dropped        more pixels than `ssd.image.MAX_PIXELS` (a decompression
                                          bomb): refused from the header, nothing decoded
corrupt             image  dropped        decoding fails for another reason
size_mismatch       image  dropped        the displayed size differs from the annotated one, so the boxes
                                          were drawn on another picture
unknown_image       box    dropped        a COCO annotation names an image id that has no image
unknown_category    box    dropped        the category is not one of the dataset's classes
invalid_box         box    dropped        a coordinate is missing or not finite
zero_area           box    dropped        as annotated, x2 <= x1 or y2 <= y1
outside_image       box    dropped        nothing is left after clipping to the image
clipped             box    kept, clipped  the box reaches outside the image

Clipping: an image of W x H pixels covers [0, W] x [0, H] in xyxy pixel coordinates; a box
is clipped to that rectangle and counted as ``clipped`` if any coordinate changed. Each box
is counted once, under the first kind that applies in the order of the table.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow.fs as pafs
from PIL import Image, UnidentifiedImageError

from ssd.image import MAX_PIXELS, displayed_size

IMAGE_KINDS = (
    "duplicate_image_id",
    "missing_file",
    "unreadable",
    "truncated",
    "too_large",
    "corrupt",
    "size_mismatch",
)
BOX_KINDS = ("unknown_image", "unknown_category", "invalid_box", "zero_area", "outside_image", "clipped")
PROBLEM_KINDS = IMAGE_KINDS + BOX_KINDS
REPORT_FILE = "ingest_report.json"

# Codes returned by `check_boxes`: 0 is a clean box, k is BOX_KINDS[k - 1].
BOX_OK = 0
_CODE = {kind: code for code, kind in enumerate(BOX_KINDS, start=1)}
# Decoding at 1/8 scale (JPEG DCT scaling) still reads the whole entropy-coded stream, so
# truncation and corruption are caught at a fraction of the cost of a full decode.
_DRAFT_SCALE = 8
_SUMMARY_EXAMPLES = 5


class DataValidationError(ValueError):
    """A dataset failed validation at ingest; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class Problem:
    kind: str  # one of PROBLEM_KINDS
    file: str  # the image, annotation file or split list the problem was found in
    image_id: int | None  # None when the image has no id (e.g. a VOC name without annotation)
    detail: str

    def message(self) -> str:
        image = "" if self.image_id is None else f" (image {self.image_id})"
        return f"{self.file}{image}: {self.kind}: {self.detail}"


@dataclasses.dataclass
class IngestReport:
    """Counts and entries of every problem found while reading one source (one split)."""

    source: str
    kind: str  # coco | voc | folder
    split: str | None = None
    strict: bool = False
    counts: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(PROBLEM_KINDS, 0))
    entries: list[Problem] = dataclasses.field(default_factory=list)
    images_in_source: int = 0  # images of the split named by the source, before any check
    images_kept: int = 0
    boxes_in_source: int = 0
    boxes_kept: int = 0  # including clipped ones

    def add(self, kind: str, file: str, image_id: int | None, detail: str) -> None:
        """Record one problem; in strict mode then raise `DataValidationError`."""
        if kind not in self.counts:
            raise ValueError(f"unknown problem kind {kind!r}; expected one of {PROBLEM_KINDS}")
        problem = Problem(kind, str(file), None if image_id is None else int(image_id), detail)
        self.counts[kind] += 1
        self.entries.append(problem)
        if self.strict:
            raise DataValidationError(
                f"{problem.message()} [strict mode stops at the first problem; without it every "
                "problem is counted and written to the ingest report]"
            )

    @property
    def num_problems(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "kind": self.kind,
            "split": self.split,
            "strict": self.strict,
            "images": {"in_source": self.images_in_source, "kept": self.images_kept},
            "boxes": {"in_source": self.boxes_in_source, "kept": self.boxes_kept},
            "counts": dict(self.counts),
            "entries": [dataclasses.asdict(entry) for entry in self.entries],
        }

    def to_json(self, path: str) -> str:
        """Write the report as JSON to a local path or a pyarrow filesystem URI; returns `path`."""
        text = json.dumps(self.to_dict(), indent=1)
        if "://" in path and not path.startswith("file://"):
            filesystem, fs_path = pafs.FileSystem.from_uri(path)
            filesystem.create_dir(os.path.dirname(fs_path), recursive=True)
            with filesystem.open_output_stream(fs_path) as stream:
                stream.write(text.encode())
        else:
            local = path.removeprefix("file://")
            os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
            with open(local, "w", encoding="utf-8") as handle:
                handle.write(text)
        return path

    def summary(self) -> str:
        """A few lines for the console."""
        split = f" [{self.split}]" if self.split else ""
        lines = [
            f"{self.kind} {self.source}{split}: kept {self.images_kept} of {self.images_in_source} images "
            f"and {self.boxes_kept} of {self.boxes_in_source} boxes"
        ]
        found = {kind: n for kind, n in self.counts.items() if n}
        if not found:
            lines.append("no problems found")
            return "\n".join(lines)
        counted = ", ".join(f"{kind} {n}" for kind, n in found.items())
        lines.append(f"problems: {counted} (clipped boxes are kept, every other problem drops its item)")
        lines += [f"  {entry.message()}" for entry in self.entries[:_SUMMARY_EXAMPLES]]
        if len(self.entries) > _SUMMARY_EXAMPLES:
            lines.append(f"  ... {len(self.entries) - _SUMMARY_EXAMPLES} more in {REPORT_FILE}")
        return "\n".join(lines)


def check_boxes(
    boxes: np.ndarray, labels: np.ndarray, image_rows: np.ndarray, widths: np.ndarray, heights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Classify and clip boxes against their images, all at once.

    Args:
        boxes: float [M, 4] xyxy pixels as annotated (NaN where a coordinate is missing).
        labels: int [M] contiguous labels 1..K; 0 marks an unknown category.
        image_rows: int [M] index of each box's image in `widths`/`heights`; -1 for none.
        widths, heights: int [I] image sizes in pixels.

    Returns:
        codes: int8 [M], `BOX_OK` or 1 + the index of the box's kind in `BOX_KINDS`.
        clipped: float [M, 4] xyxy pixels, each box clipped to [0, W] x [0, H].
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    codes = np.zeros(len(boxes), dtype=np.int8)

    def mark(mask: np.ndarray, kind: str) -> None:
        codes[(codes == BOX_OK) & mask] = _CODE[kind]

    rows = np.asarray(image_rows, dtype=np.int64)
    mark(rows < 0, "unknown_image")
    mark(np.asarray(labels) <= 0, "unknown_category")
    finite = np.isfinite(boxes).all(axis=1)
    mark(~finite, "invalid_box")
    with np.errstate(invalid="ignore"):
        mark((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]), "zero_area")
        safe_rows = np.clip(rows, 0, None)
        w = np.asarray(widths, dtype=np.float64)[safe_rows] if len(widths) else np.zeros(len(rows))
        h = np.asarray(heights, dtype=np.float64)[safe_rows] if len(heights) else np.zeros(len(rows))
        upper = np.stack([w, h, w, h], axis=1)  # [M, 4]
        clipped = np.minimum(np.maximum(boxes, 0.0), upper)
        mark((clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1]), "outside_image")
        mark((clipped != boxes).any(axis=1), "clipped")
    return codes, np.where(finite[:, None], clipped, boxes)


def box_kind(code: int) -> str:
    return BOX_KINDS[code - 1]


def describe_box(kind: str, box: Sequence[float], clipped: Sequence[float], width: int, height: int) -> str:
    coords = "[" + ", ".join(f"{v:g}" for v in box) + "]"
    if kind == "invalid_box":
        return f"box {coords} has a missing or non-finite coordinate"
    if kind == "zero_area":
        return f"box {coords} (xyxy) has zero or negative area"
    if kind == "outside_image":
        return f"box {coords} lies outside the {width}x{height} image"
    if kind == "clipped":
        inside = "[" + ", ".join(f"{v:g}" for v in clipped) + "]"
        return f"box {coords} reaches outside the {width}x{height} image; clipped to {inside}"
    return f"box {coords}"


def inspect_image(filesystem: pafs.FileSystem, path: str) -> tuple[int, int, str, str]:
    """Read and decode one image file.

    Returns ``(width, height, kind, detail)``: the displayed size in pixels (EXIF orientation
    applied, `ssd.image.displayed_size`) and, for a bad
    file, its problem kind (``missing_file``, ``unreadable``, ``truncated``, ``too_large``,
    ``corrupt``) and what went wrong; kind and detail are empty for a good image.
    """
    try:
        with filesystem.open_input_file(path) as handle:
            data = handle.read()
    except FileNotFoundError:
        return 0, 0, "missing_file", "no such file"
    except OSError as exc:
        return 0, 0, "unreadable", f"cannot read the file: {exc}"
    try:
        with Image.open(io.BytesIO(data)) as image:
            stored_width, stored_height = image.size
            pixels = stored_width * stored_height
            if pixels > MAX_PIXELS:
                return 0, 0, "too_large", _too_large(f"{stored_width}x{stored_height} = {pixels:,} pixels")
            width, height = displayed_size(image)  # annotations are drawn on the displayed image
            image.draft(None, (max(1, stored_width // _DRAFT_SCALE), max(1, stored_height // _DRAFT_SCALE)))
            image.load()
    except UnidentifiedImageError:
        return 0, 0, "unreadable", f"not an image PIL can identify ({len(data)} bytes)"
    except Image.DecompressionBombError as exc:  # refused by PIL at open, from the header
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        return 0, 0, "too_large", _too_large(f"{int(pixels[1]):,} pixels" if pixels else "the image")
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        kind = "truncated" if "truncated" in str(exc).lower() else "corrupt"
        return 0, 0, kind, f"decoding failed: {exc}"
    return int(width), int(height), "", ""


def _too_large(size: str) -> str:
    return (
        f"{size} is more than the {MAX_PIXELS:,} pixels an image may have (a decompression bomb, "
        "or a scan to tile first); refused from its header, nothing decoded"
    )


def check_images_batch(batch: dict[str, np.ndarray], *, filesystem: pafs.FileSystem) -> dict[str, np.ndarray]:
    """Ray Data batch function: decode every image of a batch of ``row`` int64 / ``fs_path`` str.

    Returns ``row``, ``width`` and ``height`` (int64, displayed pixels; 0 for a bad file),
    ``problem`` (a kind of `IMAGE_KINDS` or "") and ``detail``.
    """
    results = [inspect_image(filesystem, str(path)) for path in batch["fs_path"]]
    widths, heights, kinds, details = zip(*results) if results else ((), (), (), ())
    return {
        "row": np.asarray(batch["row"], dtype=np.int64),
        "width": np.asarray(widths, dtype=np.int64),
        "height": np.asarray(heights, dtype=np.int64),
        "problem": np.asarray(kinds, dtype=object),
        "detail": np.asarray(details, dtype=object),
    }
