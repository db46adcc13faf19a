"""`ssd.export`'s end-to-end module in eager torch: its NMS against torchvision's per-group
batched NMS, its padded outputs against `ssd.postprocess.postprocess` (which is checked against
torchvision's SSD post-processing in test_postprocess)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.ops import batched_nms

from ssd import config as C
from ssd.anchors import default_boxes
from ssd.export import EndToEnd, nms_per_class
from ssd.postprocess import postprocess

NUM_CLASSES = 5
CFG = C.override(C.preset("tiny"), [f"model.num_classes={NUM_CLASSES}"])
SIZE = CFG.model.image_size


class Heads(nn.Module):
    """Stands in for the network: returns the given head outputs, whatever the images."""

    def __init__(self, cls_logits: torch.Tensor, loc_preds: torch.Tensor) -> None:
        super().__init__()
        self.outputs = (cls_logits, loc_preds)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.outputs


def _head_outputs(seed: int, images: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = default_boxes(CFG).shape[0]
    return torch.randn(images, a, NUM_CLASSES, generator=g) * 3, torch.randn(images, a, 4, generator=g) * 0.5


@pytest.mark.parametrize("seed", range(3))
def test_nms_per_class_keeps_what_batched_nms_keeps_in_each_image_and_class(seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(2, 300, 2, generator=g) * 0.8
    boxes = torch.cat((xy, xy + 0.05 + torch.rand(2, 300, 2, generator=g) * 0.3), dim=-1)  # [B, A, 4]
    scores = torch.rand(2, 4, 300, generator=g)  # [B, C, A]
    kept = nms_per_class(boxes, scores, 0.45, 0.2)  # [M, 3] (image, class, box)

    image, cls, box = (scores > 0.2).nonzero(as_tuple=True)
    groups = image * 4 + cls
    oracle = batched_nms(boxes[image, box].double(), scores[image, cls, box].double(), groups, 0.45)
    want = {(int(image[i]), int(cls[i]), int(box[i])) for i in oracle}
    got = {tuple(row) for row in kept.tolist()}
    assert len(want) > 50 and got == want


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    "settings",
    [[], ["inference.score_threshold=0.3", "inference.max_detections=20"], ["inference.topk_candidates=50"]],
)
def test_padded_outputs_hold_postprocess_detections_in_input_pixels(seed, settings):
    cfg = C.override(CFG, settings)
    inf = cfg.inference
    cls_logits, loc_preds = _head_outputs(seed)
    module = EndToEnd(Heads(cls_logits, loc_preds), cfg)
    boxes, scores, labels, counts = module(torch.zeros(3, 3, SIZE, SIZE, dtype=torch.uint8))
    want = postprocess(
        cls_logits,
        loc_preds,
        default_boxes(cfg),
        [(SIZE, SIZE)] * 3,
        score_threshold=inf.score_threshold,
        nms_threshold=inf.nms_threshold,
        topk_candidates=inf.topk_candidates,
        max_detections=inf.max_detections,
    )
    k = min(inf.max_detections, inf.topk_candidates * (NUM_CLASSES - 1))
    assert boxes.shape == (3, k, 4) and scores.shape == labels.shape == (3, k) and counts.shape == (3,)
    for b in range(3):
        n = int(counts[b])
        assert n == len(want[b]["labels"]) > 0
        assert torch.equal(labels[b, :n], want[b]["labels"])
        torch.testing.assert_close(scores[b, :n], want[b]["scores"])
        torch.testing.assert_close(boxes[b, :n], want[b]["boxes"], atol=1e-3, rtol=0)
        assert not labels[b, n:].any() and not scores[b, n:].any() and not boxes[b, n:].any()  # padding
