"""Pictures for people: detections drawn on images, precision-recall curves.

Drawing uses PIL; plots use matplotlib's object API on an Agg canvas, never ``pyplot``, so
no global figure state is created (nothing to close, safe in Ray workers and servers).
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from matplotlib.figure import Figure

GAP = 2  # pixels between grid cells
GAP_COLOUR = (32, 32, 32)
TRUTH_COLOUR = (255, 255, 255)
DASH = 4  # pixels on, then off, along a ground-truth box edge


def detection_grid(
    images: Any,
    detections: Sequence[Mapping[str, Any]],
    ground_truth: Sequence[Mapping[str, Any]] | None = None,
    class_names: Sequence[str] = (),
    columns: int = 4,
    score_threshold: float = 0.3,
) -> Image.Image:
    """Images with their detections, tiled row by row into one RGB picture.

    images: uint8 [B, 3, S, S] (numpy or torch), or B arrays [H, W, 3] uint8.
    detections: B dicts with ``boxes`` [K, 4] xyxy in the images' pixels, ``scores`` [K]
    and ``labels`` [K] (1..num classes); those scoring below `score_threshold` are not drawn.
    ground_truth: optional B dicts with ``boxes`` [N, 4] and ``labels`` [N], drawn dashed white.

    The grid has min(columns, B) columns and ceil(B / columns) rows of cells as large as
    the largest image, GAP pixels apart: for B images of S x S, the width is
    c * S + (c - 1) * GAP with c = min(columns, B).
    """
    pictures = _as_hwc_list(images)
    if len(detections) != len(pictures):
        raise ValueError(f"got {len(pictures)} images but {len(detections)} detection dicts")
    if ground_truth is not None and len(ground_truth) != len(pictures):
        raise ValueError(f"got {len(pictures)} images but {len(ground_truth)} ground-truth dicts")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    font = ImageFont.load_default()
    drawn = []
    for i, array in enumerate(pictures):
        image = Image.fromarray(array, mode="RGB")
        draw = ImageDraw.Draw(image)
        if ground_truth is not None:
            for box in _numpy(ground_truth[i]["boxes"]).reshape(-1, 4):
                _dashed_rectangle(draw, box)
        _draw_detections(draw, detections[i], class_names, score_threshold, font)
        drawn.append(image)
    return _tile(drawn, columns)


def _as_hwc_list(images: Any) -> list[np.ndarray]:
    """B arrays [H, W, 3] uint8 from a [B, 3, H, W] batch or a list of [H, W, 3] arrays."""
    if isinstance(images, (list, tuple)):
        arrays = [_numpy(im) for im in images]
    else:
        batch = _numpy(images)
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] or a list of [H, W, 3], got {list(batch.shape)}")
        arrays = list(batch.transpose(0, 2, 3, 1))
    for i, array in enumerate(arrays):
        if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
            raise ValueError(f"image {i} must be uint8 [H, W, 3], got {array.dtype} {list(array.shape)}")
    return [np.ascontiguousarray(a) for a in arrays]


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; torch itself is not needed here
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _draw_detections(
    draw: ImageDraw.ImageDraw,
    detections: Mapping[str, Any],
    class_names: Sequence[str],
    score_threshold: float,
    font: Any,
) -> None:
    boxes = _numpy(detections["boxes"]).reshape(-1, 4)
    scores = _numpy(detections["scores"]).reshape(-1)
    labels = _numpy(detections["labels"]).reshape(-1).astype(int)
    order = np.argsort(scores)  # best last, so it is drawn on top
    for k in order[scores[order] >= score_threshold]:
        colour = class_colour(int(labels[k]))
        x0, y0, x1, y1 = (float(v) for v in boxes[k])
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=2)
        text = f"{_name(int(labels[k]), class_names)} {scores[k]:.2f}"
        left, top, right, bottom = draw.textbbox((x0, y0), text, font=font)
        shift = max(0.0, bottom - top + 2 - y0)  # keep the label inside the image at the top edge
        lift = bottom - top + 2 - shift
        draw.rectangle((left, top - lift, right + 2, bottom - lift), fill=colour)
        draw.text((x0 + 1, y0 - lift), text, fill=(0, 0, 0), font=font)


def _name(label: int, class_names: Sequence[str]) -> str:
    return class_names[label - 1] if 1 <= label <= len(class_names) else str(label)


def class_colour(label: int) -> tuple[int, int, int]:
    """A bright colour per class label, stable across pictures (golden-ratio hue steps)."""
    hue = (label * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def _dashed_rectangle(draw: ImageDraw.ImageDraw, box: np.ndarray) -> None:
    """PIL has no dashed lines: the four edges as DASH-pixel segments."""
    x0, y0, x1, y1 = (float(v) for v in box)
    for (ax, ay), (bx, by) in (
        ((x0, y0), (x1, y0)),
        ((x1, y0), (x1, y1)),
        ((x1, y1), (x0, y1)),
        ((x0, y1), (x0, y0)),
    ):
        length = math.hypot(bx - ax, by - ay)
        for start in np.arange(0.0, length, 2 * DASH):
            end = min(start + DASH, length)
            t0, t1 = start / max(length, 1e-9), end / max(length, 1e-9)
            draw.line(
                (ax + (bx - ax) * t0, ay + (by - ay) * t0, ax + (bx - ax) * t1, ay + (by - ay) * t1),
                fill=TRUTH_COLOUR,
                width=1,
            )


def _tile(images: list[Image.Image], columns: int) -> Image.Image:
    if not images:
        raise ValueError("no images to draw")
    cols = min(columns, len(images))
    rows = math.ceil(len(images) / cols)
    cell_w = max(im.width for im in images)
    cell_h = max(im.height for im in images)
    grid = Image.new("RGB", (cols * cell_w + (cols - 1) * GAP, rows * cell_h + (rows - 1) * GAP), GAP_COLOUR)
    for i, image in enumerate(images):
        row, col = divmod(i, cols)
        grid.paste(image, (col * (cell_w + GAP), row * (cell_h + GAP)))
    return grid


def precision_recall_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str = "") -> Figure:
    """One precision-recall curve per class, with its AP (mean precision over the recall
    grid, as COCO averages it) in the legend.

    curves: class name -> (recall [R], precision [R]), as `CocoEvaluator.precision_recall`
    returns them (precision -1 where COCO has no value is drawn as 0).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 5), dpi=100)
    FigureCanvasAgg(figure)  # attaches itself: savefig and canvas.draw work without pyplot
    axes = figure.add_subplot()
    for k, (name, (recall, precision)) in enumerate(curves.items()):
        precision = np.clip(np.asarray(precision, dtype=float), 0.0, None)
        colour = tuple(c / 255 for c in class_colour(k + 1))
        axes.plot(recall, precision, color=colour, label=f"{name} (AP {precision.mean():.3f})")
    axes.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=title)
    axes.grid(alpha=0.3)
    if curves:
        axes.legend(loc="lower left", fontsize="small")
    figure.tight_layout()
    return figure


def figure_to_image(figure: Figure) -> Image.Image:
    """The figure rendered to an RGB PIL image (figure size x dpi pixels)."""
    canvas = figure.canvas
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy(), mode="RGB")
