"""The ingress's side of `POST /detect`: check the request, read the image's bytes (raw or
multipart), decode and resize them, and read the query. Every refusal is a `RequestError`
carrying the HTTP status `pipelines.serve.deployments` answers with (see its docstring for the contract).
"""

import math
from typing import Any

import numpy as np
from fastapi import Request
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from ssd import config as C
from ssd.image import ACCEPTED_FORMATS, ImageError, decode_checked, network_input

ACCEPTED_TYPES = {f"image/{name.lower()}": name for name in ACCEPTED_FORMATS}
GENERIC_TYPES = ("", "application/octet-stream")  # no claim: the format is read from the bytes
DEFAULT_SCORE_THRESHOLD = C.ANSWER_SCORE_THRESHOLD
MAX_DETECTIONS = 1000


class RequestError(Exception):
    """A request we refuse: the HTTP status and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def check_media_type(media: str, where: str) -> None:
    if media not in ACCEPTED_TYPES and media not in GENERIC_TYPES:
        raise RequestError(
            415, f"{where} type {media!r} is not accepted; send one of {', '.join(ACCEPTED_TYPES)}"
        )


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def image_bytes(request: Request, limit: int) -> bytes:
    """The image's bytes from a raw or a multipart body (its format is read from the bytes)."""
    media = media_type(request.headers.get("content-type"))
    if media != "multipart/form-data":
        check_media_type(media, "content")
    body = await read_body(request, limit)
    if not body:
        raise RequestError(400, "empty request body; send the image bytes or a multipart file part")
    if media != "multipart/form-data":
        return body
    return await _multipart_file(request.headers, body)


async def _multipart_file(headers: Headers, body: bytes) -> bytes:
    async def once():
        yield body

    try:
        form = await MultiPartParser(headers, once(), max_files=1, max_fields=8).parse()
    except MultiPartException as exc:
        raise RequestError(400, f"malformed multipart body: {exc.message}") from None
    files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
    if not files:
        raise RequestError(
            400, "multipart body has no file part; send the image as a file field, e.g. 'file'"
        )
    check_media_type(media_type(files[0].content_type), f"multipart part {files[0].filename or 'file'!r}")
    data = await files[0].read()
    await form.close()
    if not data:
        raise RequestError(400, "the multipart file part is empty")
    return data


# ssd.image.decode_checked's refusals as HTTP statuses.
_STATUS = {"not_image": 400, "format": 415, "too_large": 413, "corrupt": 422}


def decode(data: bytes, max_pixels: int, reduce_to: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Image bytes → (uint8 [h, w, 3] RGB, the image's (height, width) as shown), checking the
    format and pixel count from the header first (`ssd.image.decode_checked`, the decoder of
    the MLflow model too). With `reduce_to` a JPEG may decode at a reduced scale
    (`ssd.image.reduce_for`), so h, w can be smaller than the size returned beside them."""
    try:
        return decode_checked(data, max_pixels=max_pixels, reduce_to=reduce_to)
    except ImageError as exc:
        message = str(exc)
        if exc.reason == "not_image":
            message = f"body is not an image; send one of {', '.join(ACCEPTED_TYPES)}"
        elif exc.reason == "format":
            message = message.split(";")[0] + f"; send one of {', '.join(ACCEPTED_TYPES)}"
        raise RequestError(_STATUS[exc.reason], message) from None


def prepare(data: bytes, max_pixels: int, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Image bytes → (uint8 [3, size, size], original (height, width))."""
    pixels, shown = decode(data, max_pixels, reduce_to=size)  # [h, w, 3], (H, W)
    return network_input(pixels, size), shown


def detect_params(query: Any, default_max: int) -> tuple[float, int]:
    """(score_threshold, max_detections) from the query string; 422 naming the bad one."""
    threshold, most = DEFAULT_SCORE_THRESHOLD, default_max
    raw = query.get("score_threshold")
    if raw is not None:
        try:
            threshold = float(raw)
        except ValueError:
            threshold = math.nan
        if not 0.0 <= threshold < 1.0:
            raise RequestError(422, f"score_threshold must be a number in [0, 1), got {raw!r}")
    raw = query.get("max_detections")
    if raw is not None:
        if not raw.strip().isdigit() or not 1 <= int(raw) <= MAX_DETECTIONS:
            raise RequestError(422, f"max_detections must be an integer in 1..{MAX_DETECTIONS}, got {raw!r}")
        most = int(raw)
    return threshold, most
