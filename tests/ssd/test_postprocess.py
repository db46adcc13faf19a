import numpy as np
import pytest
import torch

from ssd import config as C
from ssd.anchors import default_boxes
from ssd.postprocess import postprocess
from tests.oracle import tv_pixel_anchors, tv_ssd

NUM_CLASSES = 5
CFG = C.override(C.preset("tiny"), [f"model.num_classes={NUM_CLASSES}"])
SIZE = CFG.model.image_size
DEFAULTS = default_boxes(CFG)


def canonical(det):
    """Detections ordered by score, then label and box: equal scores may come in any order."""
    b, sc, lab = det["boxes"], det["scores"], det["labels"]
    order = np.lexsort((b[:, 1].numpy(), b[:, 0].numpy(), lab.numpy(), -sc.numpy()))
    return b[order], sc[order], lab[order]


def head_outputs(seed, images=3):
    g = torch.Generator().manual_seed(seed)
    a = DEFAULTS.shape[0]
    cls_logits = torch.randn(images, a, NUM_CLASSES, generator=g) * 3
    loc_preds = torch.randn(images, a, 4, generator=g) * 0.5
    return cls_logits, loc_preds


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    "settings",
    [
        [],
        ["inference.score_threshold=0.3", "inference.max_detections=20"],
        ["inference.topk_candidates=50", "inference.nms_threshold=0.3"],
    ],
)
def test_postprocess_equals_torchvision_postprocess_detections(seed, settings):
    cfg = C.override(CFG, settings)
    inf = cfg.inference
    cls_logits, loc_preds = head_outputs(seed)
    sizes = [(480, 640), (SIZE, SIZE), (200, 90)]  # original (height, width) of each image
    ours = postprocess(
        cls_logits,
        loc_preds,
        DEFAULTS,
        sizes,
        score_threshold=inf.score_threshold,
        nms_threshold=inf.nms_threshold,
        topk_candidates=inf.topk_candidates,
        max_detections=inf.max_detections,
    )
    tv = tv_ssd(cfg).eval()  # its transform only rescales boxes in eval mode
    anchors = tv_pixel_anchors(cfg)
    theirs = tv.postprocess_detections(
        {"bbox_regression": loc_preds, "cls_logits": cls_logits}, [anchors] * 3, [(SIZE, SIZE)] * 3
    )
    theirs = tv.transform.postprocess(theirs, [(SIZE, SIZE)] * 3, sizes)
    assert len(ours) == 3
    for o, t in zip(ours, theirs):
        assert o["labels"].numel() > 0
        (ob, os_, ol), (tb, ts, tl) = canonical(o), canonical(t)
        assert torch.equal(ol, tl)
        torch.testing.assert_close(os_, ts)
        torch.testing.assert_close(ob, tb, atol=2e-3, rtol=1e-5)


def test_confident_detection_decodes_to_its_default_box_in_image_pixels():
    a = DEFAULTS.shape[0]
    cls_logits = torch.full((1, a, NUM_CLASSES), -10.0)
    cls_logits[..., 0] = 10.0  # everything is background ...
    cls_logits[0, 7, 3] = 10.0  # ... except default box 7, class 3
    cls_logits[0, 7, 0] = -10.0
    out = postprocess(cls_logits, torch.zeros(1, a, 4), DEFAULTS, [(100, 200)])[0]
    assert out["labels"].tolist() == [3]
    cx, cy, w, h = DEFAULTS[7].tolist()
    expected = torch.tensor(
        [[(cx - w / 2) * 200, (cy - h / 2) * 100, (cx + w / 2) * 200, (cy + h / 2) * 100]]
    )
    torch.testing.assert_close(out["boxes"], expected.clamp(min=0))


def test_no_image_sizes_keeps_boxes_in_unit_coordinates_and_within_them():
    cls_logits, loc_preds = head_outputs(9, images=2)
    for det in postprocess(cls_logits, loc_preds * 10, DEFAULTS):
        assert det["boxes"].min() >= 0 and det["boxes"].max() <= 1
        assert (det["scores"][:-1] >= det["scores"][1:]).all()
        assert det["boxes"].shape[0] <= 200


def test_all_background_gives_empty_detections_of_the_right_shape():
    a = DEFAULTS.shape[0]
    cls_logits = torch.zeros(2, a, NUM_CLASSES)
    cls_logits[..., 0] = 20.0
    out = postprocess(cls_logits, torch.zeros(2, a, 4), DEFAULTS, [(10, 10), (20, 20)])
    assert [d["boxes"].shape for d in out] == [(0, 4), (0, 4)]
    assert out[0]["labels"].dtype == torch.int64
