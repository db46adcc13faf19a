"""SSD training augmentations: formats, box/label alignment, the crop rule, reproducibility."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from ssd.transforms import (
    CROP_MAX_ASPECT,
    CROP_MIN_SCALE,
    MEAN_RGB,
    _hsv_to_rgb,
    _rgb_to_hsv,
    crop,
    drop_small_boxes,
    eval_transform,
    expand,
    horizontal_flip,
    photometric_distort,
    random_horizontal_flip,
    random_iou_crop,
    resize,
    rng_for,
    sample_iou_crop,
    smallest_object,
    train_transform,
    zoom_out_limit,
)

FUZZ_SEEDS = range(50)


def coordinate_image(height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3] whose pixel (y, x) is (x, y, 0), so any patch reveals where it came from."""
    assert height < 256 and width < 256
    yy, xx = np.mgrid[:height, :width]
    return np.stack([xx, yy, np.zeros_like(xx)], axis=-1).astype(np.uint8)


def random_sample(rng: np.random.Generator, max_boxes: int = 6):
    """Random image, 0..max_boxes boxes (>= 1 px, inside the image) and unique labels."""
    height, width = rng.integers(20, 120, size=2)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    n = int(rng.integers(0, max_boxes + 1))
    x1 = rng.uniform(0, width - 1, n)
    y1 = rng.uniform(0, height - 1, n)
    x2 = rng.uniform(x1 + 1, width)
    y2 = rng.uniform(y1 + 1, height)
    boxes = np.stack([x1, y1, x2, y2], axis=1).astype(np.float32).reshape(n, 4)
    labels = np.arange(1, n + 1, dtype=np.int64)
    return image, boxes, labels


def assert_inside(boxes: np.ndarray, width: float, height: float) -> None:
    assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
    assert np.all(boxes[:, 0] >= 0) and np.all(boxes[:, 1] >= 0)
    assert np.all(boxes[:, 2] <= width) and np.all(boxes[:, 3] <= height)
    assert np.all(boxes[:, 0] <= boxes[:, 2]) and np.all(boxes[:, 1] <= boxes[:, 3])


def assert_same_arrays(got: tuple, want: tuple) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


class ScriptedRng:
    """Stands in for np.random.Generator in `photometric_distort` with chosen draws.

    `coins` are the four step coins (brightness, contrast, saturation, hue; a step runs
    when its coin < p), `order` the contrast-first coin, `values` the magnitudes in order.
    """

    def __init__(self, coins=(1.0, 1.0, 1.0, 1.0), order=0.0, values=()):
        self.coins, self.order, self.values = np.asarray(coins), order, list(values)

    def random(self, size=None):
        return self.coins if size == 4 else self.order

    def uniform(self, low, high):
        value = self.values.pop(0)
        assert low <= value <= high
        return value

    def permutation(self, n):
        raise AssertionError("channel swap is off by default")


# --- rng ---------------------------------------------------------------------------------------


def test_rng_for_repeats_for_the_same_key_and_differs_for_any_other():
    draws = {key: rng_for(*key).random(4) for key in [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)]}
    np.testing.assert_array_equal(rng_for(0, 0, 0).random(4), draws[(0, 0, 0)])
    values = list(draws.values())
    for i in range(len(values)):
        for j in range(i + 1, len(values)):
            assert not np.array_equal(values[i], values[j])


# --- photometric -------------------------------------------------------------------------------


def test_hsv_conversion_matches_colorsys_and_round_trips():
    rgb = np.random.default_rng(0).integers(0, 256, size=(1, 200, 3)).astype(np.float32)
    rgb[0, :4] = [[0, 0, 0], [255, 255, 255], [128, 128, 128], [255, 0, 0]]  # grey and pure red
    hue, sat, value = _rgb_to_hsv(rgb)
    expected = np.array([colorsys.rgb_to_hsv(*(px / 255.0)) for px in rgb[0]])
    np.testing.assert_allclose(hue[0] / 360.0, expected[:, 0], atol=1e-5)
    np.testing.assert_allclose(sat[0], expected[:, 1], atol=1e-6)
    np.testing.assert_allclose(value[0] / 255.0, expected[:, 2], atol=1e-6)
    np.testing.assert_allclose(_hsv_to_rgb(hue, sat, value), rgb, atol=1e-3)


def test_photometric_output_is_uint8_of_the_same_shape_and_input_untouched():
    for seed in range(10):
        rng = np.random.default_rng(seed)
        image = rng.integers(0, 256, size=(17, 23, 3), dtype=np.uint8)
        before = image.copy()
        out = photometric_distort(image, rng_for(seed, 0, 0), p=1.0, channel_swap=True)
        assert out.dtype == np.uint8 and out.shape == image.shape
        assert not np.array_equal(out, image)  # every step ran
        np.testing.assert_array_equal(image, before)


def test_photometric_with_every_step_skipped_returns_the_image_unchanged():
    image = np.random.default_rng(0).integers(0, 256, size=(9, 7, 3), dtype=np.uint8)
    out = photometric_distort(image, ScriptedRng(coins=(0.99, 0.99, 0.99, 0.99)))
    np.testing.assert_array_equal(out, image)
    assert out is not image
    np.testing.assert_array_equal(photometric_distort(image, np.random.default_rng(1), p=0.0), image)


def test_brightness_adds_delta_and_saturates_at_255():
    image = np.array([[[0, 100, 250]]], np.uint8)
    out = photometric_distort(image, ScriptedRng(coins=(0.0, 1, 1, 1), values=[10.0]))
    np.testing.assert_array_equal(out, [[[10, 110, 255]]])


def test_contrast_multiplies_and_saturates_at_255():
    image = np.array([[[0, 100, 200]]], np.uint8)
    out = photometric_distort(image, ScriptedRng(coins=(1, 0.0, 1, 1), values=[1.5]))
    np.testing.assert_array_equal(out, [[[0, 150, 255]]])


def test_hue_shift_of_120_degrees_turns_red_into_green():
    image = np.array([[[255, 0, 0], [0, 0, 255]]], np.uint8)
    out = photometric_distort(image, ScriptedRng(coins=(1, 1, 1, 0.0), values=[120.0]), hue_delta=180.0)
    np.testing.assert_array_equal(out, [[[0, 255, 0], [255, 0, 0]]])  # blue (240°) wraps to red


def test_saturation_scales_chroma_and_keeps_value():
    # (200, 100, 100): V = 200, S = 0.5; S x 0.5 = 0.25 -> min channel 200 * 0.75 = 150.
    image = np.array([[[200, 100, 100]]], np.uint8)
    out = photometric_distort(image, ScriptedRng(coins=(1, 1, 0.0, 1), values=[0.5]))
    np.testing.assert_array_equal(out, [[[200, 150, 150]]])


def test_saturation_saturates_at_1_and_keeps_hue():
    # (250, 150, 50): hue 30°, S = 0.8; S x 1.5 clips to 1 -> (250, 125, 0), hue still 30°.
    # Unclipped S = 1.2 would give (250, 100, -50) -> (250, 100, 0), a hue of 24°.
    image = np.array([[[250, 150, 50]]], np.uint8)
    out = photometric_distort(image, ScriptedRng(coins=(1, 1, 0.0, 1), values=[1.5]))
    np.testing.assert_array_equal(out, [[[250, 125, 0]]])


# --- expand ------------------------------------------------------------------------------------


def test_expand_keeps_the_image_at_its_offset_and_boxes_on_the_same_pixels():
    image = coordinate_image(30, 40)
    boxes = np.array([[0, 0, 40, 30], [5, 6, 15, 20], [30, 2, 38, 9]], np.float32)
    for seed in range(20):
        canvas, out = expand(image, boxes, np.random.default_rng(seed))
        assert 30 <= canvas.shape[0] <= 120 and 40 <= canvas.shape[1] <= 160
        left, top = out[0, :2].astype(int)  # box 0 is the whole image
        np.testing.assert_array_equal(out - boxes, np.tile([left, top], (3, 2)))
        np.testing.assert_array_equal(canvas[top : top + 30, left : left + 40], image)
        for before, after in zip(boxes.astype(int), out.astype(int), strict=True):
            np.testing.assert_array_equal(
                canvas[after[1] : after[3], after[0] : after[2]],
                image[before[1] : before[3], before[0] : before[2]],
            )
        outside = np.ones(canvas.shape[:2], bool)
        outside[top : top + 30, left : left + 40] = False
        assert np.all(canvas[outside] == MEAN_RGB)


# --- flip --------------------------------------------------------------------------------------


def test_horizontal_flip_mirrors_pixels_and_boxes():
    image = coordinate_image(4, 10)
    flipped, boxes = horizontal_flip(image, np.array([[1, 2, 3, 4]], np.float32))
    np.testing.assert_array_equal(boxes, [[7, 2, 9, 4]])  # x -> 10 - x
    np.testing.assert_array_equal(flipped[:, :, 0], 9 - image[:, :, 0])
    np.testing.assert_array_equal(flipped[2:4, 7:9], image[2:4, 1:3][:, ::-1])


def test_flipping_twice_is_the_identity():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(13, 21, 3), dtype=np.uint8)
    grid_boxes = rng.integers(0, 21 * 8, size=(8, 4)).astype(np.float32) / 8  # exact in float32
    grid_boxes = np.concatenate([np.minimum(grid_boxes[:, :2], grid_boxes[:, 2:]), grid_boxes[:, 2:]], 1)
    twice_image, twice_boxes = horizontal_flip(*horizontal_flip(image, grid_boxes))
    np.testing.assert_array_equal(twice_image, image)
    np.testing.assert_array_equal(twice_boxes, grid_boxes)
    # Off the 1/8-pixel grid, W - (W - x) is exact only up to float32 rounding.
    float_boxes = random_sample(np.random.default_rng(1))[1]
    np.testing.assert_allclose(
        horizontal_flip(*horizontal_flip(image, float_boxes))[1], float_boxes, atol=1e-4
    )


def test_random_horizontal_flip_follows_its_probability():
    image, boxes, _ = random_sample(np.random.default_rng(3))
    flipped = horizontal_flip(image, boxes)
    assert_same_arrays(random_horizontal_flip(image, boxes, np.random.default_rng(0), p=1.0), flipped)
    assert_same_arrays(random_horizontal_flip(image, boxes, np.random.default_rng(0), p=0.0), (image, boxes))


# --- IoU crop ----------------------------------------------------------------------------------


@pytest.mark.parametrize("min_iou", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_sampled_crop_overlaps_a_box_it_keeps_by_at_least_min_iou(min_iou):
    successes = 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        width, height = 200, 150
        _, boxes, _ = random_sample(rng)
        boxes = np.concatenate([boxes, [[20, 10, 180, 140]]]).astype(np.float32)  # makes 0.9 reachable
        rect = sample_iou_crop(width, height, boxes, min_iou, rng)
        if rect is None:
            continue
        successes += 1
        x1, y1, x2, y2 = rect
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
        assert x2 - x1 >= int(CROP_MIN_SCALE * width) and y2 - y1 >= int(CROP_MIN_SCALE * height)
        assert 1 / CROP_MAX_ASPECT <= (x2 - x1) / (y2 - y1) <= CROP_MAX_ASPECT
        ious = box_iou(
            torch.as_tensor(rect[None], dtype=torch.float64), torch.as_tensor(boxes, dtype=torch.float64)
        )
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        kept = (centres[:, 0] > x1) & (centres[:, 0] < x2) & (centres[:, 1] > y1) & (centres[:, 1] < y2)
        assert ious[0].numpy()[kept].max() >= min_iou - 1e-6
    assert successes > 0  # the constraint was exercised, not skipped


def test_crop_keeps_boxes_whose_centre_is_inside_and_drops_the_rest():
    image = coordinate_image(100, 100)
    boxes = np.array(
        [
            [20, 20, 40, 40],  # centre (30, 30) inside -> kept, shifted by (10, 10)
            [50, 50, 90, 90],  # centre (70, 70) outside although it overlaps -> dropped
            [0, 0, 30, 30],  # centre (15, 15) inside -> kept, clipped to the patch
            [55, 0, 100, 20],  # centre (77.5, 10) outside -> dropped
        ],
        np.float32,
    )
    patch, out, labels = crop(image, boxes, np.array([1, 2, 3, 4]), np.array([10, 10, 60, 60]))
    np.testing.assert_array_equal(patch, image[10:60, 10:60])
    np.testing.assert_array_equal(out, [[10, 10, 30, 30], [0, 0, 20, 20]])
    np.testing.assert_array_equal(labels, [1, 3])


def test_random_iou_crop_keeps_each_label_with_its_own_box():
    for seed in FUZZ_SEEDS:
        rng = np.random.default_rng(seed)
        _, boxes, labels = random_sample(rng)
        image = coordinate_image(120, 130)  # random_sample boxes fit in 120 x 120
        patch, out, out_labels = random_iou_crop(image, boxes, labels, rng)
        left, top = int(patch[0, 0, 0]), int(patch[0, 0, 1])  # where the patch came from
        height, width = patch.shape[:2]
        expected = np.clip(boxes - [left, top, left, top], 0, [width, height, width, height])
        np.testing.assert_allclose(out, expected[out_labels - 1], atol=1e-4)
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        inside = np.all((centres > [left, top]) & (centres < [left + width, top + height]), axis=1)
        if (height, width) != image.shape[:2]:
            np.testing.assert_array_equal(out_labels, labels[inside])


def test_random_iou_crop_returns_the_input_when_no_trial_can_succeed():
    image = np.random.default_rng(0).integers(0, 256, size=(100, 100, 3), dtype=np.uint8)
    tiny = np.array([[10, 10, 12, 12]], np.float32)  # a crop >= 30x30 px has IoU <= 4/900 with it
    for mode in [(0.5,), (None,)]:
        out = random_iou_crop(image, tiny, np.array([7]), np.random.default_rng(0), min_ious=mode)
        assert_same_arrays(out, (image, tiny, [7]))


# --- resize and the pipelines ------------------------------------------------------------------


def test_resize_golden_4x2_to_8x8():
    image = np.zeros((2, 4, 3), np.uint8)  # H = 2, W = 4
    image[:, :2] = (255, 0, 0)
    image[:, 2:] = (0, 0, 255)
    out, boxes = resize(image, np.array([[1, 0, 3, 2]], np.float32), 8)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(boxes, [[2, 0, 6, 8]])  # x * 8/4, y * 8/2
    np.testing.assert_array_equal(out[:, 0], np.tile([255, 0, 0], (8, 1)))
    np.testing.assert_array_equal(out[:, 7], np.tile([0, 0, 255], (8, 1)))


def test_eval_transform_normalises_by_the_output_size():
    image = np.full((100, 200, 3), 7, np.uint8)
    out, boxes = eval_transform(image, np.array([[50, 25, 150, 75]], np.float32), 64)
    assert out.shape == (64, 64, 3)
    np.testing.assert_allclose(boxes, [[0.25, 0.25, 0.75, 0.75]], atol=1e-6)


def test_train_transform_without_augmentation_is_the_eval_transform():
    image, boxes, labels = random_sample(np.random.default_rng(5))
    out, out_boxes, out_labels = train_transform(
        image, boxes, labels, 32, np.random.default_rng(0), augment=False
    )
    ref, ref_boxes = eval_transform(image, boxes, 32)
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(out_boxes, ref_boxes)
    np.testing.assert_array_equal(out_labels, labels)


def test_drop_small_boxes_drops_slivers_with_their_labels():
    boxes = np.array([[0, 0, 5, 5], [0, 0, 0.5, 5], [0, 0, 5, 0.9], [1, 1, 2, 2]], np.float32)
    kept, labels = drop_small_boxes(boxes, np.array([1, 2, 3, 4]))
    np.testing.assert_array_equal(kept, boxes[[0, 3]])
    np.testing.assert_array_equal(labels, [1, 4])


def test_every_step_accepts_empty_boxes():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    empty, no_labels = np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)
    assert expand(image, empty, rng)[1].shape == (0, 4)
    assert sample_iou_crop(50, 40, empty, 0.1, rng) is None
    assert crop(image, empty, no_labels, np.array([0, 0, 10, 10]))[1].shape == (0, 4)
    assert random_iou_crop(image, empty, no_labels, rng)[1].shape == (0, 4)
    assert horizontal_flip(image, empty)[1].shape == (0, 4)
    assert resize(image, empty, 30)[1].shape == (0, 4)
    assert eval_transform(image, empty, 30)[1].shape == (0, 4)
    for seed in range(5):
        out, boxes, labels = train_transform(image, empty, no_labels, 30, rng_for(seed, 0, 0))
        assert out.shape == (30, 30, 3) and boxes.shape == (0, 4) and labels.shape == (0,)
        assert boxes.dtype == np.float32 and labels.dtype == np.int64


def test_boxes_stay_inside_the_image_after_every_step():
    for seed in FUZZ_SEEDS:
        rng = np.random.default_rng(seed)
        image, boxes, labels = random_sample(rng)
        image, boxes = expand(image, boxes, rng)
        assert_inside(boxes, image.shape[1], image.shape[0])
        image, boxes, labels = random_iou_crop(image, boxes, labels, rng)
        assert_inside(boxes, image.shape[1], image.shape[0])
        assert len(boxes) == len(labels)
        image, boxes = random_horizontal_flip(image, boxes, rng)
        assert_inside(boxes, image.shape[1], image.shape[0])
        image, boxes = resize(image, boxes, 48)
        assert_inside(boxes, 48, 48)


def test_train_transform_output_formats_over_random_samples():
    size = 48
    for seed in FUZZ_SEEDS:
        image, boxes, labels = random_sample(np.random.default_rng(seed))
        inputs = [image.copy(), boxes.copy(), labels.copy()]
        out, out_boxes, out_labels = train_transform(image, boxes, labels, size, rng_for(seed, 0, 0))
        assert out.shape == (size, size, 3) and out.dtype == np.uint8
        assert out_labels.dtype == np.int64 and out_labels.shape == (len(out_boxes),)
        assert_inside(out_boxes, 1.0, 1.0)
        sides = (out_boxes[:, 2:] - out_boxes[:, :2]) * size
        assert np.all(sides >= 1.0 - 1e-4)  # degenerate boxes were dropped
        assert set(out_labels) <= set(labels) and np.all(np.diff(out_labels) > 0)  # subset, order kept
        assert_same_arrays((image, boxes, labels), inputs)  # inputs untouched


def test_seeded_runs_repeat_exactly_and_different_seeds_differ():
    image, boxes, labels = random_sample(np.random.default_rng(0))
    first = train_transform(image, boxes, labels, 64, rng_for(0, 3, 7))
    again = train_transform(image, boxes, labels, 64, rng_for(0, 3, 7))
    other = train_transform(image, boxes, labels, 64, rng_for(1, 3, 7))
    assert_same_arrays(first, again)
    assert not np.array_equal(first[0], other[0])


# --- the zoom-out floor (data.zoom_out_floor) ------------------------------------------------


def test_the_zoom_out_limit_keeps_the_smallest_object_at_the_floor():
    boxes = np.array([[0, 0, 40, 40], [10, 10, 30, 20]], np.float32)  # scales 40 and sqrt(200) px
    # the smaller box, sqrt(20 * 10) = 14.1 px of a 200 px image, is 7.07 px at size 100
    assert zoom_out_limit((200, 200), boxes, 100, 0.0) == 4.0  # 0: the paper's 4x
    assert zoom_out_limit((200, 200), np.zeros((0, 4), np.float32), 100, 5.0) == 4.0
    assert zoom_out_limit((200, 200), boxes, 100, 7.07 / 2) == pytest.approx(2.0, rel=1e-3)
    assert zoom_out_limit((200, 200), boxes, 100, 1.0) == 4.0  # capped at the paper's ratio
    assert zoom_out_limit((200, 200), boxes, 100, 10.0) == 1.0  # already below: no zoom-out
    for seed in range(50):  # expanding by up to the limit, then resizing, keeps the floor
        rng = np.random.default_rng(seed)
        limit = zoom_out_limit((200, 200), boxes, 100, 3.0)
        canvas, moved = expand(np.zeros((200, 200, 3), np.uint8), boxes, rng, max_ratio=limit)
        _, out = resize(canvas, moved, 100)
        scales = np.sqrt((out[:, 2] - out[:, 0]) * (out[:, 3] - out[:, 1]))
        assert scales.min() >= 3.0 * 0.97  # canvas sides are whole pixels


def test_train_transform_with_a_floor_never_zooms_small_objects_out_further():
    image = np.full((160, 160, 3), 90, np.uint8)
    boxes = np.array([[20, 20, 30, 30]], np.float32)  # 10 px of 160: 8 px at 128
    labels = np.array([1])
    free, floored = [], []
    for seed in range(60):
        for out, min_object in ((free, 0.0), (floored, 12.8)):
            _, b, _ = train_transform(image, boxes, labels, 128, rng_for(seed, 0, 0), min_object=min_object)
            if len(b):
                out.append(float(np.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).min() * 128))
    # unbounded, the zoom-out shrinks the object to a few pixels; with the floor it is never
    # shrunk (crops only enlarge it, or cut it at their edge)
    assert min(free) < 4.0
    assert sum(s < 7.0 for s in floored) <= sum(s < 7.0 for s in free) // 4


def test_the_floor_is_a_fraction_of_the_smallest_default_box():
    from ssd import config as C

    tiny = C.preset("tiny")
    assert smallest_object(tiny) == pytest.approx(0.1 * 128)  # zoom_out_floor 1.0 x s_min x size
    assert smallest_object(C.override(tiny, ["data.zoom_out_floor=0.5"])) == pytest.approx(6.4)
    assert smallest_object(C.override(tiny, ["data.zoom_out_floor=0"])) == 0.0  # the paper's
    with pytest.raises(C.ConfigError, match=r"data\.zoom_out_floor"):
        C.override(tiny, ["data.zoom_out_floor=-1"])
