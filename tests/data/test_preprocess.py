import threading

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.data.samples import SampleExpander, SamplePreprocessor, decode_input, encode_jpeg, preprocess
from ssd import config as C
from ssd.anchors import default_boxes
from ssd.matching import encode_targets
from ssd.transforms import eval_transform

CFG = C.override(C.preset("tiny"), ["model.num_classes=4"])


def make_rows(tmp_path, count=6, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        h, w = int(rng.integers(90, 200)), int(rng.integers(90, 200))
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        path = tmp_path / f"img{i}.png"
        Image.fromarray(pixels).save(path)
        n = i % 4  # 0..3 boxes, one image without any
        xy = rng.uniform(0, 0.5, (n, 2)) * [w, h]
        wh = rng.uniform(0.2, 0.45, (n, 2)) * [w, h]
        rows.append(
            {
                "image_id": 100 + i,
                "path": str(path),
                "width": w,
                "height": h,
                "boxes": np.concatenate([xy, xy + wh], 1).astype(np.float32).reshape(n, 4),
                "labels": rng.integers(1, 4, n).astype(np.int64),
                "ignore": np.array([j == 2 for j in range(n)], dtype=bool),  # the third box is a crowd box
            }
        )
    return rows


def expected_targets(row):
    image = np.array(Image.open(row["path"]).convert("RGB"))
    keep = ~row["ignore"]
    resized, unit = eval_transform(image, row["boxes"][keep], CFG.model.image_size)
    cls_t, loc_t = encode_targets(
        torch.from_numpy(unit), torch.from_numpy(row["labels"][keep]), default_boxes(CFG)
    )
    return resized.transpose(2, 0, 1), cls_t.numpy(), loc_t.numpy()


def test_pipeline_targets_equal_direct_matching_of_the_same_images(ray_local, tmp_path):
    rows = make_rows(tmp_path)
    ds = preprocess(ray_local.data.from_items(rows), CFG, train=False, batch_size=4, workers=1)
    out = {int(r["image_id"]): r for r in ds.take_all()}
    assert sorted(out) == [r["image_id"] for r in rows]
    for row in rows:
        image, cls_t, loc_t = expected_targets(row)
        got = out[row["image_id"]]
        assert got["image"].dtype == np.uint8 and got["image"].shape == (3, 128, 128)
        assert np.array_equal(got["image"], image)
        assert got["cls_targets"].dtype == np.int16
        assert np.array_equal(got["cls_targets"], cls_t)
        np.testing.assert_allclose(got["loc_targets"], loc_t, rtol=0, atol=1e-6)
        assert (got["width"], got["height"]) == (row["width"], row["height"])


def test_crowd_boxes_are_not_training_targets(tmp_path):
    path = tmp_path / "crowd.png"
    Image.fromarray(np.zeros((100, 100, 3), dtype=np.uint8)).save(path)
    row = {
        "image_id": 1,
        "path": str(path),
        "width": 100,
        "height": 100,
        "boxes": np.array([[5, 5, 40, 40], [55, 55, 95, 95]], dtype=np.float32),
        "labels": np.array([1, 3]),
        "ignore": np.array([False, True]),
    }
    batch = {k: np.array([row[k], None], dtype=object)[:1] for k in row}
    out = SamplePreprocessor(C.to_dict(CFG), train=False)(batch)
    assert set(out["cls_targets"][0].tolist()) == {0, 1}  # the crowd's label 3 never appears


def test_augmentation_repeats_for_the_same_epoch_and_changes_between_epochs(tmp_path):
    rows = make_rows(tmp_path, count=3)
    batch = {k: np.array([r[k] for r in rows] + [None], dtype=object)[:-1] for k in rows[0]}
    epoch0 = SamplePreprocessor(C.to_dict(CFG), train=True, epoch=0)(batch)
    again = SamplePreprocessor(C.to_dict(CFG), train=True, epoch=0)(batch)
    epoch1 = SamplePreprocessor(C.to_dict(CFG), train=True, epoch=1)(batch)
    assert np.array_equal(epoch0["image"], again["image"])
    assert np.array_equal(epoch0["cls_targets"], again["cls_targets"])
    assert not np.array_equal(epoch0["image"], epoch1["image"])


def test_two_consumers_of_a_streaming_split_see_disjoint_parts_covering_everything(ray_local, tmp_path):
    rows = make_rows(tmp_path, count=8)
    ds = preprocess(ray_local.data.from_items(rows), CFG, train=False, batch_size=2, workers=1)
    shards = ds.streaming_split(2, equal=True)
    seen: list[list[int]] = [[], []]

    def consume(i):
        for batch in shards[i].iter_batches(batch_size=2):
            seen[i].extend(batch["image_id"].tolist())

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == [r["image_id"] for r in rows]
    assert len(seen[0]) == len(seen[1]) == 4  # balanced


@pytest.mark.parametrize("num_classes, dtype", [(21, np.int16), (40000, np.int32)])
def test_class_targets_use_the_smallest_exact_dtype(num_classes, dtype):
    from pipelines.data.samples import class_target_dtype

    assert class_target_dtype(num_classes) == dtype


def test_an_epoch_clock_reseeds_augmentation_per_epoch_and_repeats_an_epoch(ray_local, tmp_path):
    from pipelines.data.samples import start_epoch_clock

    rows = make_rows(tmp_path, count=4)
    clock = start_epoch_clock("test-epoch-clock")
    ds = preprocess(ray_local.data.from_items(rows), CFG, train=True, epoch="test-epoch-clock", workers=1)

    def images():
        return {int(r["image_id"]): r["image"] for r in ds.take_all()}

    first = images()
    ray_local.get(clock.set.remote(1))
    second = images()
    ray_local.get(clock.set.remote(0))
    again = images()
    assert all(np.array_equal(first[i], again[i]) for i in first)
    assert any(not np.array_equal(first[i], second[i]) for i in first)


def test_a_missing_epoch_clock_is_named_in_the_error(ray_local):
    with pytest.raises(ValueError, match="no-such-clock"):
        SamplePreprocessor(C.to_dict(CFG), train=True, epoch="no-such-clock")


def test_compact_samples_expand_to_the_same_targets_with_and_without_boxes(tmp_path):
    rows = make_rows(tmp_path, count=4)  # 0, 1, 2 and 3 boxes (one a crowd box)
    batch = {key: np.array([r[key] for r in rows] + [None], dtype=object)[:-1] for key in rows[0]}
    config = C.to_dict(CFG)
    compact = SamplePreprocessor(config, train=False, compact=True)(batch)
    assert set(compact) == {
        "image_id",
        "width",
        "height",
        "image_jpeg",
        "matches",
        "target_boxes",
        "target_labels",
    }
    assert compact["matches"].dtype == np.int16 and compact["matches"].shape == (
        4,
        CFG.anchors.num_default_boxes(),
    )
    assert [len(b) for b in compact["target_boxes"]] == [0, 1, 2, 2]  # crowd boxes are no targets
    expanded = SampleExpander(config)(compact)
    for i, row in enumerate(rows):
        image, cls_t, loc_t = expected_targets(row)
        assert np.array_equal(expanded["cls_targets"][i], cls_t) and expanded["cls_targets"].dtype == np.int16
        np.testing.assert_allclose(expanded["loc_targets"][i], loc_t, rtol=0, atol=1e-6)
        assert np.array_equal(expanded["image"][i], decode_input(encode_jpeg(image.transpose(1, 2, 0))))
    assert not (expanded["cls_targets"][0] > 0).any() and (expanded["cls_targets"][1] > 0).any()
    inputs = SampleExpander(config, targets=False)(
        {k: compact[k] for k in ("image_id", "width", "height", "image_jpeg")}
    )
    assert set(inputs) == {"image_id", "width", "height", "image"}
