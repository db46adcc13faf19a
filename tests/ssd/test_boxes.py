import math

import pytest
import torch

from ssd import boxes as B
from tests.oracle import tv_box_coder


def random_xyxy(n, generator, scale=1.0):
    xy = torch.rand(n, 2, generator=generator) * 0.8
    wh = torch.rand(n, 2, generator=generator) * 0.5 + 0.01
    return torch.cat((xy, xy + wh), 1) * scale


@pytest.mark.parametrize("seed", range(5))
def test_encode_equals_torchvision_box_coder_and_decode_inverts_it(seed):
    g = torch.Generator().manual_seed(seed)
    gt, anchors_xyxy = random_xyxy(50, g, 300.0), random_xyxy(50, g, 300.0)
    ours = B.encode(gt, B.xyxy_to_cxcywh(anchors_xyxy))
    theirs = tv_box_coder(weights=(10.0, 10.0, 5.0, 5.0)).encode_single(gt, anchors_xyxy)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    back = B.decode(ours, B.xyxy_to_cxcywh(anchors_xyxy))
    torch.testing.assert_close(back, gt, atol=1e-3, rtol=0)
    tv_back = tv_box_coder(weights=(10.0, 10.0, 5.0, 5.0)).decode_single(ours, anchors_xyxy)
    torch.testing.assert_close(back, tv_back, atol=1e-3, rtol=0)


def test_golden_encoding_of_a_shifted_doubled_box():
    default = torch.tensor([[0.5, 0.5, 0.2, 0.2]])  # cx, cy, w, h
    gt = torch.tensor([[0.42, 0.3, 0.78, 0.7]])  # centre (0.6, 0.5), size 0.36 x 0.4
    # dx = (0.6 - 0.5) / (0.2 * 0.1) = 5; dw = log(0.36 / 0.2) / 0.2; dh = log(2) / 0.2
    expected = torch.tensor([[5.0, 0.0, math.log(1.8) / 0.2, math.log(2.0) / 0.2]])
    torch.testing.assert_close(B.encode(gt, default), expected)


def test_decode_clamps_huge_size_offsets_like_torchvision():
    default = torch.tensor([[0.5, 0.5, 0.1, 0.1]])
    out = B.decode(torch.tensor([[0.0, 0.0, 1e4, 1e4]]), default)
    assert torch.isfinite(out).all()
    assert (out[0, 2] - out[0, 0]).item() == pytest.approx(0.1 * 1000 / 16, rel=1e-5)


def test_format_conversions_round_trip():
    g = torch.Generator().manual_seed(0)
    boxes = random_xyxy(20, g)
    torch.testing.assert_close(B.cxcywh_to_xyxy(B.xyxy_to_cxcywh(boxes)), boxes)
    assert B.xyxy_to_xywh(torch.tensor([[1.0, 2.0, 4.0, 6.0]])).tolist() == [[1.0, 2.0, 3.0, 4.0]]


def test_batched_iou_equals_torchvision_box_iou_per_image():
    g = torch.Generator().manual_seed(1)
    many = torch.stack([random_xyxy(7, g) for _ in range(3)])  # [3, 7, 4]
    others = random_xyxy(11, g)
    out = B.batched_iou(many, others)
    for i in range(3):
        torch.testing.assert_close(out[i], B.iou(many[i], others))


def test_batched_iou_of_a_zero_area_box_is_zero_not_nan():
    zero = torch.tensor([[[0.5, 0.5, 0.5, 0.5]]])
    assert B.batched_iou(zero, torch.tensor([[0.4, 0.4, 0.6, 0.6]])).item() == 0.0
