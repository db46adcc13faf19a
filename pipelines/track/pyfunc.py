"""The MLflow pyfunc model of a rayssd checkpoint, logged as code (MLflow "models from code").

`pipelines.track.registry.log_model` logs this file with ``artifacts={"checkpoint": ...}``; MLflow
runs it when the model is loaded, so no Python object is ever pickled. The weights are
read with ``weights_only=True`` like every other rayssd checkpoint.

rayssd itself loads registered models with `pipelines.track.models.load_model` (straight from
the checkpoint); this class is for ``mlflow.pyfunc.load_model`` and ``mlflow models serve``.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import torch

from ssd import checkpoint
from ssd import config as C
from ssd.detector import Detector


class SSDModel(mlflow.pyfunc.PythonModel):
    """uint8 images [B, 3, S, S] (already resized to the model's input) → detections."""

    def load_context(self, context: Any) -> None:
        ckpt = checkpoint.load(context.artifacts["checkpoint"])
        model, cfg = checkpoint.build_model(ckpt)
        self.detector = Detector(model, cfg, channels_last=True)
        self.image_size = cfg.model.image_size
        self.class_names = list(ckpt["dataset"]["class_names"])

    # MLflow 3 derives an input schema from predict's type hint and warns when it cannot (or
    # when there is none); np.ndarray is the hint it accepts without deriving one, leaving
    # the logged tensor signature (pipelines.track.tracker) in charge.
    def predict(
        self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """model_input: uint8 [B, 3, S, S]; params: optional ``score_threshold``.

        Returns B dicts: ``boxes`` float32 [K, 4] xyxy in input pixels (0..S), ``scores``
        float32 [K] descending, ``labels`` int64 [K] in 1..num_classes-1, ``names`` [K]."""
        images = np.asarray(model_input)
        size = self.image_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (3, size, size):
            raise ValueError(
                f"expected uint8 images [B, 3, {size}, {size}], got {images.dtype} {list(images.shape)}"
            )
        threshold = float((params or {}).get("score_threshold", C.ANSWER_SCORE_THRESHOLD))
        detections = self.detector(
            torch.from_numpy(np.ascontiguousarray(images)),
            [(size, size)] * len(images),
            score_threshold=threshold,
        )
        return [
            {
                "boxes": d["boxes"].numpy(),
                "scores": d["scores"].numpy(),
                "labels": d["labels"].numpy(),
                "names": [self._name(int(label)) for label in d["labels"]],
            }
            for d in detections
        ]

    def _name(self, label: int) -> str:
        return self.class_names[label - 1] if 1 <= label <= len(self.class_names) else str(label)


mlflow.models.set_model(SSDModel())
