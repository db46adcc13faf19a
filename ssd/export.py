"""A trained SSD as one end-to-end graph for deployment runtimes (ONNX, TorchScript).

Deployment runtimes (ONNX Runtime, TensorRT, OpenVINO, LibTorch) expect a detector to be one
graph from pixels to detections with fixed-size outputs, so decoding and per-class NMS are
inside it:

    images  uint8 [B, 3, S, S] RGB, already resized to the model's input (B dynamic)
    boxes   float32 [B, K, 4] xyxy in input pixels (0..S)
    scores  float32 [B, K] descending within each image
    labels  int64 [B, K] in 1..C-1
    num_detections int64 [B]: the first num_detections[b] rows of image b are detections; the
            rest are padding (boxes 0, scores 0, labels 0 = background)

with K = ``max_detections``. The post-processing is `ssd.postprocess.postprocess`'s (softmax,
the ``topk_candidates`` best per class above ``score_threshold``, NMS within each image and
class, the K best per image), written with fixed-size tensors and ``torchvision.ops.nms``
(which the ONNX exporter turns into ONNX's NonMaxSuppression) in float32. A detection the
graph keeps at a low threshold is kept at any higher one, so runtimes filter its output
by score instead of re-exporting.

The file's metadata (`metadata`) holds the class names, COCO category ids, image size, the
thresholds and the whole config, so a file is enough to label and serve with.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import nms

from ssd import config as C
from ssd.anchors import default_boxes
from ssd.boxes import decode

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}
OUTPUT_NAMES = ("boxes", "scores", "labels", "num_detections")
METADATA_FORMAT = "rayssd.export/1"
TORCHSCRIPT_METADATA_FILE = "rayssd.json"  # the extra file of a TorchScript archive
ONNX_OPSET = 18
INT64_MAX = 2**63 - 1


@torch.library.custom_op("rayssd::nms_per_class", mutates_args=())
def nms_per_class(boxes: Tensor, scores: Tensor, iou_threshold: float, score_threshold: float) -> Tensor:
    """ONNX's NonMaxSuppression: greedy NMS within each (image, class).

    boxes: Tensor[B, A, 4] xyxy in [0, 1], shared by the classes; scores: Tensor[B, C, A].
    Boxes scored at most `score_threshold` take no part. Returns Tensor[M, 3] int64 rows
    (image, class, box) of the kept boxes. Exported as the ONNX operator (`_onnx_nms`), which
    runs each group apart; here, one `torchvision.ops.nms` call over groups moved apart.
    """
    image, cls, box = (scores > score_threshold).nonzero(as_tuple=True)
    # Groups never overlap: images 2 apart in x, classes 2 apart in y (boxes lie in [0, 1]).
    # Offsets in two axes stay small, so float32 keeps the IoUs (largest offset
    # 2 * max(B, C) rather than 2 * B * C).
    offsets = torch.stack((image, cls, image, cls), dim=1).to(boxes.dtype) * 2.0
    kept = nms(boxes[image, box] + offsets, scores[image, cls, box], iou_threshold)
    return torch.stack((image[kept], cls[kept], box[kept]), dim=1)


@nms_per_class.register_fake
def _(boxes: Tensor, scores: Tensor, iou_threshold: float, score_threshold: float) -> Tensor:
    kept = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((kept, 3), dtype=torch.int64)


def _onnx_nms(boxes: Any, scores: Any, iou_threshold: float, score_threshold: float) -> Any:
    """`nms_per_class` as ONNX's NonMaxSuppression (onnxscript, opset 18)."""
    from onnxscript import opset18 as op

    return op.NonMaxSuppression(
        boxes,
        scores,
        op.Constant(value_ints=[INT64_MAX]),
        op.Constant(value_floats=[iou_threshold]),
        op.Constant(value_floats=[score_threshold]),
    )


class EndToEnd(nn.Module):
    """SSD network + decoding + per-class NMS: uint8 images → fixed-size detections (module doc).

    model: the trained `ssd.model.SSD` (eval mode); cfg: its config. `score_threshold`,
    `max_detections` default to ``cfg.inference``.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: C.Config,
        *,
        score_threshold: float | None = None,
        max_detections: int | None = None,
    ) -> None:
        super().__init__()
        inf = cfg.inference
        self.model = model.eval()
        self.image_size = cfg.model.image_size
        self.score_threshold = float(inf.score_threshold if score_threshold is None else score_threshold)
        self.nms_threshold = float(inf.nms_threshold)
        self.num_anchors = cfg.anchors.num_default_boxes()
        self.num_classes = cfg.model.num_classes
        self.topk = min(inf.topk_candidates, self.num_anchors)
        # K can be no more than the candidates there are.
        self.max_detections = min(
            int(inf.max_detections if max_detections is None else max_detections),
            self.topk * (self.num_classes - 1),
        )
        self.register_buffer("default_boxes", default_boxes(cfg), persistent=False)  # [A, 4] cxcywh [0, 1]

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        cls_logits, loc_preds = self.model(images)  # [B, A, C], [B, A, 4]
        batch, num = images.shape[0], self.num_anchors
        boxes = decode(loc_preds.float(), self.default_boxes).clamp(0.0, 1.0)  # [B, A, 4] xyxy [0, 1]
        scores = F.softmax(cls_logits.float(), dim=-1)[..., 1:].transpose(1, 2)  # [B, C-1, A]
        # The `topk` best boxes of each class are its candidates; the rest score -1.
        kth = scores.topk(self.topk, dim=2).values[..., -1:]  # [B, C-1, 1]
        scores = torch.where(scores >= kth, scores, torch.full_like(scores, -1.0))
        kept = nms_per_class(boxes, scores, self.nms_threshold, self.score_threshold)  # [M, 3]
        flat = scores.reshape(-1)  # [B * (C-1) * A]
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[(kept[:, 0] * (self.num_classes - 1) + kept[:, 1]) * num + kept[:, 2]] = True
        kept_scores = torch.where(keep, flat, torch.full_like(flat, -1.0)).reshape(batch, -1)
        out_scores, order = kept_scores.topk(self.max_detections, dim=1)  # [B, K], order in (C-1) * A
        found = out_scores > self.score_threshold  # [B, K]; padding scored -1
        out_boxes = boxes.gather(1, (order % num).unsqueeze(-1).expand(-1, -1, 4)) * float(self.image_size)
        out_labels = order // num + 1
        zero = torch.zeros_like(out_scores)
        return (
            torch.where(found.unsqueeze(-1), out_boxes, zero.unsqueeze(-1)),
            torch.where(found, out_scores, zero),
            torch.where(found, out_labels, torch.zeros_like(out_labels)),
            found.sum(dim=1),
        )


def metadata(module: EndToEnd, cfg: C.Config, dataset: dict[str, Any]) -> dict[str, str]:
    """What a runtime needs besides the graph, as string key-value pairs (ONNX metadata_props)."""
    return {
        "rayssd.format": METADATA_FORMAT,
        "class_names": json.dumps(list(dataset.get("class_names", cfg.data.class_names))),
        "category_ids": json.dumps([int(i) for i in dataset.get("category_ids", [])]),
        "image_size": str(module.image_size),
        "score_threshold": repr(module.score_threshold),
        "nms_threshold": repr(module.nms_threshold),
        "max_detections": str(module.max_detections),
        "config": json.dumps(C.to_dict(cfg)),
        "inputs": f"images: uint8 [B, 3, {module.image_size}, {module.image_size}] RGB",
        "outputs": "boxes float32 [B, K, 4] xyxy input pixels; scores float32 [B, K]; "
        "labels int64 [B, K] (0 = padding); num_detections int64 [B]",
    }


def export(
    model: nn.Module,
    cfg: C.Config,
    dataset: dict[str, Any],
    out: str | Path,
    *,
    fmt: str = "onnx",
    score_threshold: float | None = None,
    max_detections: int | None = None,
) -> dict[str, str]:
    """Write `model` as an end-to-end `fmt` graph to `out`; returns its metadata.

    ONNX needs the ``onnx`` and ``onnxscript`` packages (``pip install rayssd[onnx]``).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    module = EndToEnd(model, cfg, score_threshold=score_threshold, max_detections=max_detections).eval()
    meta = metadata(module, cfg, dataset)
    size = module.image_size
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torchscript":
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about data-dependent shapes: expected
            # Frozen: weights become constants, so outputs never require grad.
            traced = torch.jit.freeze(torch.jit.trace(module, (example,), check_trace=False))
            torch.jit.save(traced, str(out), _extra_files={TORCHSCRIPT_METADATA_FILE: json.dumps(meta)})
        return meta
    _export_onnx(module, example, out, meta)
    return meta


def _export_onnx(module: EndToEnd, example: Tensor, out: Path, meta: dict[str, str]) -> None:
    try:
        import onnxscript  # noqa: F401  (torch's exporter needs it)
    except ImportError as exc:
        raise RuntimeError(
            "ONNX export needs the onnx and onnxscript packages: pip install 'rayssd[onnx]'"
        ) from exc
    batch = torch.export.Dim("batch", min=1, max=4096)
    quiet = logging.getLogger("onnx_ir")  # "Attribute type is ambiguous ...": harmless, unfixable here
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            input_names=["images"],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes={"images": {0: batch}},
            opset_version=ONNX_OPSET,
            external_data=False,
            verbose=False,
            custom_translation_table={torch.ops.rayssd.nms_per_class.default: _onnx_nms},
        )
    quiet.setLevel(level)
    program.model.metadata_props.update(meta)
    program.save(str(out), external_data=False)


def load_torchscript(path: str | Path) -> tuple[torch.jit.ScriptModule, dict[str, str]]:
    """An exported TorchScript file and its rayssd metadata."""
    files = {TORCHSCRIPT_METADATA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        try:
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=files)
        except Exception as exc:  # zip and TorchScript errors of every kind
            raise ValueError(f"{path} is not a readable TorchScript file: {exc}") from None
    meta = json.loads(files[TORCHSCRIPT_METADATA_FILE] or "{}")
    if meta.get("rayssd.format") != METADATA_FORMAT:
        raise ValueError(f"{path} is not a rayssd export (no {METADATA_FORMAT!r} metadata)")
    return module.eval(), meta


def read_metadata(path: str | Path) -> dict[str, str]:
    """The rayssd metadata of an exported ONNX (needs the ``onnx`` package) or TorchScript file."""
    path = Path(path)
    if path.suffix != SUFFIXES["onnx"]:
        return load_torchscript(path)[1]
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf decode errors of every kind
        raise ValueError(f"{path} is not a readable ONNX model: {exc}") from None
    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get("rayssd.format") != METADATA_FORMAT:
        raise ValueError(f"{path} is not a rayssd export (no {METADATA_FORMAT!r} metadata)")
    return meta
