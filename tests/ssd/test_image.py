"""`ssd.image`: photos decoded as they are shown (EXIF orientation), against PIL's and
torchvision's own EXIF handling."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.io import decode_jpeg

from ssd.image import ImageError, decode_checked, decode_image, displayed_size, network_input

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision.io


def _photo(fmt: str, orientation: int) -> bytes:
    """A 24 wide, 16 high image that tells every flip and turn apart, with this orientation."""
    pixels = np.zeros((16, 24, 3), np.uint8)
    pixels[:8, :12] = (255, 0, 0)  # top left red
    pixels[:8, 12:] = (0, 255, 0)  # top right green
    pixels[8:, :12] = (0, 0, 255)  # bottom left blue
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, exif=exif, **({"quality": 100} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_each_orientation_decodes_as_pil_shows_it(orientation):
    data = _photo("PNG", orientation)
    shown = np.array(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    got = decode_image(data)
    np.testing.assert_array_equal(got, shown)
    with Image.open(io.BytesIO(data)) as image:
        assert displayed_size(image) == (got.shape[1], got.shape[0])
    assert got.shape[:2] == ((24, 16) if orientation >= 5 else (16, 24))


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_jpeg_orientation_matches_torchvision(orientation):
    data = _photo("JPEG", orientation)
    want = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), apply_exif_orientation=True)
    got = torch.from_numpy(decode_image(data)).permute(2, 0, 1)  # [3, H, W]
    assert got.shape == want.shape
    assert (got.int() - want.int()).abs().max() <= 2  # two JPEG decoders: rounding only


def test_a_malformed_exif_block_is_shown_as_stored():
    data = bytearray(_photo("JPEG", 6))
    start = data.index(b"Exif\x00\x00") + 6
    data[start : start + 8] = b"garbage!"  # the TIFF header of the EXIF block
    assert decode_image(bytes(data)).shape[:2] == (16, 24)


def _real_photo(width: int, height: int, orientation: int = 1) -> bytes:
    """matplotlib's sample photograph (a real JPEG camera picture) at this size."""
    from matplotlib import cbook

    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as image:
        resized = image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    resized.save(buf, "JPEG", quality=90, exif=exif)
    return buf.getvalue()


@pytest.mark.parametrize("orientation", [1, 6])
def test_a_large_jpeg_decodes_at_a_reduced_scale_into_nearly_the_same_network_input(orientation):
    data = _real_photo(1280, 960, orientation)  # 1/4 still leaves both sides >= 200
    full, reduced = decode_image(data), decode_image(data, reduce_to=200)
    assert full.shape[:2] == ((1280, 960) if orientation == 6 else (960, 1280))
    assert reduced.shape[:2] == (full.shape[0] // 4, full.shape[1] // 4)
    difference = np.abs(network_input(full, 200).astype(int) - network_input(reduced, 200).astype(int))
    assert difference.mean() < 1.5 and np.percentile(difference, 99) <= 12  # levels of 255
    # A camera's multi-picture JPEG (MPO) reduces like a JPEG: reading its orientation does not decode it.
    mpo = io.BytesIO()
    Image.fromarray(full).save(mpo, "MPO", save_all=True, append_images=[Image.fromarray(full)])
    assert decode_image(mpo.getvalue(), reduce_to=200).shape == reduced.shape
    # Too small to reduce, or not a JPEG: decoded as it is.
    assert decode_image(_real_photo(320, 240), reduce_to=200).shape[:2] == (240, 320)
    png = io.BytesIO()
    Image.fromarray(full).save(png, "PNG")
    assert decode_image(png.getvalue(), reduce_to=200).shape == full.shape


MODES = {  # how cameras, scanners and tools save images: (PIL mode, format, save options)
    "CMYK jpeg": ("CMYK", "JPEG", {}),
    "grayscale jpeg": ("L", "JPEG", {}),
    "progressive jpeg": ("RGB", "JPEG", {"progressive": True}),
    "palette png": ("P", "PNG", {}),
    "RGBA png": ("RGBA", "PNG", {}),
    "LA png": ("LA", "PNG", {}),
    "16-bit png": ("I;16", "PNG", {}),
    "webp": ("RGB", "WEBP", {}),
}


@pytest.mark.parametrize("kind", list(MODES))
def test_every_image_mode_becomes_rgb_and_reduces_like_its_full_decode(kind):
    mode, fmt, options = MODES[kind]
    with Image.open(io.BytesIO(_real_photo(320, 240))) as photo:
        image = photo.convert("L").convert("I;16") if mode == "I;16" else photo.convert(mode)
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    full, reduced = decode_image(buf.getvalue()), decode_image(buf.getvalue(), reduce_to=64)
    assert full.dtype == np.uint8 and full.shape == (240, 320, 3)
    assert reduced.shape == ((120, 160, 3) if fmt == "JPEG" else (240, 320, 3))  # 1/2: 1/4 is under 64
    difference = np.abs(network_input(full, 64).astype(int) - network_input(reduced, 64).astype(int))
    assert difference.mean() < 2.0  # the same picture, colours included (CMYK too)


def corrupt_png(pixels: np.ndarray) -> bytes:
    """A PNG of `pixels` whose pixel stream is broken under a valid chunk CRC: only decoding
    finds out."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    at = data.index(b"IDAT")
    length = struct.unpack(">I", data[at - 4 : at])[0]
    body = bytearray(data[at + 4 : at + 4 + length])
    body[length // 2 : length // 2 + 40] = bytes(40)
    crc = struct.pack(">I", zlib.crc32(b"IDAT" + bytes(body)))
    return bytes(data[: at + 4]) + bytes(body) + crc + bytes(data[at + 8 + length :])


def test_a_corrupt_png_raises_although_reading_its_exif_decodes_it(tmp_path):
    """A PNG's EXIF may follow its pixels, so reading the orientation decodes the image: the
    decode error must surface, not pass as "no orientation" over half-decoded pixels."""
    import pyarrow.fs as pafs

    from pipelines.data.validation import inspect_image

    broken = corrupt_png(np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8))
    with pytest.raises(OSError, match="broken data stream"):
        decode_image(broken)
    (tmp_path / "broken.png").write_bytes(broken)
    assert inspect_image(pafs.LocalFileSystem(), str(tmp_path / "broken.png"))[2] == "corrupt"  # ingest


def test_decode_checked_refuses_from_the_header_and_names_why():
    """The decoder of untrusted bytes (serving, the MLflow model): the format and the pixel
    count are checked before any pixel is decoded; each refusal says which it is."""
    pixels, shown = decode_checked(_photo("PNG", 6))  # turned: shown 16 wide, 24 high
    assert pixels.shape == (24, 16, 3) and shown == (24, 16)
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, "GIF")
    broken = corrupt_png(np.random.default_rng(0).integers(0, 256, (16, 20, 3), dtype=np.uint8))
    cases = {
        "not_image": (b"\x00 plain bytes" * 8, "not an image"),
        "format": (gif.getvalue(), "GIF images are not accepted"),
        "too_large": (_photo("PNG", 1), "24x16 = 384 pixels exceeds the limit of 383"),
        "corrupt": (broken, "PNG image data is corrupt or truncated"),
    }
    for reason, (data, message) in cases.items():
        with pytest.raises(ImageError, match=message) as refused:
            decode_checked(data, max_pixels=383)
        assert refused.value.reason == reason
