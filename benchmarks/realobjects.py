"""Small real-object detection sets composed from photographs that installed packages ship.

Nothing is downloaded: the objects are cut out of scikit-image's sample photographs (a dev
dependency; its wheel carries them) and matplotlib's and scikit-learn's, and pasted, scaled,
mirrored and re-lit, onto random crops of other real photographs and textures. Each set is
written as a COCO dataset (``images/`` + ``annotations.json``) with non-contiguous category
ids, as users' exports have, so it goes through `rayssd train --data` like theirs.

Two sets (`SETS`):

- ``objects``: ten classes of real objects -- human faces (100 different people, LFW), coins
  (the 24 of ``coins.png``, cut out along their rims), a cat, a coffee cup, a rocket, a
  motorcycle, a space shuttle, a space helmet, a mission patch and a film camera -- 10-70 px
  on 160 px images of brick, grass, gravel, a temple roof, a star field, a retina and tissue.
- ``coins``: one class, the 24 coins, 12-40 px and up to 8 per image among the same number
  of look-alike distractors (LFW's non-face patches and crops of the backgrounds, cut round
  like a coin) on the same backgrounds: many small objects and hard negatives.

Train and validation images come from disjoint seeds; the faces and coins are split by
instance (validation sees people and coins training never saw), the single-exemplar classes
cannot be, so their validation copies differ only in scale, placement, light and background.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

IMAGE_SIZE = 160  # pixels, square
SETS = ("objects", "coins")

# Single-exemplar classes: (name, scikit-image file, crop box x1, y1, x2, y2 in its pixels).
_EXEMPLARS = (
    ("cat", "chelsea.png", (30, 0, 410, 300)),
    ("cup", "coffee.png", (165, 10, 410, 290)),
    ("rocket", "rocket.jpg", (302, 112, 338, 405)),
    ("motorcycle", "motorcycle_left.png", (90, 95, 690, 455)),
    ("shuttle", "astronaut.png", (350, 0, 470, 280)),
    ("helmet", "astronaut.png", (275, 340, 512, 512)),
    ("patch", "astronaut.png", (133, 348, 213, 428)),
    ("camera", "camera.png", (250, 130, 335, 220)),
)
# Category ids with gaps, as COCO exports have (face, coin, then the exemplars' order).
OBJECT_IDS = (3, 7, 11, 18, 22, 27, 31, 40, 52, 90)
OBJECT_NAMES = ("face", "coin", *(name for name, _, _ in _EXEMPLARS))
COIN_IDS = (5,)
_BACKGROUNDS = ("brick.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png")


@dataclass(frozen=True)
class _Object:
    pixels: np.ndarray  # uint8 [h, w, 3]
    alpha: np.ndarray  # float32 [h, w] in [0, 1]


def _skimage_data() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the real-object sets need scikit-image's sample photographs: pip install scikit-image"
        )
    return Path(spec.origin).parent / "data"


def _rgb(name: str) -> np.ndarray:
    with Image.open(_skimage_data() / name) as image:
        return np.asarray(image.convert("RGB"))


def _feathered(height: int, width: int, edge: float = 0.12) -> np.ndarray:
    """An alpha that is 1 inside and falls to 0 over the outer `edge` of each side, so a pasted
    rectangle has no hard border to give it away."""

    def ramp(n: int) -> np.ndarray:
        t = (np.arange(n, dtype=np.float32) + 0.5) / n
        return np.clip(np.minimum(t, 1 - t) / edge, 0, 1)

    return np.minimum(ramp(height)[:, None], ramp(width)[None, :])


@functools.cache
def _coins() -> tuple[_Object, ...]:
    """The 24 coins of coins.png, each cut along its rim (threshold, holes filled, components)."""
    from scipy import ndimage

    gray = _rgb("coins.png")[..., 0].astype(np.float32)
    smooth = ndimage.gaussian_filter(gray, 2.0)
    mask = ndimage.binary_fill_holes(ndimage.binary_opening(smooth > 110, iterations=2))
    labels, _ = ndimage.label(mask)
    coins = []
    for index, region in enumerate(ndimage.find_objects(labels), start=1):
        inside = labels[region] == index
        h, w = inside.shape
        if inside.sum() < 400 or max(h, w) > 1.3 * min(h, w):  # specks, and two coins touching
            continue
        alpha = ndimage.gaussian_filter(inside.astype(np.float32), 1.0)
        coins.append(_Object(_rgb("coins.png")[region].copy(), alpha))
    return tuple(coins)


@functools.cache
def _lfw() -> tuple[np.ndarray, np.ndarray]:
    """LFW's subset: 100 faces and 100 non-face patches, uint8 [100, 25, 25] each."""
    patches = np.load(_skimage_data() / "lfw_subset.npy")
    patches = (patches * 255).clip(0, 255).astype(np.uint8) if patches.dtype != np.uint8 else patches
    return patches[:100], patches[100:]


def _faces() -> tuple[_Object, ...]:
    faces, _ = _lfw()
    return tuple(_Object(np.repeat(f[..., None], 3, axis=2), _feathered(*f.shape, edge=0.2)) for f in faces)


@functools.cache
def _exemplars() -> tuple[_Object, ...]:
    out = []
    for _, file, (x1, y1, x2, y2) in _EXEMPLARS:
        pixels = _rgb(file)[y1:y2, x1:x2].copy()
        out.append(_Object(pixels, _feathered(*pixels.shape[:2])))
    return tuple(out)


@functools.cache
def _backgrounds() -> tuple[np.ndarray, ...]:
    from benchmarks.bench_scale import real_photographs

    china = np.asarray(real_photographs()[1]) if len(real_photographs()) > 1 else None
    images = [_rgb(name) for name in _BACKGROUNDS]
    if china is not None:
        images.append(china[: china.shape[0] // 2])  # the roofs and sky, not the garden
    return tuple(images)


def _background(rng: np.random.Generator) -> np.ndarray:
    images = _backgrounds()
    photo = images[int(rng.integers(len(images)))]
    height, width = photo.shape[:2]
    side = int(min(height, width) * rng.uniform(0.3, 0.9))
    y, x = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    crop = Image.fromarray(photo[y : y + side, x : x + side]).resize(
        (IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR
    )
    out = np.asarray(crop).astype(np.float32)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return out * rng.uniform(0.7, 1.2)


def _place(
    canvas: np.ndarray, obj: _Object, long_side: float, taken: list, rng: np.random.Generator
) -> list[float] | None:
    """Paste `obj` scaled so its longer side is `long_side` px at a free random spot; its box,
    or None if no spot overlaps the boxes in `taken` by less than 0.1 IoU."""
    height, width = obj.pixels.shape[:2]
    scale = long_side / max(height, width)
    w, h = max(4, round(width * scale)), max(4, round(height * scale))
    pixels = Image.fromarray(obj.pixels).resize((w, h), Image.Resampling.LANCZOS)
    alpha = Image.fromarray((obj.alpha * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        pixels, alpha = (
            pixels.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
            alpha.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        )
    if rng.random() < 0.3:
        pixels = pixels.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    for _ in range(20):
        x, y = int(rng.integers(0, IMAGE_SIZE - w + 1)), int(rng.integers(0, IMAGE_SIZE - h + 1))
        box = [float(x), float(y), float(x + w), float(y + h)]
        if all(_iou(box, other) < 0.1 for other in taken):
            break
    else:
        return None
    light = rng.uniform(0.75, 1.25) * np.array(rng.uniform(0.9, 1.1, 3), np.float32)
    a = np.asarray(alpha, np.float32)[..., None] / 255.0
    region = canvas[y : y + h, x : x + w]
    region[:] = region * (1 - a) + np.asarray(pixels, np.float32) * light * a
    return box


def _iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _instances(kind: str, split: str) -> list[list[_Object]]:
    """Per class, the instances the split may use: faces and coins split by instance."""
    part = slice(None, None) if split == "all" else (slice(0, None, 4) if split == "val" else None)

    def pick(objects: tuple[_Object, ...]) -> list[_Object]:
        if part is not None:
            return list(objects[part])
        return [o for i, o in enumerate(objects) if i % 4 != 0]  # train: the other three quarters

    if kind == "coins":
        return [pick(_coins())]
    return [pick(_faces()), pick(_coins())] + [[e] for e in _exemplars()]


def compose(
    root: Path | str, kind: str = "objects", count: int = 600, seed: int = 0, split: str = "train"
) -> Path:
    """Write `count` images of set `kind` (one of `SETS`) under `root` as a COCO dataset;
    `split` ("train", "val" or "all") picks which face and coin instances appear.
    Returns the annotations file (``root/annotations.json``, images in ``root/images``)."""
    if kind not in SETS:
        raise ValueError(f"unknown set {kind!r}; expected one of {SETS}")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, SETS.index(kind), ("train", "val", "all").index(split)])
    classes = _instances(kind, split)
    ids, names = (COIN_IDS, ("coin",)) if kind == "coins" else (OBJECT_IDS, OBJECT_NAMES)
    sizes, per_image = ((12, 40), (1, 8)) if kind == "coins" else ((10, 70), (1, 4))
    _, non_faces = _lfw()
    images, annotations = [], []
    for image_id in range(1, count + 1):
        canvas = _background(rng)
        taken: list[list[float]] = []
        if kind == "coins":  # distractors first: round cut-outs that are not coins
            for _ in range(int(rng.integers(0, per_image[1] + 1))):
                patch = non_faces[int(rng.integers(len(non_faces)))]
                round_alpha = _round(patch.shape[0])
                obj = _Object(np.repeat(patch[..., None], 3, axis=2), round_alpha)
                _place(canvas, obj, rng.uniform(*sizes), [], rng)
        for _ in range(int(rng.integers(per_image[0], per_image[1] + 1))):
            label = int(rng.integers(len(classes)))
            obj = classes[label][int(rng.integers(len(classes[label])))]
            box = _place(canvas, obj, rng.uniform(*sizes), taken, rng)
            if box is None:
                continue
            taken.append(box)
            x1, y1, x2, y2 = box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": ids[label],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
        file_name = f"{kind}_{split}_{seed}_{image_id:05d}.jpg"
        noisy = canvas + rng.normal(0, 3, canvas.shape)
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(root / "images" / file_name, quality=90)
        images.append({"id": image_id, "file_name": file_name, "width": IMAGE_SIZE, "height": IMAGE_SIZE})
    document = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": n} for i, n in zip(ids, names)],
    }
    path = root / "annotations.json"
    path.write_text(json.dumps(document))
    return path


def _round(side: int) -> np.ndarray:
    yy, xx = np.mgrid[:side, :side].astype(np.float32) + 0.5
    r = np.hypot(yy - side / 2, xx - side / 2) / (side / 2)
    return np.clip((1.0 - r) * 6, 0, 1)
