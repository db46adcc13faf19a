"""Images → pixels → network input: the one decoder and the one eval-time input function.

Training's eval transform, evaluation, labelling and serving all turn an image into the
network's input here, so the four cannot drift apart. Orientation tags (EXIF) are not
applied: boxes are labelled on the stored pixels, as in training.
"""

from __future__ import annotations

import io
from typing import BinaryIO

import numpy as np
from PIL import Image

from ssd.transforms import eval_transform

_NO_BOXES = np.zeros((0, 4), np.float32)


def rgb_pixels(image: Image.Image) -> np.ndarray:
    """An opened PIL image decoded to uint8 [H, W, 3] RGB (any mode: L, P, RGBA, CMYK, I;16...)."""
    return np.array(image.convert("RGB"))


def decode_image(data: bytes | BinaryIO | str) -> np.ndarray:
    """Image bytes, a binary file or a local path → uint8 [H, W, 3] RGB."""
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
        return rgb_pixels(image)


def network_input(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] pixels → uint8 [3, size, size], resized as `ssd.transforms.eval_transform`."""
    resized, _ = eval_transform(pixels, _NO_BOXES, size)  # [S, S, 3]
    return np.ascontiguousarray(resized.transpose(2, 0, 1))
