"""Seeded synthetic detection scenes: filled shapes on cluttered, textured backgrounds.

Shape decides the class, colour never does. Object sizes (√(w·h)) span 8 %..85 % of the
image side and aspect ratios 1:3..3:1, so every feature map and default-box shape of an
SSD preset gets work. The clutter is built to look like objects to a lazy detector and
not to a careful one: smooth colour fields, stripe and checker textures, soft-edged blobs,
scribbles and straight lines (under and over the objects), all without a crisp filled
outline. Objects overlap (drawn largest first, so small ones partly cover big ones); an
object showing less than `MIN_VISIBLE` of its own pixels loses its box. A share of the
scenes are crowds of many small objects on a jittered grid.

Everything is a function of the `np.random.Generator` passed in, so a seeded generator
gives the same pixels and boxes on every run. Used by the core demo, the tests and the
built-in dataset (`pipelines.builtin`).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

CLASS_NAMES = ("ellipse", "rectangle", "triangle", "cross", "ring")
MIN_OBJECT_FRACTION = 0.08  # smallest √(w·h), fraction of the image side
MAX_OBJECT_FRACTION = 0.85  # largest √(w·h)
MAX_ASPECT = 3.0  # w/h within [1/3, 3]
MIN_SIDE_FRACTION = 0.05  # shorter side at least this: a 3:1 shape of 8 % would be 4.6 %
MAX_SIDE_FRACTION = 0.95  # longer side at most this, so every object lies inside the image
MIN_VISIBLE = 0.7  # share of an object's own pixels that must show for its box to be kept
CROWD_PROBABILITY = 0.15  # share of scenes that are crowds of small objects
CROWD_SIZE = (0.08, 0.18)  # √(w·h) range of crowd objects, fractions of the side
OCCLUDE_PROBABILITY = 0.25  # in ordinary scenes, chance an object is put over an earlier one
MIN_CONTRAST = 110.0  # RGB distance between an object's colour and what it covers
NOISE_SIGMA = 5.0  # per-pixel sensor noise over the finished scene, uint8 units
RING_THICKNESS = 0.3  # ring width, fraction of the half-width (and half-height)


def make_scene(
    rng: np.random.Generator,
    height: int = 256,
    width: int = 256,
    max_objects: int = 6,
    *,
    min_visible: float = MIN_VISIBLE,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One scene: image uint8 [H, W, 3] RGB, boxes float32 [N, 4] xyxy pixels, labels int64 [N].

    Labels are 1..len(CLASS_NAMES) (0 is background). An ordinary scene holds 1..max_objects
    objects of any size; a crowd scene (probability `CROWD_PROBABILITY`) holds
    2·max_objects..4·max_objects small ones. Boxes are the tight, integer pixel extents of
    each whole shape (also of its hidden part), largest first (the drawing order), without
    the boxes of objects showing less than `min_visible` of their own pixels; N may be 0.
    `min_visible` changes no pixel, only which boxes are kept.
    """
    canvas = _background(rng, height, width)
    _clutter(canvas, rng, count=int(rng.integers(1, 5)))
    if rng.random() < CROWD_PROBABILITY:
        layout = _crowd_layout(rng, height, width, int(rng.integers(2 * max_objects, 4 * max_objects + 1)))
    else:
        layout = _scattered_layout(rng, height, width, int(rng.integers(1, max_objects + 1)))
    # Largest first, as a painter would: small objects cover part of big ones instead of
    # big ones swallowing small ones whole (which would leave unlabelled fragments).
    layout.sort(key=lambda item: (item[1][2] - item[1][0]) * (item[1][3] - item[1][1]), reverse=True)
    owner = np.full((height, width), -1, dtype=np.int32)  # which object each pixel shows
    boxes, labels, own_pixels = [], [], []
    for label, box in layout:
        mask, (x0, y0) = _shape_mask(label, box, rng)  # drawn in the box's own window only
        if not mask.any():
            continue
        window = (slice(y0, y0 + mask.shape[0]), slice(x0, x0 + mask.shape[1]))
        _paint(canvas[window], mask, rng)
        owner[window][mask] = len(boxes)
        ys, xs = np.nonzero(mask)
        boxes.append([x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1])
        labels.append(label)
        own_pixels.append(len(xs))
    _lines(canvas, rng, count=int(rng.integers(0, 3)), max_width=1)  # thin clutter over objects
    visible = np.bincount(owner[owner >= 0], minlength=len(boxes))
    keep = visible >= min_visible * np.asarray(own_pixels, dtype=np.float64)
    canvas += NOISE_SIGMA * rng.standard_normal(canvas.shape, dtype=np.float32)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    boxes_arr = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)[keep]
    return image, boxes_arr, np.asarray(labels, dtype=np.int64).reshape(-1)[keep]


# --- layout --------------------------------------------------------------------------------


def _object_shape(rng: np.random.Generator, low: float, high: float) -> tuple[float, float]:
    """(w, h) as fractions of the side: √(w·h) log-uniform in [low, high] within the limits."""
    aspect = float(np.exp(rng.uniform(-np.log(MAX_ASPECT), np.log(MAX_ASPECT))))  # w / h
    stretch = np.sqrt(max(aspect, 1 / aspect))  # longer side = size · stretch
    low = max(low, MIN_SIDE_FRACTION * stretch)
    high = max(low, min(high, MAX_SIDE_FRACTION / stretch))
    size = float(np.exp(rng.uniform(np.log(low), np.log(high))))
    return size * np.sqrt(aspect), size / np.sqrt(aspect)


def _scattered_layout(
    rng: np.random.Generator, height: int, width: int, count: int
) -> list[tuple[int, list[float]]]:
    """(label, xyxy pixel box) for `count` objects anywhere; some deliberately overlap."""
    layout: list[tuple[int, list[float]]] = []
    for _ in range(count):
        w, h = _object_shape(rng, MIN_OBJECT_FRACTION, MAX_OBJECT_FRACTION)
        w, h = w * width, h * height
        if layout and rng.random() < OCCLUDE_PROBABILITY:
            # Centre on the edge zone of an earlier object: partial, not total, cover.
            bx1, by1, bx2, by2 = layout[int(rng.integers(len(layout)))][1]
            cx = rng.uniform(bx1, bx2) + rng.choice([-1, 1]) * (bx2 - bx1) * rng.uniform(0.3, 0.6)
            cy = rng.uniform(by1, by2) + rng.choice([-1, 1]) * (by2 - by1) * rng.uniform(0.3, 0.6)
            x1 = float(np.clip(cx - w / 2, 0, width - w))
            y1 = float(np.clip(cy - h / 2, 0, height - h))
        else:
            x1, y1 = float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h))
        layout.append((_label(rng), [x1, y1, x1 + w, y1 + h]))
    return layout


def _crowd_layout(
    rng: np.random.Generator, height: int, width: int, count: int
) -> list[tuple[int, list[float]]]:
    """`count` small objects on a jittered grid: neighbours touch and sometimes overlap."""
    cells = int(np.ceil(np.sqrt(count)))
    order = rng.permutation(cells * cells)[:count]
    layout = []
    for cell in order.tolist():
        w, h = _object_shape(rng, *CROWD_SIZE)
        w, h = w * width, h * height
        cx = (cell % cells + 0.5 + rng.uniform(-0.3, 0.3)) * width / cells
        cy = (cell // cells + 0.5 + rng.uniform(-0.3, 0.3)) * height / cells
        x1 = float(np.clip(cx - w / 2, 0, width - w))
        y1 = float(np.clip(cy - h / 2, 0, height - h))
        layout.append((_label(rng), [x1, y1, x1 + w, y1 + h]))
    return layout


def _label(rng: np.random.Generator) -> int:
    return int(rng.integers(1, len(CLASS_NAMES) + 1))


# --- objects -------------------------------------------------------------------------------


def _shape_mask(label: int, box: list[float], rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int]]:
    """The pixels of shape `label` filling `box` (xyxy pixels inside the image).

    Returns bool [h, w] over the box's window and the window's top-left (x0, y0) pixel.
    """
    x0, y0 = round(box[0]), round(box[1])
    x2, y2 = max(x0 + 1, round(box[2])) - 1 - x0, max(y0 + 1, round(box[3])) - 1 - y0  # inclusive
    x1, y1 = 0, 0
    mask = Image.new("1", (x2 + 1, y2 + 1))
    draw = ImageDraw.Draw(mask)
    name = CLASS_NAMES[label - 1]
    if name == "ellipse":
        draw.ellipse([x1, y1, x2, y2], fill=1)
    elif name == "rectangle":
        draw.rectangle([x1, y1, x2, y2], fill=1)
    elif name == "triangle":
        draw.polygon(_triangle(x1, y1, x2, y2, pointing_up=bool(rng.random() < 0.5)), fill=1)
    elif name == "cross":  # two bars a third of the box thick
        tw, th = (x2 - x1) / 3, (y2 - y1) / 3
        draw.rectangle([x1, round(y1 + th), x2, round(y2 - th)], fill=1)
        draw.rectangle([round(x1 + tw), y1, round(x2 - tw), y2], fill=1)
    else:  # ring: an ellipse with an elliptic hole
        draw.ellipse([x1, y1, x2, y2], fill=1)
        dx, dy = RING_THICKNESS * (x2 - x1) / 2, RING_THICKNESS * (y2 - y1) / 2
        if x2 - x1 - 2 * dx >= 1 and y2 - y1 - 2 * dy >= 1:
            draw.ellipse([x1 + dx, y1 + dy, x2 - dx, y2 - dy], fill=0)
    return np.asarray(mask, dtype=bool), (x0, y0)


def _triangle(x1: int, y1: int, x2: int, y2: int, pointing_up: bool) -> list[tuple[float, float]]:
    """Isosceles triangle filling the box, apex at the middle of the top or bottom side."""
    cx = (x1 + x2) / 2
    if pointing_up:
        return [(x1, y2), (cx, y1), (x2, y2)]
    return [(x1, y1), (cx, y2), (x2, y1)]


def _paint(canvas: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> None:
    """Fill `mask` bool [h, w] of canvas float32 [h, w, 3] (a window, changed in place) with a
    colour that stands out from what it covers, lightly shaded."""
    under = canvas[mask].mean(axis=0)  # [3]
    candidates = rng.integers(0, 256, size=(8, 3)).astype(np.float32)
    distance = np.linalg.norm(candidates - under, axis=1)
    passing = np.flatnonzero(distance >= MIN_CONTRAST)
    colour = candidates[passing[0] if len(passing) else int(np.argmax(distance))]
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    gx, gy = rng.uniform(-20, 20, size=2) / max(h, w)
    shade = (xs - w / 2) * gx + (ys - h / 2) * gy  # [P], a gentle light gradient across the shape
    canvas[ys, xs] = colour + shade[:, None]


# --- background and clutter ----------------------------------------------------------------


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """float32 [H, W, 3]: a smooth colour field, often with a stripe or checker texture."""
    base = rng.uniform(0, 255, size=3)
    grid = np.clip(base + rng.normal(0, 40, size=(4, 4, 3)), 0, 255).astype(np.uint8)
    field = np.asarray(
        Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32
    )
    kind = int(rng.integers(3))  # 0 plain, 1 stripes, 2 checker
    if kind:
        yy = np.arange(height, dtype=np.float32)[:, None]  # [H, 1], broadcasts to [H, W]
        xx = np.arange(width, dtype=np.float32)[None, :]
        angle, period = rng.uniform(0, np.pi), rng.uniform(4, 24)
        u = (xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period
        texture = np.sin(u)
        if kind == 2:
            v = (yy * np.cos(angle) - xx * np.sin(angle)) * 2 * np.pi / period
            texture = np.sign(texture * np.sin(v))
        field += (rng.uniform(8, 25) * texture)[..., None] * rng.uniform(0.5, 1.0, size=3)
    return field


def _clutter(canvas: np.ndarray, rng: np.random.Generator, count: int) -> None:
    """Soft-edged blobs, scribbles and lines under the objects (no crisp filled outline)."""
    height, width = canvas.shape[:2]
    x, y = np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)
    for _ in range(int(rng.integers(1, 5))):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        sx, sy = rng.uniform(0.03, 0.25) * width, rng.uniform(0.03, 0.25) * height
        # A Gaussian is separable: exp(-(dx² + dy²)/2) = exp(-dx²/2)·exp(-dy²/2).
        gx, gy = np.exp(-0.5 * ((x - cx) / sx) ** 2), np.exp(-0.5 * ((y - cy) / sy) ** 2)
        alpha = np.outer(gy * rng.uniform(0.4, 0.9), gx).astype(np.float32)  # [H, W]
        canvas += alpha[..., None] * (rng.uniform(0, 255, size=3).astype(np.float32) - canvas)
    _lines(canvas, rng, count=count, max_width=3)
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 3))):  # scribbles: short random walks
        points = np.cumsum(rng.normal(0, 0.12, size=(int(rng.integers(3, 7)), 2)), axis=0)
        points = (points + rng.uniform(0, 1, size=2)) * (width, height)
        draw.line([tuple(p) for p in points.tolist()], fill=_colour(rng), width=int(rng.integers(1, 4)))
    canvas[:] = np.asarray(image, dtype=np.float32)


def _lines(canvas: np.ndarray, rng: np.random.Generator, count: int, max_width: int) -> None:
    """Straight lines right across the canvas float32 [H, W, 3], drawn in place."""
    height, width = canvas.shape[:2]
    mask = Image.new("L", (width, height))
    draw = ImageDraw.Draw(mask)
    colours = np.zeros((count + 1, 3), dtype=np.float32)
    for k in range(1, count + 1):
        xy = rng.uniform(0, 1, size=4) * (width, height, width, height)
        draw.line(xy.tolist(), fill=k, width=int(rng.integers(1, max_width + 1)))
        colours[k] = _colour(rng)
    index = np.asarray(mask)
    drawn = index > 0
    canvas[drawn] = colours[index[drawn]]


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    r, g, b = (int(c) for c in rng.integers(0, 256, size=3))
    return r, g, b
