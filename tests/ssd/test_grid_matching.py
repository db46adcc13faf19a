import pytest
import torch

from ssd import config as C
from ssd.anchors import default_boxes
from ssd.boxes import batched_iou, cxcywh_to_xyxy
from ssd.grid_matching import GridMatcher
from ssd.matching import encode_targets_batch, match_batch, pad_ground_truth


def random_images(g, images, max_boxes, small=False):
    out = []
    for _ in range(images):
        n = int(torch.randint(0, max_boxes + 1, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 0.8
        wh = torch.rand(n, 2, generator=g) * (0.12 if small else 0.5) + 0.02
        out.append(torch.cat((xy, (xy + wh).clamp(max=1.0)), 1))
    return out


def untied(boxes, valid, dboxes):
    """No ground truth has two default boxes within 1e-5 of its best IoU (ties are broken
    by rounding noise, differently by each implementation, and both answers are right)."""
    top2 = batched_iou(boxes.double(), cxcywh_to_xyxy(dboxes).double()).topk(2, dim=-1).values
    return bool(((top2[..., 0] - top2[..., 1]) > 1e-5)[valid].all())


@pytest.mark.parametrize("name", ["ssd300_vgg16", "tiny", "ssdlite320", "ssd512_vgg16"])
@pytest.mark.parametrize("small", [False, True])
def test_grid_matcher_equals_the_reference_matcher(name, small):
    cfg = C.preset(name)
    dboxes = default_boxes(cfg)
    matcher = GridMatcher.from_config(cfg, dboxes)
    g = torch.Generator().manual_seed(len(name) + small)
    compared = 0
    while compared < 24:
        images = random_images(g, 1, 12, small)
        boxes, _, valid = pad_ground_truth(images)
        if not untied(boxes, valid, dboxes):
            continue
        expected = match_batch(boxes, valid, dboxes)
        assert torch.equal(matcher.match_batch(boxes, valid), expected)
        compared += 1


@pytest.mark.parametrize("seed", range(5))
def test_in_jittered_crowds_every_box_owns_a_default_box_and_the_best_claim_wins(seed):
    cfg = C.preset("ssd300_vgg16")
    dboxes = default_boxes(cfg)
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(2, generator=g) * 0.6 + 0.2
    xy = centre + torch.rand(8, 2, generator=g) * 0.01
    crowd = torch.cat((xy, xy + 0.04 + torch.rand(8, 2, generator=g) * 0.01), 1)  # 8 near-identical boxes
    boxes, _, valid = pad_ground_truth([crowd])
    matches = GridMatcher.from_config(cfg, dboxes).match_batch(boxes, valid)[0]
    assert set(matches[matches >= 0].tolist()) == set(range(8))
    ious = batched_iou(boxes, cxcywh_to_xyxy(dboxes))[0]  # [8, A]
    wanted = ious.argmax(dim=1)  # each box's own best default box
    contested = int(wanted.mode().values)
    claimants = (wanted == contested).nonzero().flatten()
    assert len(claimants) > 1  # a real conflict
    winner = claimants[ious[claimants, contested].argmax()]
    assert int(matches[contested]) == int(winner)  # the best claim keeps it


def test_grid_matcher_batches_many_images_with_empty_ones():
    cfg = C.preset("ssd300_vgg16")
    dboxes = default_boxes(cfg)
    matcher = GridMatcher.from_config(cfg, dboxes)
    images = [torch.tensor([[0.1, 0.1, 0.4, 0.5]]), torch.zeros(0, 4), torch.tensor([[0.5, 0.5, 0.9, 0.7]])]
    labels = [torch.tensor([3]), torch.zeros(0, dtype=torch.int64), torch.tensor([1])]
    fast = encode_targets_batch(images, labels, dboxes, matcher=matcher)
    slow = encode_targets_batch(images, labels, dboxes)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
    assert (fast[0][1] == 0).all()


def test_identical_boxes_in_a_crowd_each_get_their_own_default_box():
    cfg = C.preset("ssd300_vgg16")
    dboxes = default_boxes(cfg)
    same = torch.tensor([[0.2, 0.2, 0.5, 0.6]]).repeat(25, 1)
    boxes, _, valid = pad_ground_truth([same])
    matches = GridMatcher.from_config(cfg, dboxes).match_batch(boxes, valid)[0]
    assert sorted(set(matches[matches >= 0].tolist())) == list(range(25))


def test_default_boxes_that_are_not_a_grid_are_rejected():
    cfg = C.preset("tiny")
    shuffled = default_boxes(cfg)[
        torch.randperm(cfg.anchors.num_default_boxes(), generator=torch.Generator().manual_seed(0))
    ]
    with pytest.raises(ValueError, match="grid"):
        GridMatcher.from_config(cfg, shuffled)
    with pytest.raises(ValueError, match="expected"):
        GridMatcher(default_boxes(cfg)[:-1], cfg.anchors.feature_maps, cfg.anchors.boxes_per_location())
