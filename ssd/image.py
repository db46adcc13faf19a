"""Images → pixels → network input: the one decoder and the one eval-time input function.

Training's eval transform, evaluation, labelling and serving all turn an image into the
network's input here, so the four cannot drift apart. Images are read as viewers and labelling
tools show them: the EXIF orientation tag (a phone held upright stores its photo sideways and
says so there) is applied to the pixels, and sizes are the displayed ones (`displayed_size`),
so annotations drawn on the displayed image match.
"""

from __future__ import annotations

import io
from typing import BinaryIO

import numpy as np
from PIL import Image, JpegImagePlugin

from ssd.transforms import eval_transform

_NO_BOXES = np.zeros((0, 4), np.float32)


_ORIENTATION_TAG = 0x0112  # EXIF Orientation: 1 = as stored; 2-8 = mirrored and/or turned
# The transposition that shows the stored pixels the way orientation k says (as PIL's
# ImageOps.exif_transpose, which copies the whole image even when there is nothing to do).
_TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_TURNED = {5, 6, 7, 8}  # orientations that swap width and height


# The most pixels an image may have, checked from its header before any pixel is decoded:
# where PIL's own decompression-bomb check refuses an image by default (twice its
# MAX_IMAGE_PIXELS); 16384 x 10922, so a 12 MP or 108 MP photo passes.
MAX_PIXELS = 178_956_970


def orientation(image: Image.Image) -> int:
    """The EXIF orientation of an opened image (1 when it has none or an unreadable one).

    A JPEG's EXIF block precedes its pixels and is read without decoding. Other formats (PNG,
    WebP) may store it after the pixels, so they are decoded first, outside the EXIF error
    handling: a corrupt image raises here instead of passing as one without orientation."""
    if not isinstance(image, JpegImagePlugin.JpegImageFile):  # JPEG and its camera variant MPO
        image.load()
    try:
        value = image.getexif().get(_ORIENTATION_TAG, 1)
    except (OSError, SyntaxError, ValueError, TypeError):  # a malformed EXIF block: show as stored
        return 1
    return value if isinstance(value, int) and value in _TRANSPOSES else 1


def displayed_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image as shown, from its header (no decoding)."""
    width, height = image.size
    return (height, width) if orientation(image) in _TURNED else (width, height)


def rgb_pixels(image: Image.Image) -> np.ndarray:
    """An opened PIL image decoded to uint8 [H, W, 3] RGB (any mode: L, P, RGBA, CMYK, I;16...),
    in its displayed orientation."""
    turn = _TRANSPOSES.get(orientation(image))
    rgb = image.convert("RGB")
    return np.array(rgb if turn is None else rgb.transpose(turn))


def reduce_for(image: Image.Image, size: int | None) -> None:
    """Before decoding an opened image that is then resized to `size` x `size`: a JPEG decodes
    at the smallest DCT scale (1/2, 1/4, 1/8) that leaves both sides at least `size` pixels
    (libjpeg's scaled decoding). Measured on a photo, network inputs differ from a full decode
    by 0.3-0.7 levels of 255 on average, and a 12 MP JPEG decodes 9-19x faster for 128-512 px
    inputs. Other formats, and None, decode at full size."""
    if size is not None:
        image.draft(None, (size, size))


def decode_image(data: bytes | BinaryIO | str, reduce_to: int | None = None) -> np.ndarray:
    """Image bytes, a binary file or a local path → uint8 [H, W, 3] RGB as shown; with
    `reduce_to`, possibly at a reduced scale (`reduce_for`): take the image's size from its
    header or annotation, not from these pixels."""
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
        reduce_for(image, reduce_to)
        return rgb_pixels(image)


def network_input(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] pixels → uint8 [3, size, size], resized as `ssd.transforms.eval_transform`."""
    resized, _ = eval_transform(pixels, _NO_BOXES, size)  # [S, S, 3]
    return np.ascontiguousarray(resized.transpose(2, 0, 1))
