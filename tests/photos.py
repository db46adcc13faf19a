"""Real photographs that installed packages ship (matplotlib's Grace Hopper portrait; scikit-learn's
China and flower pictures, MLflow depends on it), cut into network inputs for tests that compare
two inference engines on real pixels."""

from __future__ import annotations

import numpy as np
from PIL import Image

from benchmarks.bench_scale import real_photographs  # the one list of shipped photographs


def photo_crops(size: int, count: int, seed: int = 0) -> np.ndarray:
    """`count` random crops (half to all of each side) of the photographs, resized to
    size x size: uint8 [count, 3, size, size] RGB."""
    rng = np.random.default_rng(seed)
    photos = real_photographs()
    out = []
    for k in range(count):
        photo = photos[k % len(photos)]
        width, height = photo.size
        w, h = (int(side * rng.uniform(0.5, 1.0)) for side in (width, height))
        x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        crop = photo.crop((x, y, x + w, y + h)).resize((size, size), Image.Resampling.BILINEAR)
        out.append(np.asarray(crop).transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(out))
