"""SSD feature extractors: the paper's VGG16, SSDLite's MobileNetV2 and a tiny CPU network.

A backbone maps normalised images ``Tensor[B, 3, S, S]`` to its own prediction sources
(a list of ``Tensor[B, C_k, H_k, W_k]``, channels in ``out_channels``); the matching
``*_extras`` builder adds the extra feature layers that shrink the last of them down to
1x1 (SSD §2.1 "Multi-scale feature maps for detection", Fig. 2). Every extra block maps
the previous feature map to the next one.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Iterable

import torch
import torchvision
from torch import Tensor, nn

logger = logging.getLogger(__name__)

# torchvision's VGG16 (configuration "D"); "M" is a 2x2 stride-2 max-pool. Laid out the same
# way so that `features.N.*` keys of torchvision's ImageNet state dict load unchanged.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
VGG16_POOL3 = 16  # index of pool3 in `features`
VGG16_CONV4_3_RELU = 22  # index of the ReLU after conv4_3, the first prediction source
VGG16_POOL5 = 30
# SSD §3.1: conv4_3 has a larger feature scale than the other maps, so it is L2-normalised
# per location and rescaled by a learned per-channel factor initialised to 20 (ParseNet).
L2NORM_INIT_SCALE = 20.0
# SSD §3 "Base network": fc6 becomes a 3x3 atrous conv (dilation 6) with 1024 channels.
FC6_DILATION = 6

# Extra layers, per block: (1x1 bottleneck channels, output channels, kernel, stride, padding).
# SSD300 (Fig. 2: conv8_2 .. conv11_2): 19 -> 10 -> 5 -> 3 -> 1.
SSD300_EXTRAS = ((256, 512, 3, 2, 1), (128, 256, 3, 2, 1), (128, 256, 3, 1, 0), (128, 256, 3, 1, 0))
# SSD512 of the Caffe release (conv8_2 .. conv12_2): 32 -> 16 -> 8 -> 4 -> 2 -> 1.
SSD512_EXTRAS = (
    (256, 512, 3, 2, 1),
    (128, 256, 3, 2, 1),
    (128, 256, 3, 2, 1),
    (128, 256, 3, 2, 1),
    (128, 256, 4, 1, 1),
)

# MobileNetV2 paper §6.2: SSDLite's first layer sits on "the expansion of layer 15 (output
# stride 16)" = `features[14]`, the first stride-32 block, tapped before its depthwise
# stride (as torchvision's ssdlite taps C4 of MobileNetV3); the rest on the last layer.
MOBILENET_V2_C4_BLOCK = 14
MOBILENET_V2_C4_CHANNELS = 576
MOBILENET_V2_LAST_CHANNELS = 1280
SSDLITE_EXTRA_CHANNELS = (512, 256, 256, 128)

# Keys of torchvision's ImageNet classification files that a detector never uses.
CLASSIFIER_PREFIX = "classifier."


def xavier_init(module: nn.Module) -> None:
    """Xavier-uniform conv weights and zero biases, as the SSD Caffe release and torchvision."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def normal_init(module: nn.Module, *, std: float = 0.03) -> None:
    """N(0, std) conv weights and zero biases, torchvision's SSDLite initialisation."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.normal_(layer.weight, mean=0.0, std=std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def conv_bn_act(
    in_channels: int,
    out_channels: int,
    *,
    kernel_size: int = 3,
    stride: int = 1,
    groups: int = 1,
    activation: type[nn.Module] = nn.ReLU,
) -> nn.Sequential:
    """Conv (no bias: BN supplies it) + BatchNorm + activation, 'same' padding."""
    return nn.Sequential(
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=(kernel_size - 1) // 2,
            groups=groups,
            bias=False,
        ),
        nn.BatchNorm2d(out_channels),
        activation(inplace=True),
    )


# --- VGG16 (SSD300 / SSD512) ---------------------------------------------------------------


class L2Norm(nn.Module):
    """Per-location L2 normalisation with a learned per-channel scale (SSD §3.1, ParseNet)."""

    def __init__(self, channels: int, *, init_scale: float = L2NORM_INIT_SCALE) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), init_scale))

    def forward(self, x: Tensor) -> Tensor:  # [B, C, H, W] -> [B, C, H, W]
        return self.weight.view(1, -1, 1, 1) * nn.functional.normalize(x, dim=1)


def vgg16_features() -> nn.Sequential:
    """VGG16 conv1_1 .. conv5_3 with torchvision's layer indices and SSD's pooling changes."""
    layers: list[nn.Module] = []
    in_channels = 3
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, int(item), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_channels = int(item)
    # Caffe pools round up, which gives 38x38 (not 37x37) after pool3 at 300 px.
    layers[VGG16_POOL3] = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)
    # SSD §3 "Base network": pool5 becomes 3x3 stride 1, so fc6/fc7 stay at 19x19 (300 px).
    layers[VGG16_POOL5] = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
    features = nn.Sequential(*layers)
    for layer in features.modules():  # torchvision's VGG initialisation
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)
    return features


class VGG16Backbone(nn.Module):
    """VGG16 up to fc7; sources are conv4_3 (L2-normalised, 512 ch) and fc7 (1024 ch)."""

    out_channels = (512, 1024)

    def __init__(self) -> None:
        super().__init__()
        self.features = vgg16_features()
        self.conv4_3_norm = L2Norm(512)
        # SSD §3 "Base network": fc6/fc7 as convolutions; fc6 atrous so it keeps the
        # receptive field of the 7x7 fc6 of VGG16 after the stride-1 pool5. The paper
        # subsamples them from VGG's fc layers; torchvision files give none, so they start
        # from xavier init (as torchvision's ssd300_vgg16).
        self.fc = nn.Sequential(
            nn.Conv2d(512, 1024, kernel_size=3, padding=FC6_DILATION, dilation=FC6_DILATION),
            nn.ReLU(inplace=True),
            nn.Conv2d(1024, 1024, kernel_size=1),
            nn.ReLU(inplace=True),
        )
        xavier_init(self.fc)

    def forward(self, x: Tensor) -> list[Tensor]:  # [B, 3, S, S] -> [B, 512, S/8], [B, 1024, S/16]
        sources = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i == VGG16_CONV4_3_RELU:
                sources.append(self.conv4_3_norm(x))
        sources.append(self.fc(x))
        return sources


def vgg16_extras(*, num_maps: int) -> tuple[nn.ModuleList, list[int]]:
    """SSD300's extra layers for 6 feature maps, SSD512's for 7; returns blocks and channels."""
    layouts = {6: SSD300_EXTRAS, 7: SSD512_EXTRAS}
    if num_maps not in layouts:
        raise ValueError(
            f"anchors.feature_maps has {num_maps} maps, but the vgg16 backbone builds 6 "
            "(SSD300 layout) or 7 (SSD512 layout)"
        )
    blocks, channels, in_channels = nn.ModuleList(), [], VGG16Backbone.out_channels[-1]
    for mid, out, kernel, stride, padding in layouts[num_maps]:
        blocks.append(
            nn.Sequential(
                nn.Conv2d(in_channels, mid, kernel_size=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(mid, out, kernel_size=kernel, stride=stride, padding=padding),
                nn.ReLU(inplace=True),
            )
        )
        channels.append(out)
        in_channels = out
    xavier_init(blocks)
    return blocks, channels


# --- MobileNetV2 (SSDLite) -----------------------------------------------------------------


class MobileNetV2Backbone(nn.Module):
    """torchvision's MobileNetV2 `features`; sources are block 14's expansion (576 ch, S/16)
    and the final 1x1 conv (1280 ch, S/32)."""

    out_channels = (MOBILENET_V2_C4_CHANNELS, MOBILENET_V2_LAST_CHANNELS)

    def __init__(self) -> None:
        super().__init__()
        # Kept whole (same keys as torchvision's file); block 14 has no residual connection
        # (stride 2), so running its layers one by one below is exact.
        self.features = torchvision.models.mobilenet_v2(weights=None).features

    def forward(self, x: Tensor) -> list[Tensor]:  # [B, 3, S, S] -> [B, 576, S/16], [B, 1280, S/32]
        sources = []
        for i, block in enumerate(self.features):
            if i == MOBILENET_V2_C4_BLOCK:
                expansion, *rest = block.conv
                x = expansion(x)
                sources.append(x)
                for layer in rest:
                    x = layer(x)
            else:
                x = block(x)
        sources.append(x)
        return sources


def ssdlite_extras(*, in_channels: int = MOBILENET_V2_LAST_CHANNELS) -> tuple[nn.ModuleList, list[int]]:
    """MobileNetV2 paper §6.2: extra layers as 1x1 (c/2) -> depthwise 3x3 s2 -> 1x1 (c)."""
    blocks, channels = nn.ModuleList(), []
    for out in SSDLITE_EXTRA_CHANNELS:
        mid = out // 2
        blocks.append(
            nn.Sequential(
                conv_bn_act(in_channels, mid, kernel_size=1, activation=nn.ReLU6),
                conv_bn_act(mid, mid, stride=2, groups=mid, activation=nn.ReLU6),
                conv_bn_act(mid, out, kernel_size=1, activation=nn.ReLU6),
            )
        )
        channels.append(out)
        in_channels = out
    normal_init(blocks)
    return blocks, channels


# --- tiny (tests, quickstart) --------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs + identity); deepens a stage at constant size."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = conv_bn_act(channels, channels)
        self.conv2 = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:  # [B, C, H, W] -> [B, C, H, W]
        return self.act(x + self.conv2(self.conv1(x)))


class TinyBackbone(nn.Module):
    """A small ResNet-like net for CPU training at 128 px.

    Sources at strides 8 and 16 (16x16 and 8x8 at 128 px) with 4w and 8w channels. Every
    stage ends in a residual block, giving receptive fields of 63 px (stride 8, for the
    smallest default boxes of ~13 px) and 143 px (stride 16, the whole image) at 128 px.
    Plain 3x3 convs: on CPU they train far faster per FLOP than depthwise ones.
    """

    def __init__(self, *, width: int = 32) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(
            conv_bn_act(3, w, stride=2),  # S/2
            conv_bn_act(w, 2 * w, stride=2),  # S/4
            BasicBlock(2 * w),
        )
        self.stage3 = nn.Sequential(conv_bn_act(2 * w, 4 * w, stride=2), BasicBlock(4 * w))  # S/8
        self.stage4 = nn.Sequential(conv_bn_act(4 * w, 8 * w, stride=2), BasicBlock(8 * w))  # S/16
        self.out_channels = (4 * w, 8 * w)

    def forward(self, x: Tensor) -> list[Tensor]:  # [B, 3, S, S] -> [B, 4w, S/8], [B, 8w, S/16]
        c3 = self.stage3(self.stem(x))
        return [c3, self.stage4(c3)]


def tiny_extras(*, width: int = 32, num_extras: int = 3) -> tuple[nn.ModuleList, list[int]]:
    """SSD-style extras (1x1 bottleneck, then 3x3 stride 2), each halving the map."""
    w = width
    blocks = nn.ModuleList(
        nn.Sequential(conv_bn_act(8 * w, 4 * w, kernel_size=1), conv_bn_act(4 * w, 8 * w, stride=2))
        for _ in range(num_extras)
    )
    return blocks, [8 * w] * num_extras


# --- weights -------------------------------------------------------------------------------


def load_torchvision_features(
    features: nn.Module,
    path: str | os.PathLike[str],
    *,
    ignore_prefixes: Iterable[str] = (CLASSIFIER_PREFIX,),
) -> None:
    """Load the ``features.*`` tensors of a torchvision classification state-dict file.

    Keys under `ignore_prefixes` are skipped; any other key the file has and `features`
    lacks (or the reverse), or a shape mismatch, raises ValueError naming file and key.
    """
    state = read_state_dict(path)
    ignore = tuple(ignore_prefixes)
    expected = {f"features.{k}": v for k, v in features.state_dict().items()}
    kept = {k: v for k, v in state.items() if not k.startswith(ignore)}
    for key, value in kept.items():
        if key not in expected:
            raise ValueError(f"backbone weights file {path}: unexpected key {key!r}")
        if not isinstance(value, Tensor) or value.shape != expected[key].shape:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"backbone weights file {path}: key {key!r} has shape {got}, "
                f"expected {tuple(expected[key].shape)}"
            )
    # Files from older torchvision lack BN's `num_batches_tracked`; it only counts steps.
    missing = [k for k in expected if k not in kept and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"backbone weights file {path}: missing key {missing[0]!r}")
    features.load_state_dict({k.removeprefix("features."): v for k, v in kept.items()}, strict=False)
    logger.info("loaded %d backbone tensors from %s", len(kept), path)


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """A state dict from a local ``torch.save`` file (tensors only: ``weights_only=True``)."""
    if not os.path.isfile(path):
        raise ValueError(f"backbone weights file {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError) as exc:
        raise ValueError(f"backbone weights file {path}: not a readable torch state dict ({exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ValueError(f"backbone weights file {path}: expected a state dict, got {type(state).__name__}")
    return state
