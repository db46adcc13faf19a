"""Real photographs that installed packages ship (matplotlib's Grace Hopper portrait; scikit-learn's
China and flower pictures, MLflow depends on it), cut into network inputs for tests that compare
two inference engines on real pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def photo_paths() -> list[Path]:
    from matplotlib import cbook

    paths = [Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))]
    try:
        import sklearn

        images = Path(sklearn.__file__).parent / "datasets" / "images"
        paths += [images / "china.jpg", images / "flower.jpg"]
    except ImportError:
        pass
    return paths


def photo_crops(size: int, count: int, seed: int = 0) -> np.ndarray:
    """`count` random crops (half to all of each side) of the photographs, resized to
    size x size: uint8 [count, 3, size, size] RGB."""
    rng = np.random.default_rng(seed)
    photos = []
    for path in photo_paths():
        with Image.open(path) as image:
            photos.append(image.convert("RGB"))
    out = []
    for k in range(count):
        photo = photos[k % len(photos)]
        width, height = photo.size
        w, h = (int(side * rng.uniform(0.5, 1.0)) for side in (width, height))
        x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        crop = photo.crop((x, y, x + w, y + h)).resize((size, size), Image.Resampling.BILINEAR)
        out.append(np.asarray(crop).transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(out))
