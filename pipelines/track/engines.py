"""ONNX Runtime as an inference engine: an exported end-to-end graph (`ssd.export`) called like
`ssd.detector.Detector`, so labelling and serving run either without knowing which.

The graph holds decoding and NMS at the thresholds it was exported with; a call asking for a
higher score threshold or fewer detections filters its output, which equals running the
post-processing at those settings (a higher threshold only removes low scores, and greedy
NMS only lets higher scores suppress lower ones). Asking for less than the export's threshold
or more than its detection count gets the export's (logged once).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ssd import config as C
from ssd.export import METADATA_FORMAT, load_torchscript

log = logging.getLogger(__name__)

ONNX_SUFFIX = ".onnx"
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


def onnxruntime() -> Any:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise RuntimeError(
            "running an .onnx model needs ONNX Runtime: pip install 'rayssd[onnx]' (or onnxruntime-gpu)"
        ) from exc
    ort.set_default_logger_severity(3)  # errors only: its warnings are about graph rewrites
    return ort


def session(path: str | Path, *, threads: int | None = None, device: str = "cpu") -> Any:
    """An ONNX Runtime session of `path`: the CUDA provider for a CUDA `device` when this
    onnxruntime has it, else the CPU provider with `threads` intra-op threads (None: ORT's
    default, one per core). A file ONNX Runtime cannot read raises ValueError naming it."""
    ort = onnxruntime()
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    providers = [CPU_PROVIDER]
    if str(device).startswith("cuda") and CUDA_PROVIDER in ort.get_available_providers():
        providers.insert(0, CUDA_PROVIDER)
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path} is not a readable ONNX model: {first}") from None


def export_metadata(sess: Any, path: str | Path) -> tuple[C.Config, dict[str, Any]]:
    """(config, dataset) from a session's rayssd metadata (`ssd.export.metadata`)."""
    meta = sess.get_modelmeta().custom_metadata_map
    if meta.get("rayssd.format") != METADATA_FORMAT:
        raise ValueError(
            f"{path} is an ONNX model but not a rayssd export (no {METADATA_FORMAT!r} metadata); "
            "write one with `rayssd export`"
        )
    cfg = C.from_dict(json.loads(meta["config"]))
    dataset = {
        "class_names": json.loads(meta["class_names"]),
        "category_ids": json.loads(meta["category_ids"]),
    }
    return cfg, dataset


class ExportedDetector:
    """Callable like `ssd.detector.Detector`: uint8 images [B, 3, S, S] and their original
    sizes → detections in original pixels, from an exported graph's padded outputs.
    Subclasses run the graph (`_run`)."""

    def __init__(self, path: str | Path, meta: dict[str, str]) -> None:
        self.path = str(path)
        self.image_size = int(meta["image_size"])
        self.score_threshold = float(meta["score_threshold"])
        self.max_detections = int(meta["max_detections"])
        self._warned = False

    def _run(self, images: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError

    def __call__(
        self,
        images: Tensor | np.ndarray,
        image_sizes: Sequence[tuple[int, int]] | Tensor,
        score_threshold: float | None = None,
        max_detections: int | None = None,
    ) -> list[dict[str, Tensor]]:
        """As `Detector.__call__`: B dicts of ``boxes`` float32 [K, 4] xyxy original pixels,
        ``scores`` [K] descending, ``labels`` int64 [K], on the CPU."""
        array = images.numpy() if isinstance(images, Tensor) else np.asarray(images)
        size = self.image_size
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1:] != (3, size, size):
            raise ValueError(
                f"images must be uint8 [B, 3, {size}, {size}], got {array.dtype} {list(array.shape)}"
            )
        threshold, limit = self._settings(score_threshold, max_detections)
        boxes, scores, labels, counts = self._run(np.ascontiguousarray(array))
        sizes = torch.as_tensor(image_sizes, dtype=torch.float32).reshape(-1, 2)  # (h, w)
        scale = (sizes[:, [1, 0, 1, 0]] / size).numpy()  # input pixels → original, per image
        out = []
        for i, count in enumerate(counts.tolist()):
            keep = scores[i, :count] > threshold
            keep[np.cumsum(keep) > limit] = False
            out.append(
                {
                    "boxes": torch.from_numpy(boxes[i, :count][keep] * scale[i]),
                    "scores": torch.from_numpy(scores[i, :count][keep]),
                    "labels": torch.from_numpy(labels[i, :count][keep].astype(np.int64)),
                }
            )
        return out

    def _settings(self, score_threshold: float | None, max_detections: int | None) -> tuple[float, int]:
        threshold = self.score_threshold if score_threshold is None else float(score_threshold)
        limit = self.max_detections if max_detections is None else int(max_detections)
        if (threshold < self.score_threshold or limit > self.max_detections) and not self._warned:
            self._warned = True
            log.warning(
                "%s was exported with score threshold %g and at most %d detections; asked for %g "
                "and %d, it gives the export's (export again with other settings for more)",
                self.path, self.score_threshold, self.max_detections, threshold, limit,
            )  # fmt: skip
        return max(threshold, self.score_threshold), min(limit, self.max_detections)


class OnnxDetector(ExportedDetector):
    """An exported ``.onnx`` file on ONNX Runtime (`session`)."""

    def __init__(self, path: str | Path, *, threads: int | None = None, device: str = "cpu") -> None:
        self.session = session(path, threads=threads, device=device)
        self.cfg, self.dataset = export_metadata(self.session, path)
        super().__init__(path, self.session.get_modelmeta().custom_metadata_map)

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def _run(self, images: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {"images": images})


class TorchScriptDetector(ExportedDetector):
    """An exported TorchScript file on LibTorch (here: ``torch.jit.load``)."""

    def __init__(self, path: str | Path) -> None:
        self.module, meta = load_torchscript(path)
        super().__init__(path, meta)

    def _run(self, images: np.ndarray) -> list[np.ndarray]:
        with torch.inference_mode():
            return [t.numpy() for t in self.module(torch.from_numpy(images))]


def exported_detector(path: str | Path) -> ExportedDetector:
    """The runner of an exported file: ONNX Runtime for ``.onnx``, else TorchScript."""
    return OnnxDetector(path, threads=1) if Path(path).suffix == ONNX_SUFFIX else TorchScriptDetector(path)


def compare(path: str | Path, model: torch.nn.Module, cfg: C.Config, images: np.ndarray) -> dict[str, Any]:
    """The exported file at `path` against `model` through `ssd.detector.Detector`, both at the
    export's settings, on `images` (uint8 [B, 3, S, S]; boxes compared in input pixels).

    Float rounding may order detections whose scores differ by ~1e-8 either way, so each of
    torch's detections is paired with the nearest unpaired exported one of the same label and
    a score within `SCORE_TIE`; at the detection limit, the scores tied with the last are left
    out (either may be cut). Returns ``images``, ``detections`` (torch's count),
    ``same_labels`` (every detection paired, none left over) and ``max_box_diff`` (pixels,
    the largest coordinate difference of a pair)."""
    from ssd.detector import Detector

    exported = exported_detector(path)
    size, limit = exported.image_size, exported.max_detections
    sizes = [(size, size)] * len(images)
    ours = exported(images, sizes)
    reference = Detector(model, cfg)(torch.from_numpy(images), sizes, exported.score_threshold, limit)
    same, worst = True, 0.0
    for a, b in zip(ours, reference):
        diffs = _paired_box_diffs(_untied(a, limit), _untied(b, limit))
        if diffs is None:
            same = False
        elif len(diffs):
            worst = max(worst, float(diffs.max()))
    return {
        "images": len(images),
        "detections": sum(len(d["labels"]) for d in reference),
        "same_labels": same,
        "max_box_diff": worst,
    }


SCORE_TIE = 1e-5  # scores closer than this count as tied when comparing engines


def _untied(found: dict[str, Tensor], limit: int) -> dict[str, Tensor]:
    """`found` without the scores tied with the last, when it holds `limit` detections."""
    if len(found["scores"]) < limit:
        return found
    keep = found["scores"] > found["scores"][-1] + SCORE_TIE
    return {k: v[keep] for k, v in found.items()}


def _paired_box_diffs(a: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor | None:
    """Per detection of `b` (score order), the box difference to its pair in `a`; None when
    one is left unpaired."""
    if len(a["labels"]) != len(b["labels"]):
        return None
    cost = (b["boxes"][:, None, :] - a["boxes"][None, :, :]).abs().amax(dim=-1)  # [Nb, Na]
    allowed = (b["labels"][:, None] == a["labels"][None, :]) & (
        (b["scores"][:, None] - a["scores"][None, :]).abs() <= SCORE_TIE
    )
    cost = torch.where(allowed, cost, torch.full_like(cost, float("inf")))
    diffs = torch.empty(len(b["labels"]))
    for i in range(len(diffs)):
        j = int(cost[i].argmin()) if cost.shape[1] else -1
        if j < 0 or not torch.isfinite(cost[i, j]):
            return None
        diffs[i] = cost[i, j]
        cost[:, j] = float("inf")
    return diffs
