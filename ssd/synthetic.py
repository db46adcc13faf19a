"""Seeded synthetic detection scenes: coloured shapes on cluttered backgrounds.

Shape decides the class, colour never does, and sizes and aspect ratios span the whole
range of SSD's default boxes, so a detector must learn geometry at every feature map.
Used by the core demo and the tests; the built-in dataset builds on it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

CLASS_NAMES = ("ellipse", "rectangle", "triangle", "cross")
MIN_OBJECT_FRACTION = 0.08  # smallest object side, fraction of the image side
MAX_OBJECT_FRACTION = 0.8


def _background(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    base = rng.integers(0, 256, size=3)
    noise = rng.normal(0, 18, size=(height, width, 3))
    gradient = np.linspace(-30, 30, width)[None, :, None] * rng.choice([-1, 1])
    pixels = np.clip(base + noise + gradient, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 7))):  # clutter: thin lines that are not objects
        xy = rng.uniform(0, [width, height, width, height]).tolist()
        draw.line(xy, fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=int(rng.integers(1, 3)))
    return image


def _draw(draw: ImageDraw.ImageDraw, label: int, box: list[float], colour: tuple[int, ...]) -> None:
    x1, y1, x2, y2 = box
    name = CLASS_NAMES[label - 1]
    if name == "ellipse":
        draw.ellipse(box, fill=colour)
    elif name == "rectangle":
        draw.rectangle(box, fill=colour)
    elif name == "triangle":
        draw.polygon([(x1, y2), ((x1 + x2) / 2, y1), (x2, y2)], fill=colour)
    else:  # cross: two bars through the centre
        tw, th = (x2 - x1) / 3, (y2 - y1) / 3
        draw.rectangle([x1, y1 + th, x2, y2 - th], fill=colour)
        draw.rectangle([x1 + tw, y1, x2 - tw, y2], fill=colour)


def make_scene(
    rng: np.random.Generator, height: int = 256, width: int = 256, max_objects: int = 6
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One scene: image uint8 [H, W, 3] RGB, boxes float32 [N, 4] xyxy pixels, labels int64 [N].

    Labels are 1..len(CLASS_NAMES) (0 is background). Objects may overlap; later ones are
    drawn on top, and a box whose visible part is under 40 % is dropped with its label.
    """
    image = _background(rng, height, width)
    draw = ImageDraw.Draw(image)
    owner = np.full((height, width), -1, dtype=np.int32)  # which object each pixel shows
    boxes, labels = [], []
    for i in range(int(rng.integers(1, max_objects + 1))):
        side = np.exp(rng.uniform(np.log(MIN_OBJECT_FRACTION), np.log(MAX_OBJECT_FRACTION)))
        aspect = np.exp(rng.uniform(np.log(1 / 3), np.log(3)))
        w = min(side * np.sqrt(aspect), 0.95) * width
        h = min(side / np.sqrt(aspect), 0.95) * height
        x1, y1 = rng.uniform(0, width - w), rng.uniform(0, height - h)
        label = int(rng.integers(1, len(CLASS_NAMES) + 1))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        box = [float(x1), float(y1), float(x1 + w), float(y1 + h)]
        mask = Image.new("1", (width, height))
        _draw(ImageDraw.Draw(mask), label, box, 1)
        owner[np.asarray(mask)] = i
        _draw(draw, label, box, colour)
        boxes.append(box)
        labels.append(label)
    visible = np.bincount(owner[owner >= 0].ravel(), minlength=len(boxes))
    full = np.array([(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]) + 1e-6
    keep = visible / full >= 0.4 * _fill_fraction(np.array(labels))
    boxes_arr = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)[keep]
    return np.asarray(image), boxes_arr, np.asarray(labels, dtype=np.int64)[keep]


def _fill_fraction(labels: np.ndarray) -> np.ndarray:
    """Share of its box a fully visible shape covers (ellipse π/4, triangle 1/2, cross 5/9)."""
    table = np.array([0.0, np.pi / 4, 1.0, 0.5, 5 / 9])
    return table[labels]
