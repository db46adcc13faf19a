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


# The formats an image sent for inference (serving, the MLflow model) may have, and the common
# ones PIL may identify so that they are refused as such rather than as "not an image". Never
# EPS & co., whose PIL plugins run external programs.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
IDENTIFIED_FORMATS = (*ACCEPTED_FORMATS, "GIF", "TIFF", "ICO")


class ImageError(ValueError):
    """Image bytes `decode_checked` does not decode. `reason` is ``"not_image"`` (no format we
    identify), ``"format"`` (identified, not accepted), ``"too_large"`` (more than the pixel
    limit, from the header) or ``"corrupt"`` (the pixels do not decode)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def decode_checked(
    data: bytes, *, max_pixels: int = MAX_PIXELS, reduce_to: int | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """Untrusted image bytes → (uint8 [h, w, 3] RGB as shown, the image's (height, width) as
    shown), the format and pixel count checked from the header before any pixel is decoded
    (`ImageError` otherwise). With `reduce_to` a JPEG may decode at a reduced scale
    (`reduce_for`), so h, w can be smaller than the size returned beside them."""
    accepted = ", ".join(ACCEPTED_FORMATS)
    try:
        image = Image.open(io.BytesIO(data), formats=IDENTIFIED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageError("too_large", f"image exceeds the limit of {max_pixels} pixels ({exc})") from None
    except (OSError, SyntaxError, ValueError):  # PIL's UnidentifiedImageError is an OSError
        raise ImageError("not_image", f"not an image ({accepted} are accepted)") from None
    with image:
        if image.format not in ACCEPTED_FORMATS:
            raise ImageError("format", f"{image.format} images are not accepted; send one of {accepted}")
        width, height = image.size
        if width * height > max_pixels:
            pixels = f"{width}x{height} = {width * height} pixels"
            raise ImageError("too_large", f"image of {pixels} exceeds the limit of {max_pixels}")
        try:
            shown_width, shown_height = displayed_size(image)  # decodes a PNG: its EXIF may follow the pixels
            reduce_for(image, reduce_to)
            return rgb_pixels(image), (shown_height, shown_width)
        except (OSError, SyntaxError, ValueError) as exc:
            message = f"{image.format} image data is corrupt or truncated: {exc}"
            raise ImageError("corrupt", message) from None


def network_input(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] pixels → uint8 [3, size, size], resized as `ssd.transforms.eval_transform`."""
    resized, _ = eval_transform(pixels, _NO_BOXES, size)  # [S, S, 3]
    return np.ascontiguousarray(resized.transpose(2, 0, 1))
