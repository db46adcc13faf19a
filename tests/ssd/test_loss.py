import pytest
import torch
from torchvision.ops import box_iou

from ssd import config as C
from ssd.anchors import default_boxes
from ssd.loss import hard_negative_mask, multibox_loss
from ssd.matching import encode_targets_batch
from tests.oracle import tv_pixel_anchors, tv_ssd

CFG = C.preset("tiny")
SIZE = CFG.model.image_size
DEFAULTS = default_boxes(CFG)
NUM_CLASSES = 6


def random_batch(seed, images=4):
    g = torch.Generator().manual_seed(seed)
    boxes, labels = [], []
    for _ in range(images):
        n = int(torch.randint(1, 6, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 0.6
        boxes.append(torch.cat((xy, xy + torch.rand(n, 2, generator=g) * 0.35 + 0.05), 1))
        labels.append(torch.randint(1, NUM_CLASSES, (n,), generator=g))
    a = DEFAULTS.shape[0]
    cls_logits = torch.randn(images, a, NUM_CLASSES, generator=g) * 2
    loc_preds = torch.randn(images, a, 4, generator=g)
    return boxes, labels, cls_logits, loc_preds


@pytest.mark.parametrize("seed", range(6))
def test_multibox_loss_equals_torchvision_compute_loss(seed):
    boxes, labels, cls_logits, loc_preds = random_batch(seed)
    cls_t, loc_t = encode_targets_batch(boxes, labels, DEFAULTS)
    ours = multibox_loss(cls_logits, loc_preds, cls_t, loc_t)

    tv = tv_ssd(C.override(CFG, [f"model.num_classes={NUM_CLASSES}"]))
    anchors = tv_pixel_anchors(CFG)
    targets = [{"boxes": b * SIZE, "labels": lab} for b, lab in zip(boxes, labels)]
    matched = [tv.proposal_matcher(box_iou(t["boxes"], anchors)) for t in targets]
    # same matches as ours on these cases, so the two losses see identical targets
    assert torch.equal(torch.stack(matched) >= 0, cls_t > 0)
    theirs = tv.compute_loss(
        targets, {"bbox_regression": loc_preds, "cls_logits": cls_logits}, [anchors] * len(boxes), matched
    )
    torch.testing.assert_close(ours["loc"], theirs["bbox_regression"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours["cls"], theirs["classification"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours["loss"], theirs["bbox_regression"] + theirs["classification"])
    # hard negatives: exactly 3 per positive in every image (plenty of negatives here)
    assert ours["num_neg"] == 3 * ours["num_pos"]


def test_hard_negatives_are_the_highest_loss_negatives_per_image():
    cls_loss = torch.tensor([[0.9, 5.0, 0.1, 3.0, 2.0, 4.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    positive = torch.tensor(
        [[False, True, False, False, False, False], [True, True, False, False, False, False]]
    )
    mask = hard_negative_mask(cls_loss, positive, neg_pos_ratio=3)
    # image 0: 1 positive -> the 3 largest negative losses 4.0, 3.0, 2.0 (5.0 is the positive)
    assert mask[0].tolist() == [False, False, False, True, True, True]
    # image 1: 2 positives -> up to 6 negatives, only 4 exist: all of them, never a positive
    assert mask[1].tolist() == [False, False, True, True, True, True]


def test_loss_weights_the_localisation_part_by_alpha():
    boxes, labels, cls_logits, loc_preds = random_batch(3)
    cls_t, loc_t = encode_targets_batch(boxes, labels, DEFAULTS)
    one = multibox_loss(cls_logits, loc_preds, cls_t, loc_t, alpha=1.0)
    two = multibox_loss(cls_logits, loc_preds, cls_t, loc_t, alpha=2.0)
    torch.testing.assert_close(two["loss"], one["cls"] + 2 * one["loc"])


def test_a_batch_without_positives_gives_finite_loss_and_no_box_loss():
    a = DEFAULTS.shape[0]
    cls_logits = torch.randn(2, a, NUM_CLASSES, requires_grad=True)
    loc_preds = torch.randn(2, a, 4, requires_grad=True)
    out = multibox_loss(cls_logits, loc_preds, torch.zeros(2, a, dtype=torch.long), torch.zeros(2, a, 4))
    assert torch.isfinite(out["loss"]) and out["loc"] == 0 and out["num_neg"] == 0
    out["loss"].backward()
    assert torch.isfinite(cls_logits.grad).all() and torch.isfinite(loc_preds.grad).all()


def test_gradients_flow_only_through_positives_for_localisation():
    boxes, labels, cls_logits, loc_preds = random_batch(5, images=2)
    cls_t, loc_t = encode_targets_batch(boxes, labels, DEFAULTS)
    loc_preds.requires_grad_(True)
    multibox_loss(cls_logits, loc_preds, cls_t, loc_t)["loss"].backward()
    has_grad = loc_preds.grad.abs().sum(-1) > 0
    assert torch.equal(has_grad, cls_t > 0)


def test_an_image_without_ground_truth_gets_no_hard_negatives_in_a_mixed_batch():
    boxes, labels, cls_logits, loc_preds = random_batch(11, images=3)
    boxes[1], labels[1] = torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)
    cls_t, loc_t = encode_targets_batch(boxes, labels, DEFAULTS)
    out = multibox_loss(cls_logits, loc_preds, cls_t, loc_t)
    assert torch.isfinite(out["loss"])
    ce = torch.nn.functional.cross_entropy(cls_logits[1], cls_t[1], reduction="none")
    from ssd.loss import hard_negative_mask

    mask = hard_negative_mask(
        torch.nn.functional.cross_entropy(
            cls_logits.flatten(0, 1), cls_t.flatten(), reduction="none"
        ).view_as(cls_t),
        cls_t > 0,
    )
    assert not mask[1].any() and ce.numel() == DEFAULTS.shape[0]
    assert out["num_neg"] == 3 * out["num_pos"]


def test_min_negatives_lets_an_empty_image_teach_and_keeps_the_loss_comparable():
    """train.min_negatives = k: every image mines max(3 x positives, k) hard negatives, an
    image without objects k of its highest-loss boxes; L_cls is divided by
    sum_i max(pos_i, k / 3), so an image mining its 3:1 share counts as under the paper's rule.
    With k = 0 the loss is the paper's, bit for bit."""
    boxes, labels, cls_logits, loc_preds = random_batch(11, images=3)
    boxes[1], labels[1] = torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)
    cls_t, loc_t = encode_targets_batch(boxes, labels, DEFAULTS)
    paper = multibox_loss(cls_logits, loc_preds, cls_t, loc_t)
    same = multibox_loss(cls_logits, loc_preds, cls_t, loc_t, min_negatives=0)
    assert all(torch.equal(paper[key], same[key]) for key in paper)

    positives = (cls_t > 0).sum(1)  # [3], image 1 has none
    k = int(3 * positives[0]) + 5  # more than image 0's share too; image 2's share may exceed it
    out = multibox_loss(cls_logits, loc_preds, cls_t, loc_t, min_negatives=k)
    ce = torch.nn.functional.cross_entropy(cls_logits.flatten(0, 1), cls_t.flatten(), reduction="none")
    ce = ce.view_as(cls_t)
    # the hand computation, one image at a time
    total, kept = 0.0, 0
    for i in range(3):
        pos = cls_t[i] > 0
        share = max(3 * int(pos.sum()), k)
        negatives = ce[i][~pos].sort(descending=True).values[:share]
        total += float(ce[i][pos].sum() + negatives.sum())
        kept += len(negatives)
    normaliser = sum(max(float(p), k / 3) for p in positives)
    assert int(out["num_neg"]) == kept >= int(paper["num_neg"]) + k  # the empty image's k at least
    torch.testing.assert_close(out["cls"], torch.tensor(total / normaliser), rtol=1e-5, atol=0)
    torch.testing.assert_close(out["loc"], paper["loc"])  # L_loc keeps N = positives
    assert float(out["cls"]) != pytest.approx(float(paper["cls"]))  # the empty image now teaches

    # an empty image's negatives get gradient (under the paper's rule, none)
    cls_logits.requires_grad_(True)
    multibox_loss(cls_logits, loc_preds, cls_t, loc_t, min_negatives=k)["loss"].backward()
    assert int((cls_logits.grad[1].abs().sum(-1) > 0).sum()) == k
    cls_logits.grad = None
    multibox_loss(cls_logits, loc_preds, cls_t, loc_t)["loss"].backward()
    assert not cls_logits.grad[1].any()

    # a batch of empty images: k negatives each over N_cls = B x k / 3, finite
    empty = multibox_loss(cls_logits[1:2].detach(), loc_preds[1:2], cls_t[1:2], loc_t[1:2], min_negatives=k)
    top = ce[1].sort(descending=True).values[:k].sum()
    torch.testing.assert_close(empty["cls"], top / (k / 3), rtol=1e-5, atol=0)
    assert empty["loc"] == 0


def test_min_negatives_is_trained_with_and_checked_by_the_config():
    """TrainStep (the one step every training path runs) mines by the config's rule."""
    from ssd.config import ConfigError
    from ssd.model import build_ssd
    from ssd.optim import build_optimizer
    from ssd.step import TrainStep

    assert CFG.train.min_negatives == 0  # the paper's rule by default
    with pytest.raises(ConfigError, match=r"train\.min_negatives"):
        C.override(CFG, ["train.min_negatives=-1"])
    cfg = C.override(CFG, ["train.min_negatives=20", f"model.num_classes={NUM_CLASSES}"])
    boxes, labels, _, _ = random_batch(2, images=2)
    boxes[1], labels[1] = torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)
    cls_t, loc_t = encode_targets_batch(boxes, labels, DEFAULTS)
    images = torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8)
    for min_negatives, extra in ((0, 0), (20, 20)):
        trained = C.override(cfg, [f"train.min_negatives={min_negatives}"])
        torch.manual_seed(0)
        model = build_ssd(trained)
        step = TrainStep(
            model, build_optimizer(model, trained.train), trained.train, total_steps=1, steps_per_epoch=1
        )
        out = step(images, cls_t, loc_t)
        assert int(out["num_neg"]) == max(3 * int((cls_t[0] > 0).sum()), min_negatives) + extra
