"""A trained SSD as a detector: network + default boxes + post-processing, in one call.

Shared by evaluation during training, `rayssd evaluate`, batch labelling and serving, so
every path turns network outputs into boxes the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ssd import config as C
from ssd import layout
from ssd.anchors import default_boxes
from ssd.postprocess import postprocess


class Detector:
    """Callable: uint8 images [B, 3, S, S] (already resized to the model's input) and their
    original sizes → detections in original pixels.

    The model is used as given (pass the bare module, not a DDP wrapper) and put in eval
    mode for the call, then each module back into the mode it was in.

    ``channels_last=True`` moves the model's weights, in place, to the channels-last memory
    layout, and ``None`` does so where `ssd.layout` finds it the faster on this machine
    (``cfg.model.memory_format``; measured once, at `batch`, and cached). Which is faster
    depends on the CPU: forward time on an AVX-512 Xeon, 1-2 threads, `tiny` 7-12 %,
    `ssdlite320` 27-39 %, `ssd300_vgg16` 24 % less channels-last; on an AVX2-only EPYC
    (Zen 3) about 20 % more. Results are the same up to float rounding. For inference paths
    that own their model (labelling, serving, the MLflow model); a model that is still
    training keeps its layout.
    """

    def __init__(
        self, model: nn.Module, cfg: C.Config, *, channels_last: bool | None = False, batch: int = 8
    ) -> None:
        if channels_last is None:
            device = next(model.parameters()).device
            channels_last = layout.channels_last(model, cfg, batch=batch, training=False, device=device)
        self.channels_last = channels_last
        if channels_last:
            model.to(memory_format=torch.channels_last)  # 4-D weights only; biases stay as they are
        self.model = model
        self.cfg = cfg
        self.default_boxes = default_boxes(cfg)  # [A, 4] cxcywh in [0, 1]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __call__(
        self,
        images: Tensor,
        image_sizes: Sequence[tuple[int, int]] | Tensor,
        score_threshold: float | None = None,
        max_detections: int | None = None,
    ) -> list[dict[str, Tensor]]:
        """images: uint8 Tensor[B, 3, S, S]; image_sizes: B pairs (height, width) in pixels.

        Returns B dicts with ``boxes`` float32 [K, 4] xyxy original pixels, ``scores`` [K]
        descending and ``labels`` int64 [K] in 1..num_classes-1, on the CPU. Thresholds
        default to ``cfg.inference``.
        """
        inf = self.cfg.inference
        # Eval mode for the call, then each module's own mode back. Only modules in training
        # mode are switched: an inference model costs one walk (0.07 ms for `tiny`, against
        # 0.6 ms for eval() and train() on every call).
        training = [module for module in self.model.modules() if module.training]
        for module in training:
            module.training = False
        try:
            with torch.inference_mode():
                cls_logits, loc_preds = self.model(images.to(self.device, non_blocking=True))
                detections = postprocess(
                    cls_logits.float(),
                    loc_preds.float(),
                    self.default_boxes.to(cls_logits.device),
                    image_sizes=image_sizes,
                    score_threshold=inf.score_threshold if score_threshold is None else score_threshold,
                    nms_threshold=inf.nms_threshold,
                    topk_candidates=inf.topk_candidates,
                    max_detections=inf.max_detections if max_detections is None else max_detections,
                )
        finally:
            for module in training:
                module.training = True
        return [{k: v.float().cpu() if k != "labels" else v.cpu() for k, v in d.items()} for d in detections]
