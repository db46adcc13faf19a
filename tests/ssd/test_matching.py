import pytest
import torch
from torchvision.ops import box_iou

from ssd import config as C
from ssd.anchors import default_boxes
from ssd.boxes import cxcywh_to_xyxy, encode
from ssd.matching import encode_targets, encode_targets_batch, match, match_batch, pad_ground_truth
from tests.oracle import tv_box_coder, tv_matcher, tv_pixel_anchors

CFG = C.preset("ssd300_vgg16")
SIZE = CFG.model.image_size
DEFAULTS = default_boxes(CFG)
PIXEL_ANCHORS = tv_pixel_anchors(CFG)


def random_gt(n, g):
    xy = torch.rand(n, 2, generator=g) * 0.7
    wh = torch.rand(n, 2, generator=g) * 0.45 + 0.03
    return torch.cat((xy, (xy + wh).clamp(max=1.0)), 1)


def non_degenerate_case(g):
    """Random boxes whose best default boxes are distinct and untied (ties - e.g. two default
    boxes both inside one big box - are broken by rounding, differently in each library)."""
    while True:
        gt = random_gt(int(torch.randint(1, 12, (1,), generator=g)), g)
        top2 = box_iou(gt.double() * SIZE, PIXEL_ANCHORS.double()).topk(2, dim=1)
        distinct = top2.indices[:, 0].unique().numel() == gt.shape[0]
        if distinct and (top2.values[:, 0] - top2.values[:, 1]).min() > 1e-4:
            return gt


@pytest.mark.parametrize("seed", range(12))
def test_match_agrees_with_torchvision_ssd_matcher(seed):
    gt = non_degenerate_case(torch.Generator().manual_seed(seed))
    theirs = tv_matcher(0.5)(box_iou(gt * SIZE, PIXEL_ANCHORS))
    assert torch.equal(match(gt, DEFAULTS), theirs)


def test_zero_boxes_match_nothing_and_give_background_targets():
    empty = torch.zeros(0, 4)
    assert (match(empty, DEFAULTS) == -1).all()
    cls_t, loc_t = encode_targets(empty, torch.zeros(0, dtype=torch.int64), DEFAULTS)
    assert cls_t.shape == (8732,) and (cls_t == 0).all()
    assert loc_t.shape == (8732, 4) and (loc_t == 0).all()


def test_ground_truth_below_threshold_still_owns_its_best_default_box():
    tiny = torch.tensor([[0.501, 0.502, 0.52, 0.515]])  # far smaller than any default box
    ious = box_iou(
        tiny, torch.cat((DEFAULTS[:, :2] - DEFAULTS[:, 2:] / 2, DEFAULTS[:, :2] + DEFAULTS[:, 2:] / 2), 1)
    )
    assert ious.max() < 0.5
    matches = match(tiny, DEFAULTS)
    assert matches.tolist().count(0) == 1
    assert int((matches == 0).nonzero()) == int(ious.argmax())


def test_every_ground_truth_owns_a_default_box_in_a_crowd():
    # Two small people standing in front of each other: both want the same default box
    # and neither overlaps any default box by more than 0.5.
    crowd = torch.tensor([[0.50, 0.50, 0.53, 0.56], [0.499, 0.499, 0.532, 0.562]])
    px = box_iou(crowd * SIZE, PIXEL_ANCHORS)
    assert px.argmax(1)[0] == px.argmax(1)[1] and px.max() < 0.5
    ours = match(crowd, DEFAULTS)
    assert (ours == 0).sum() == 1 and (ours == 1).sum() == 1
    # the higher-IoU ground truth keeps the contested default box
    overlaps = box_iou(crowd, cxcywh_to_xyxy(DEFAULTS))
    contested = int(overlaps[1].argmax())
    assert overlaps[1, contested] > overlaps[0, contested] and int(ours[contested]) == 1
    theirs = tv_matcher(0.5)(px)
    assert not ((theirs == 0).any() and (theirs == 1).any())  # torchvision drops one of them


def test_many_identical_boxes_each_get_a_distinct_default_box():
    same = torch.tensor([[0.2, 0.2, 0.5, 0.6]]).repeat(25, 1)
    matches = match(same, DEFAULTS)
    assert sorted(set(matches[matches >= 0].tolist())) == list(range(25))


def test_batched_form_equals_one_image_at_a_time_including_empty_images():
    g = torch.Generator().manual_seed(7)
    images = [random_gt(3, g), torch.zeros(0, 4), random_gt(9, g), random_gt(1, g)]
    labels = [torch.randint(1, 21, (b.shape[0],), generator=g) for b in images]
    cls_b, loc_b = encode_targets_batch(images, labels, DEFAULTS)
    boxes, _, valid = pad_ground_truth(images)
    matches_b = match_batch(boxes, valid, DEFAULTS)
    for i, (b, lab) in enumerate(zip(images, labels)):
        cls_1, loc_1 = encode_targets(b, lab, DEFAULTS)
        assert torch.equal(matches_b[i], match(b, DEFAULTS))
        assert torch.equal(cls_b[i], cls_1)
        torch.testing.assert_close(loc_b[i], loc_1)
    assert (cls_b[1] == 0).all()


@pytest.mark.parametrize("seed", range(4))
def test_encoded_targets_equal_torchvision_box_coder_on_its_matches(seed):
    g = torch.Generator().manual_seed(100 + seed)
    gt = random_gt(1, g)
    labels = torch.tensor([5])
    cls_t, loc_t = encode_targets(gt, labels, DEFAULTS)
    theirs = tv_matcher(0.5)(box_iou(gt * SIZE, PIXEL_ANCHORS))
    fg = theirs >= 0
    assert torch.equal(cls_t > 0, fg) and (cls_t[fg] == 5).all()
    expected = tv_box_coder((10.0, 10.0, 5.0, 5.0)).encode_single(gt[theirs[fg]] * SIZE, PIXEL_ANCHORS[fg])
    torch.testing.assert_close(loc_t[fg], expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(loc_t[fg], encode(gt[theirs[fg]], DEFAULTS[fg]))


def test_a_box_without_area_is_rejected_naming_it():
    boxes = [torch.tensor([[0.1, 0.1, 0.2, 0.2]]), torch.tensor([[0.1, 0.1, 0.3, 0.3], [0.4, 0.5, 0.4, 0.7]])]
    labels = [torch.tensor([1]), torch.tensor([1, 2])]
    with pytest.raises(ValueError, match="box 1 of image 1"):
        encode_targets_batch(boxes, labels, DEFAULTS)
