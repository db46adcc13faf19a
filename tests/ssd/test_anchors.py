import math

import pytest
import torch

from ssd import config as C
from ssd.anchors import default_boxes
from tests.oracle import tv_default_boxes


@pytest.mark.parametrize("name", list(C.PRESETS))
def test_default_boxes_equal_torchvisions_default_box_generator(name):
    cfg = C.preset(name)
    ours = default_boxes(cfg)
    assert ours.shape == (cfg.anchors.num_default_boxes(), 4)
    torch.testing.assert_close(ours, tv_default_boxes(cfg), atol=1e-6, rtol=0)


def test_ssd300_golden_first_location_and_counts():
    boxes = default_boxes(C.preset("ssd300_vgg16"))
    assert boxes.shape == (8732, 4)
    # first cell of the 38x38 map: centre (0.5 * 8 / 300), scale 0.07, extra √(0.07·0.15)
    c = 0.5 * 8 / 300
    s, s2 = 0.07, math.sqrt(0.07 * 0.15)
    expected = torch.tensor(
        [
            [c, c, s, s],
            [c, c, s2, s2],
            [c, c, s * math.sqrt(2), s / math.sqrt(2)],
            [c, c, s / math.sqrt(2), s * math.sqrt(2)],
        ]
    )
    torch.testing.assert_close(boxes[:4], expected)
    # the next location moves along x first (row-major)
    assert boxes[4, 0] == pytest.approx(1.5 * 8 / 300) and boxes[4, 1] == pytest.approx(c)
    # the 1x1 map's extra box is √(0.87·1.05) clipped to 1
    assert boxes[-4:, 2:].max() <= 1.0


def test_ssd512_has_24564_default_boxes():
    assert default_boxes(C.preset("ssd512_vgg16")).shape == (24564, 4)


def test_clipping_is_optional():
    cfg = C.preset("ssd300_vgg16")
    unclipped = default_boxes(cfg, clip=False)
    assert unclipped[:, 2:].max() == pytest.approx(0.87 * math.sqrt(2), rel=1e-6)  # last map, a = 2
    assert default_boxes(cfg, clip=True)[:, 2:].max() == 1.0


def test_default_boxes_follow_dtype_and_device():
    boxes = default_boxes(C.preset("tiny"), dtype=torch.float64, device="cpu")
    assert boxes.dtype == torch.float64
