"""Pascal VOC roots (``Annotations/*.xml``, ``JPEGImages/``, optional ``ImageSets/Main``) read
into one `pipelines.data.sources.SourceTable` (conventions in `pipelines.data.sources`' docstring).
"""

from __future__ import annotations

import posixpath
import xml.etree.ElementTree as ET
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from pipelines.data.sources import (
    FRACTION_SPLITS,
    Location,
    Probe,
    SourceTable,
    fraction_split,
    is_image_name,
    list_files,
    positive_int,
)
from pipelines.data.validation import IngestReport

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


def read_voc(
    probe: Probe,
    *,
    split: str | None,
    val_fraction: float,
    seed: int,
    class_names: tuple[str, ...] | None,
    report: IngestReport,
) -> SourceTable:
    root = probe.location
    annotations, images = root.join("Annotations"), root.join("JPEGImages")
    stems = sorted(name[:-4] for name in list_files(annotations, recursive=False) if name.endswith(".xml"))
    image_files = {posixpath.splitext(n)[0]: n for n in reversed(list_files(images)) if is_image_name(n)}
    names, split_method, listed_in = _voc_split(root, stems, split, val_fraction, seed)
    class_names = class_names if class_names is not None else VOC_CLASSES
    id_of = {stem: index for index, stem in enumerate(stems)}  # image id: place among all annotations

    seen: set[str] = set()
    columns: dict[str, list] = {key: [] for key in ("ids", "files", "xmls", "w", "h", "present")}
    objects: list[tuple] = []  # (row, index in file, class name, [x1, y1, x2, y2], difficult)
    for line, name in enumerate(names, start=1):
        xml = annotations.join(name + ".xml")
        if name in seen:
            report.add(
                "duplicate_image_id", listed_in, id_of.get(name), f"'{name}' is listed again, line {line}"
            )
            continue
        seen.add(name)
        if name not in id_of:
            report.add(
                "missing_file", xml.uri, None, f"'{name}' is listed in {listed_in}; no annotation file"
            )
            continue
        try:
            element = ET.fromstring(xml.read_bytes())
        except (OSError, ET.ParseError) as exc:
            report.add("unreadable", xml.uri, id_of[name], f"cannot read or parse the annotation: {exc}")
            continue
        row = len(columns["ids"])
        size = element.find("size")
        columns["ids"].append(id_of[name])
        columns["files"].append(images.join(image_files.get(name) or _voc_file_name(element, name)))
        columns["present"].append(name in image_files)
        columns["xmls"].append(xml.uri)
        columns["w"].append(positive_int(size.findtext("width")) if size is not None else 0)
        columns["h"].append(positive_int(size.findtext("height")) if size is not None else 0)
        objects += [(row, index, *parsed) for index, parsed in enumerate(_voc_objects(element))]
    return SourceTable(
        kind="voc",
        image_root=images.uri,
        split_method=split_method,
        class_names=tuple(class_names),
        category_ids=tuple(range(1, len(class_names) + 1)),
        category_source="class_names" if class_names != VOC_CLASSES else "the 20 Pascal VOC classes",
        filesystem=root.filesystem,
        image_ids=np.asarray(columns["ids"], dtype=np.int64),
        paths=[file.uri for file in columns["files"]],
        fs_paths=[file.path for file in columns["files"]],
        widths=np.asarray(columns["w"], dtype=np.int64),
        heights=np.asarray(columns["h"], dtype=np.int64),
        present=np.asarray(columns["present"], dtype=bool),
        annotation_files=columns["xmls"],
        **_voc_boxes(objects, class_names),
    )


def _voc_objects(element: ET.Element) -> list[tuple[str, list[float], bool]]:
    """(class name, [x1, y1, x2, y2] pixels, difficult) of each <object> of an annotation."""
    objects = []
    for obj in element.findall("object"):  # direct children: a person's <part>s are not objects
        box = obj.find("bndbox")
        x1, y1, x2, y2 = (_float(box.findtext(k) if box is not None else None) for k in _VOC_CORNERS)
        # 1-based inclusive pixel indices -> continuous coordinates with the image on [0, W] x [0, H]
        corners = [x1 - 1.0, y1 - 1.0, x2, y2]
        objects.append(
            ((obj.findtext("name") or "").strip(), corners, positive_int(obj.findtext("difficult")) == 1)
        )
    return objects


def _voc_boxes(objects: list[tuple], class_names: tuple[str, ...]) -> dict[str, Any]:
    """The box columns of `SourceTable` from (row, index, name, corners, difficult) tuples."""
    label_of = {name: label for label, name in enumerate(class_names, start=1)}
    return {
        "boxes": np.asarray([o[3] for o in objects], dtype=np.float64).reshape(-1, 4),
        "labels": np.asarray([label_of.get(o[2], 0) for o in objects], dtype=np.int64),
        "ignore": np.asarray([o[4] for o in objects], dtype=bool),
        "box_rows": np.asarray([o[0] for o in objects], dtype=np.int64),
        "box_refs": [f"object {o[1]} ('{o[2]}')" for o in objects],
        "box_categories": [o[2] for o in objects],
    }


_VOC_CORNERS = ("xmin", "ymin", "xmax", "ymax")


def _voc_split(
    root: Location, stems: list[str], split: str | None, val_fraction: float, seed: int
) -> tuple[list[str], str, str]:
    """(names to read, split method, file the names were listed in)."""
    annotations = root.join("Annotations").uri
    if split is None:
        return stems, "none", annotations
    main = root.join("ImageSets", "Main")
    split_file = main.join(f"{split}.txt")
    if split_file.file_type() == pafs.FileType.File:
        lines = split_file.read_bytes().decode("utf-8").splitlines()
        return [line.split()[0] for line in lines if line.strip()], "source", split_file.uri
    available = []
    if main.file_type() == pafs.FileType.Directory:
        available = [n[:-4] for n in list_files(main, recursive=False) if n.endswith(".txt") and "_" not in n]
    if available or split not in FRACTION_SPLITS:
        raise ValueError(
            f"{split_file.uri} does not exist; splits of {root.uri}: {available or 'none'}"
            + ("" if available else f" (without ImageSets/Main, split must be one of {FRACTION_SPLITS})")
        )
    selected = fraction_split(stems, split, val_fraction, seed)
    return [stem for stem, keep in zip(stems, selected) if keep], "fraction", annotations


def _voc_file_name(element: ET.Element, name: str) -> str:
    file_name = (element.findtext("filename") or "").strip()
    return file_name if is_image_name(file_name) else f"{name}.jpg"


def _float(text: str | None) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")
