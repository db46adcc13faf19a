"""The MLflow pyfunc model of a rayssd checkpoint, logged as code (MLflow "models from code").

`pipelines.track.registry.log_model` logs this file with ``artifacts={"checkpoint": ...}``; MLflow
runs it when the model is loaded, so no Python object is ever pickled. The weights are
read with ``weights_only=True`` like every other rayssd checkpoint.

rayssd itself loads registered models with `pipelines.track.models.load_model` (straight from
the checkpoint); this class is for ``mlflow.pyfunc.load_model`` and ``mlflow models serve``.
It takes what a client has: encoded images, decoded with the checks of ``rayssd serve``
(`ssd.image.decode_checked`: format and pixel count from the header first).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from ssd import checkpoint
from ssd import config as C
from ssd.detector import Detector
from ssd.image import ImageError, decode_checked, network_input

COLUMN = "image"
MAX_DETECTIONS = 1000  # the most a caller may ask for per image, as `rayssd serve`
CHUNK = 16  # images decoded and run together: bounds the decoded pixels held at once


def _refuse(message: str) -> MlflowException:
    """A bad request: the scoring server answers 400 with the message."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


class SSDModel(mlflow.pyfunc.PythonModel):
    """A column ``image`` of encoded image bytes (JPEG, PNG, WebP or BMP; base64 in JSON) →
    per row the detections in that image's own pixels."""

    def load_context(self, context: Any) -> None:
        ckpt = checkpoint.load(context.artifacts["checkpoint"])
        model, cfg = checkpoint.build_model(ckpt)
        self.detector = Detector(model, cfg, channels_last=None, batch=CHUNK)
        self.image_size = cfg.model.image_size
        self.default_max = cfg.inference.max_detections
        self.class_names = list(ckpt["dataset"]["class_names"])

    # MLflow 3 derives an input schema from predict's type hint and warns when it cannot;
    # pd.DataFrame is a hint it takes without deriving one, leaving the logged signature
    # (`pipelines.track.registry._signature`) in charge.
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """model_input: rows with a column ``image`` of encoded image bytes (a base64 str is
        decoded too); params: optional ``score_threshold`` in [0, 1) and ``max_detections``.

        Returns one dict per row, in order: ``boxes`` float32 [K, 4] xyxy in the image's own
        pixels, ``scores`` float32 [K] descending, ``labels`` int64 [K] in 1..num_classes-1,
        ``names`` [K], and the image's ``width`` and ``height`` as shown. A row that is not
        an image is refused (MlflowException, HTTP 400 from the scoring server) naming its
        row, counted from 0; nothing is returned for the others."""
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if COLUMN not in frame.columns:
            raise _refuse(f"the input needs a column {COLUMN!r} of encoded images; got {list(frame.columns)}")
        threshold, most = self._params(params or {})
        values = frame[COLUMN].tolist()
        out: list[dict[str, Any]] = []
        for start in range(0, len(values), CHUNK):
            inputs, sizes = [], []
            for row, value in enumerate(values[start : start + CHUNK], start=start):
                try:
                    pixels, shown = decode_checked(_image_bytes(value), reduce_to=self.image_size)
                except (ImageError, TypeError) as exc:
                    raise _refuse(f"row {row}: {exc}") from None
                inputs.append(network_input(pixels, self.image_size))
                sizes.append(shown)
            detections = self.detector(
                torch.from_numpy(np.stack(inputs)), sizes, score_threshold=threshold, max_detections=most
            )
            out += [
                {
                    "boxes": d["boxes"].numpy(),
                    "scores": d["scores"].numpy(),
                    "labels": d["labels"].numpy(),
                    "names": [self._name(int(label)) for label in d["labels"]],
                    "width": width,
                    "height": height,
                }
                for d, (height, width) in zip(detections, sizes)
            ]
        return out

    def _params(self, params: dict[str, Any]) -> tuple[float, int]:
        threshold = params.get("score_threshold", C.ANSWER_SCORE_THRESHOLD)
        most = params.get("max_detections", self.default_max)
        try:
            threshold = float(threshold)
        except (TypeError, ValueError):
            threshold = float("nan")
        if not 0.0 <= threshold < 1.0:
            raise _refuse(f"score_threshold must be a number in [0, 1), got {params['score_threshold']!r}")
        if isinstance(most, float) and most.is_integer():
            most = int(most)
        whole = isinstance(most, (int, np.integer)) and not isinstance(most, bool)
        if not whole or not 1 <= most <= MAX_DETECTIONS:
            raise _refuse(f"max_detections must be an integer in 1..{MAX_DETECTIONS}, got {most!r}")
        return threshold, int(most)

    def _name(self, label: int) -> str:
        return self.class_names[label - 1] if 1 <= label <= len(self.class_names) else str(label)


def _image_bytes(value: Any) -> bytes:
    """A cell of the ``image`` column as bytes: bytes as they are, a str as base64 (a client
    that skipped the signature's binary decoding)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=False)
        except (binascii.Error, ValueError):
            raise TypeError("a str that is not base64-encoded image bytes") from None
    raise TypeError(f"expected encoded image bytes, got {type(value).__name__}")


mlflow.models.set_model(SSDModel())
