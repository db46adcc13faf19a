"""SSD training augmentations on numpy arrays (SSD §2.2 "Data augmentation", §3.6).

Runs per sample on CPU preprocessing workers, so it is numpy (plus PIL for resizing)
and never touches torch. Every function takes and returns the same formats:

- image: np.ndarray uint8 [H, W, 3], RGB.
- boxes: np.ndarray float32 [N, 4], xyxy in pixels of that image (N may be 0).
- labels: np.ndarray int64 [N], row i labels box i.

Randomness comes only from an explicit `np.random.Generator`; `rng_for` derives one per
(seed, epoch, image) so an epoch can be replayed exactly. Inputs are never modified.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ssd.config import Config

# SSD §2.2 cites Howard (2013) for its photometric distortions; these magnitudes are the
# ones of the Caffe SSD release (and ssd.pytorch's PhotometricDistort).
BRIGHTNESS_DELTA = 32.0  # added to every channel, uint8 units
CONTRAST_RANGE = (0.5, 1.5)  # multiplies every channel
SATURATION_RANGE = (0.5, 1.5)  # multiplies HSV saturation
HUE_DELTA = 18.0  # added to HSV hue, degrees (ssd.pytorch; Caffe's 18 is in OpenCV's 2° units)
DISTORT_P = 0.5  # each distortion is applied independently with this probability

# SSD §3.6: "zoom out" onto a canvas of up to 16x the area (4x each side), filled with the
# mean colour, applied to half of the training images.
EXPAND_MAX_RATIO = 4.0
EXPAND_P = 0.5
# ModelConfig.image_mean (ImageNet, RGB) x 255, rounded: padding normalises to ~0.
MEAN_RGB = (124, 116, 104)

# SSD §2.2 sampler: keep the whole image, or a patch whose jaccard overlap with some object
# is at least 0.1, 0.3, 0.5, 0.7 or 0.9. Patch sides in [0.3, 1] of the image (the Caffe
# release's value; the paper's text says 0.1) and aspect ratio in [1/2, 2].
MIN_IOUS = (None, 0.1, 0.3, 0.5, 0.7, 0.9)
CROP_TRIALS = 50
CROP_MIN_SCALE = 0.3
CROP_MAX_ASPECT = 2.0

FLIP_P = 0.5  # SSD §2.2: "horizontally flipped with probability of 0.5"
MIN_BOX_SIZE = 1.0  # pixels of the output image; thinner boxes are dropped in training


def rng_for(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Generator for image `index` in `epoch` of a run seeded with `seed` (all >= 0).

    SeedSequence mixes the three numbers, so neighbouring images and epochs get
    independent streams and any one sample can be reproduced on its own.
    """
    return np.random.default_rng(np.random.SeedSequence((seed, epoch, index)))


# --- photometric ---------------------------------------------------------------------------


def _rgb_to_hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 or float [H, W, 3] RGB in [0, 255] -> float32 hue [H, W] degrees in [0, 360),
    saturation [H, W] in [0, 1] and value [H, W] in [0, 255]."""
    r, g, b = np.moveaxis(rgb, -1, 0).astype(np.float32)  # planar copies: contiguous maths
    value = np.maximum(np.maximum(r, g), b)
    chroma = value - np.minimum(np.minimum(r, g), b)
    saturation = chroma / np.maximum(value, 1e-6)
    safe = np.where(chroma > 0, chroma, 1.0)  # grey pixels: any hue, 0 by convention
    sixths = np.where(
        value == r, (g - b) / safe, np.where(value == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe)
    )
    # Wrap [-1, 5) to [0, 6) with np.where: masked in-place adds are ~5x slower on noise.
    return np.where(sixths < 0, sixths + 6.0, sixths) * 60.0, saturation, value


def _hsv_to_rgb(hue: np.ndarray, saturation: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Inverse of `_rgb_to_hsv`: float32 [H, W] hue in [0, 360), saturation, value ->
    float32 [H, W, 3] RGB in [0, 255] (a view of planar memory)."""
    # Each channel is V - C + C*ramp(hue), C = V*S, with the ramps as clipped tents:
    # R = clip(|h - 3| - 1), G = clip(2 - |h - 2|), B = clip(2 - |h - 4|), h = hue/60.
    # Planar in-place maths: ~10x faster than masks per sector on interleaved pixels.
    sixths = hue * np.float32(1.0 / 60.0)
    chroma = value * saturation
    base = value - chroma
    out = np.empty((3, *hue.shape), np.float32)
    for ramp, centre, rising in zip(out, (3.0, 2.0, 4.0), (True, False, False), strict=True):
        np.subtract(sixths, centre, out=ramp)
        np.abs(ramp, out=ramp)
        if rising:
            ramp -= 1.0
        else:
            np.subtract(2.0, ramp, out=ramp)
        np.clip(ramp, 0.0, 1.0, out=ramp)
        ramp *= chroma
        ramp += base
    return np.moveaxis(out, 0, -1)


def _adjust_hsv(image: np.ndarray, saturation: float | None, hue: float | None) -> np.ndarray:
    """Scale saturation and/or shift hue (degrees) of a uint8 [H, W, 3] RGB image."""
    h, s, v = _rgb_to_hsv(image)
    if saturation is not None:
        # Caffe SSD distorts 8-bit HSV, so saturation saturates at 1 instead of leaving gamut.
        s = np.clip(s * saturation, 0.0, 1.0)
    if hue is not None:
        h += hue % 360.0
        h = np.where(h >= 360.0, h - 360.0, h)
    return np.ascontiguousarray(_to_uint8(_hsv_to_rgb(h, s, v)))


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0.0, 255.0).astype(np.uint8)


def _tone_lut(brightness: float | None, contrast: float | None) -> np.ndarray:
    """uint8 [256] table of x -> clip(clip(x + brightness) * contrast); None skips a step.

    Brightness and contrast act on each value alone, so on uint8 images a table lookup
    replaces float maths; each step clips because Caffe SSD distorts 8-bit images.
    """
    x = np.arange(256, dtype=np.float32)
    if brightness is not None:
        x = np.clip(x + brightness, 0.0, 255.0)
    if contrast is not None:
        x = np.clip(x * contrast, 0.0, 255.0)
    return _to_uint8(x)


def photometric_distort(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    p: float = DISTORT_P,
    brightness_delta: float = BRIGHTNESS_DELTA,
    contrast_range: tuple[float, float] = CONTRAST_RANGE,
    saturation_range: tuple[float, float] = SATURATION_RANGE,
    hue_delta: float = HUE_DELTA,
    channel_swap: bool = False,
) -> np.ndarray:
    """Random brightness, contrast, saturation and hue, as the Caffe SSD release.

    Brightness first; then, with probability 1/2 each, contrast before or after the HSV
    pair (saturation, hue). Each of the four is applied independently with probability
    `p`; `channel_swap` adds a random RGB permutation with probability `p`. Like Caffe,
    every step rounds back to uint8.

    image: uint8 [H, W, 3] RGB. Returns a new uint8 [H, W, 3] array.
    """
    brightness_on, contrast_on, saturation_on, hue_on = rng.random(4) < p
    contrast_first = rng.random() < 0.5
    brightness = rng.uniform(-brightness_delta, brightness_delta) if brightness_on else None
    contrast = rng.uniform(*contrast_range) if contrast_on else None
    saturation = rng.uniform(*saturation_range) if saturation_on else None
    hue = rng.uniform(-hue_delta, hue_delta) if hue_on else None
    swap = rng.permutation(3) if channel_swap and rng.random() < p else None

    out = image
    early_contrast = contrast if contrast_first else None
    if brightness is not None or early_contrast is not None:
        out = np.take(_tone_lut(brightness, early_contrast), out)
    if saturation is not None or hue is not None:
        out = _adjust_hsv(out, saturation, hue)
    if contrast is not None and not contrast_first:
        out = np.take(_tone_lut(None, contrast), out)
    if swap is not None:
        out = out[..., swap]
    return out.copy() if out is image else out


# --- geometric -----------------------------------------------------------------------------


def expand(
    image: np.ndarray,
    boxes: np.ndarray,
    rng: np.random.Generator,
    *,
    max_ratio: float = EXPAND_MAX_RATIO,
    fill: tuple[int, int, int] = MEAN_RGB,
) -> tuple[np.ndarray, np.ndarray]:
    """SSD §3.6 "zoom out": paste the image at a random spot of a mean-filled canvas.

    Each side grows by the same ratio drawn from U[1, max_ratio]; the random crop that
    follows then sees small objects, which is what lifts SSD's small-object accuracy.

    image: uint8 [H, W, 3]; boxes: float32 [N, 4] xyxy pixels.
    Returns (uint8 [H', W', 3] canvas, float32 [N, 4] boxes in canvas pixels), every box kept.
    """
    height, width = image.shape[:2]
    ratio = rng.uniform(1.0, max_ratio)
    canvas_h, canvas_w = int(height * ratio), int(width * ratio)
    top = int(rng.integers(0, canvas_h - height, endpoint=True))
    left = int(rng.integers(0, canvas_w - width, endpoint=True))
    canvas = np.empty((canvas_h, canvas_w, 3), np.uint8)
    canvas[0] = np.asarray(fill, np.uint8)
    canvas[1:] = canvas[0]  # row copies: ~50x faster than broadcasting a 3-vector
    canvas[top : top + height, left : left + width] = image
    shift = np.array([left, top, left, top], np.float32)
    return canvas, (boxes + shift).astype(np.float32)


def _iou(rects: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of float [T, 4] and [N, 4] xyxy (same units) -> [T, N]; zero-area pairs give 0."""
    lt = np.maximum(rects[:, None, :2], boxes[None, :, :2])  # [T, N, 2]
    rb = np.minimum(rects[:, None, 2:], boxes[None, :, 2:])  # [T, N, 2]
    wh = np.clip(rb - lt, 0.0, None)
    inter = wh[..., 0] * wh[..., 1]  # [T, N]
    area_r = (rects[:, 2] - rects[:, 0]) * (rects[:, 3] - rects[:, 1])  # [T]
    area_b = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # [N]
    union = area_r[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def _centres_inside(rects: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """[T, N] bool: centre of box n strictly inside rect t (both xyxy, same units)."""
    cx = 0.5 * (boxes[:, 0] + boxes[:, 2])  # [N]
    cy = 0.5 * (boxes[:, 1] + boxes[:, 3])
    return (
        (rects[:, None, 0] < cx)
        & (cx < rects[:, None, 2])
        & (rects[:, None, 1] < cy)
        & (cy < rects[:, None, 3])
    )


def sample_iou_crop(
    width: int,
    height: int,
    boxes: np.ndarray,
    min_iou: float,
    rng: np.random.Generator,
    *,
    trials: int = CROP_TRIALS,
    min_scale: float = CROP_MIN_SCALE,
    max_aspect: float = CROP_MAX_ASPECT,
) -> np.ndarray | None:
    """One SSD §2.2 patch for a `width` x `height` image, or None if all trials fail.

    Draws `trials` candidates at once: each side a fraction U[min_scale, 1] of the image's,
    width/height within [1/max_aspect, max_aspect], at a random integer position. The
    first candidate that contains the centre of some box with IoU >= `min_iou` wins (an
    object must survive the crop, so the overlap only counts for boxes kept by `crop`).
    `min_iou=0` gives the paper's "randomly sample a patch" option.

    boxes: float32 [N, 4] xyxy pixels. Returns int64 [4] xyxy pixels, or None.
    """
    if len(boxes) == 0:
        return None
    scales = rng.uniform(min_scale, 1.0, size=(trials, 2))  # [T, (w, h)]
    offsets = rng.random((trials, 2))  # [T, (x, y)] fractions of the free space
    size = np.maximum(np.floor(scales * (width, height)), 1.0)  # [T, 2] pixels
    origin = np.floor(offsets * ((width, height) - size + 1.0))  # [T, 2] in [0, free]
    rects = np.concatenate([origin, origin + size], axis=1)  # [T, 4] xyxy
    aspect = size[:, 0] / size[:, 1]
    shape_ok = (aspect >= 1.0 / max_aspect) & (aspect <= max_aspect)  # [T]
    hit = (_iou(rects, boxes) >= min_iou) & _centres_inside(rects, boxes)  # [T, N]
    ok = shape_ok & hit.any(axis=1)
    if not ok.any():
        return None
    return rects[int(np.argmax(ok))].astype(np.int64)


def crop(
    image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, rect: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut `rect` out of the image; keep a box iff its centre is strictly inside `rect`.

    SSD §2.2: "We keep the overlapped part of the ground truth box if the center of it is
    in the sampled patch." Kept boxes are clipped to the patch; the others are dropped
    together with their labels, order preserved.

    image: uint8 [H, W, 3]; boxes: float32 [N, 4] xyxy pixels; labels: int64 [N];
    rect: int [4] xyxy pixels inside the image.
    Returns (uint8 [y2-y1, x2-x1, 3], float32 [M, 4] xyxy patch pixels, int64 [M]).
    """
    x1, y1, x2, y2 = (int(v) for v in rect)
    keep = _centres_inside(np.asarray(rect, np.float64)[None], boxes)[0]  # [N]
    kept = boxes[keep] - np.array([x1, y1, x1, y1], np.float32)
    kept = np.clip(kept, 0.0, np.array([x2 - x1, y2 - y1] * 2, np.float32))
    patch = np.ascontiguousarray(image[y1:y2, x1:x2])
    return patch, kept.astype(np.float32), labels[keep]


def random_iou_crop(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    *,
    min_ious: tuple[float | None, ...] = MIN_IOUS,
    trials: int = CROP_TRIALS,
    min_scale: float = CROP_MIN_SCALE,
    max_aspect: float = CROP_MAX_ASPECT,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SSD §2.2 sampler: pick a mode from `min_ious` uniformly, then `sample_iou_crop` + `crop`.

    Mode None keeps the whole image. If no trial satisfies the mode (or there are no
    boxes), the inputs are returned unchanged (as copies), unlike ssd.pytorch, which
    retries other modes forever.

    Same formats as `crop`; the output image is the patch.
    """
    min_iou = min_ious[int(rng.integers(len(min_ious)))]
    height, width = image.shape[:2]
    rect = None
    if min_iou is not None:
        rect = sample_iou_crop(
            width, height, boxes, min_iou, rng, trials=trials, min_scale=min_scale, max_aspect=max_aspect
        )
    if rect is None:
        return image.copy(), boxes.astype(np.float32), labels.copy()
    return crop(image, boxes, labels, rect)


def horizontal_flip(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror left-right: x -> W - x, so [x1, y1, x2, y2] -> [W - x2, y1, W - x1, y2].

    image: uint8 [H, W, 3]; boxes: float32 [N, 4] xyxy pixels. Returns the same shapes.
    """
    width = image.shape[1]
    flipped = boxes[:, [2, 1, 0, 3]].astype(np.float32)
    flipped[:, [0, 2]] = width - flipped[:, [0, 2]]
    return np.ascontiguousarray(image[:, ::-1]), flipped


def random_horizontal_flip(
    image: np.ndarray, boxes: np.ndarray, rng: np.random.Generator, *, p: float = FLIP_P
) -> tuple[np.ndarray, np.ndarray]:
    """`horizontal_flip` with probability `p`, else copies of the inputs."""
    if rng.random() < p:
        return horizontal_flip(image, boxes)
    return image.copy(), boxes.astype(np.float32)


def resize(image: np.ndarray, boxes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Stretch to `size` x `size` (SSD warps, it does not keep the aspect ratio).

    PIL bilinear, which low-pass filters when shrinking, so no aliasing from 4x canvases.
    image: uint8 [H, W, 3]; boxes: float32 [N, 4] xyxy pixels.
    Returns (uint8 [size, size, 3], float32 [N, 4] xyxy pixels of the resized image).
    """
    height, width = image.shape[:2]
    resized = Image.fromarray(np.ascontiguousarray(image)).resize((size, size), Image.Resampling.BILINEAR)
    scale = np.array([size / width, size / height] * 2, np.float32)
    return np.asarray(resized), np.clip(boxes * scale, 0.0, float(size)).astype(np.float32)


# --- pipelines -----------------------------------------------------------------------------


def drop_small_boxes(
    boxes: np.ndarray, labels: np.ndarray, *, min_size: float = MIN_BOX_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Drop boxes narrower or shorter than `min_size` pixels, with their labels.

    Cropping and shrinking can leave slivers; a zero-width target makes the log in the
    SSD box encoding (eq. 2) infinite. boxes: float32 [N, 4] xyxy pixels; labels: [N].
    """
    keep = ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)
    return boxes[keep], labels[keep]


def _to_unit(boxes: np.ndarray, size: int) -> np.ndarray:
    """float32 [N, 4] xyxy pixels of a size x size image -> float32 [N, 4] xyxy in [0, 1]."""
    return np.clip(boxes / np.float32(size), 0.0, 1.0).astype(np.float32)


def smallest_object(cfg: Config) -> float:
    """The `min_object` (output pixels) of `cfg`'s training: ``data.zoom_out_floor`` times the
    size of its smallest default box (the first scale of the paper's rule or list)."""
    return cfg.data.zoom_out_floor * cfg.anchors.resolved_scales()[0] * cfg.model.image_size


def zoom_out_limit(
    shape: tuple[int, int],
    boxes: np.ndarray,
    size: int,
    min_object: float,
    *,
    max_ratio: float = EXPAND_MAX_RATIO,
) -> float:
    """The largest expand ratio (at most `max_ratio`) that leaves every box's scale (the
    square root of its area), once the image is resized to `size`, at least `min_object`
    pixels; `max_ratio` when
    `min_object` is 0 or there are no boxes. A box already below it allows no zoom-out (1.0).

    shape: (height, width) of the image; boxes: float32 [N, 4] xyxy pixels of it.
    """
    if min_object <= 0 or len(boxes) == 0:
        return max_ratio
    height, width = shape
    # after expand by r and resize, a side of w px in a W px image is w * size / (r * W) px
    scales = np.sqrt((boxes[:, 2] - boxes[:, 0]) / width * (boxes[:, 3] - boxes[:, 1]) / height)
    return float(np.clip(scales.min() * size / min_object, 1.0, max_ratio))


def train_transform(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    size: int,
    rng: np.random.Generator,
    *,
    augment: bool = True,
    min_object: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The SSD training pipeline for one image.

    augment=True: photometric distortion -> expand (p = 1/2) -> random IoU crop ->
    horizontal flip (p = 1/2) -> resize -> drop boxes under 1 output pixel wide or tall.
    augment=False: resize only. Either way boxes end normalised by `size`.

    `min_object` (output pixels, 0 = the paper's unbounded zoom-out) caps the expand ratio
    so that no object's scale (square root of its area) is shrunk below it (`zoom_out_limit`): on data whose
    objects are already small, a 4x zoom-out turns them into a few pixels no default box
    can match, and their localisation targets then dominate the loss.

    image: uint8 [H, W, 3]; boxes: float32 [N, 4] xyxy pixels; labels: int64 [N].
    Returns (uint8 [size, size, 3], float32 [M, 4] xyxy in [0, 1], int64 [M]), M <= N.
    """
    if not augment:
        out, out_boxes = resize(image, boxes, size)
        return out, _to_unit(out_boxes, size), labels.astype(np.int64)
    # Colour first, on the smallest image (before the canvas can grow up to 16x).
    image = photometric_distort(image, rng)
    if rng.random() < EXPAND_P:
        limit = zoom_out_limit(image.shape[:2], boxes, size, min_object)
        if limit > 1.0:
            image, boxes = expand(image, boxes, rng, max_ratio=limit)
    image, boxes, labels = random_iou_crop(image, boxes, labels, rng)
    image, boxes = random_horizontal_flip(image, boxes, rng)
    image, boxes = resize(image, boxes, size)
    boxes, labels = drop_small_boxes(boxes, labels)
    return image, _to_unit(boxes, size), labels.astype(np.int64)


def eval_transform(image: np.ndarray, boxes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize to `size` x `size` and normalise boxes; deterministic, every box kept.

    image: uint8 [H, W, 3]; boxes: float32 [N, 4] xyxy pixels.
    Returns (uint8 [size, size, 3], float32 [N, 4] xyxy in [0, 1]).
    """
    out, out_boxes = resize(image, boxes, size)
    return out, _to_unit(out_boxes, size)
