"""One frozen configuration tree for rayssd, its presets and its (de)serialisation.

The same `Config` object is built from a preset, a YAML file or a dict, overridden with
``key.path=value`` strings, stored in every checkpoint and logged to MLflow, so any
checkpoint can rebuild the exact model that produced it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

# SSD §2.2 "Hard negative mining": at most 3 negatives per positive.
NEG_POS_RATIO = 3.0
# SSD §2.2 "Matching strategy": default boxes with jaccard overlap above 0.5 are positives.
IOU_THRESHOLD = 0.5
# Box-coding variances of the original Caffe SSD; torchvision's BoxCoder weights are 1/v.
CENTER_VARIANCE = 0.1
SIZE_VARIANCE = 0.2


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "vgg16"  # one of BACKBONES
    num_classes: int = 21  # object classes + 1; class 0 is background
    image_size: int = 300  # square network input, pixels
    width: int = 32  # base channel count (tiny backbone only)
    # the backbone's starting weights: a local torchvision state-dict file, or "imagenet" for
    # torchvision's ImageNet weights of this backbone (`ssd.pretrained`; downloaded only if allowed)
    backbone_weights: str | None = None
    image_mean: tuple[float, ...] = (0.485, 0.456, 0.406)  # RGB, [0, 1] units
    image_std: tuple[float, ...] = (0.229, 0.224, 0.225)
    # memory layout of weights and images: "auto" (the faster on this machine, measured once by
    # `ssd.layout` and cached; channels-last on CUDA), "channels_last" or "contiguous"
    memory_format: str = "auto"


BACKBONES = ("vgg16", "mobilenet_v2", "tiny")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


@dataclass(frozen=True)
class AnchorConfig:
    feature_maps: tuple[int, ...] = (38, 19, 10, 5, 3, 1)  # side of each square feature map
    steps: tuple[float, ...] | None = (8, 16, 32, 64, 100, 300)  # pixels per cell; None: size/map
    # m + 1 scales as fractions of the input; the last one only feeds the extra box of map m.
    # None: the paper's rule s_k = s_min + (s_max - s_min)(k - 1)/(m - 1), then 1.0 appended.
    scales: tuple[float, ...] | None = (0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05)
    min_scale: float = 0.2  # s_min of the rule
    max_scale: float = 0.9  # s_max of the rule
    aspect_ratios: tuple[tuple[float, ...], ...] = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))
    clip: bool = True  # clamp default-box width and height to [0, 1]

    def resolved_scales(self) -> list[float]:
        """The m + 1 scales, given or from the paper's rule (SSD §2.2, eq. 4)."""
        if self.scales is not None:
            return [float(s) for s in self.scales]
        m = len(self.feature_maps)
        if m == 1:
            return [self.min_scale, self.max_scale]
        span = self.max_scale - self.min_scale
        return [self.min_scale + span * k / (m - 1) for k in range(m)] + [1.0]

    def resolved_steps(self, image_size: int) -> list[float]:
        if self.steps is not None:
            return [float(s) for s in self.steps]
        return [image_size / f for f in self.feature_maps]

    def boxes_per_location(self) -> list[int]:
        """Two boxes of aspect 1 (s_k and √(s_k·s_k+1)) plus a and 1/a for each ratio."""
        return [2 + 2 * len(r) for r in self.aspect_ratios]

    def num_default_boxes(self) -> int:
        return sum(f * f * n for f, n in zip(self.feature_maps, self.boxes_per_location()))


# The default threshold of answers given to people (the endpoint, the MLflow model): the
# configured 0.01 below is the paper's, kept for mAP, and leaves mostly noise in an answer.
ANSWER_SCORE_THRESHOLD = 0.3


@dataclass(frozen=True)
class InferenceConfig:
    score_threshold: float = 0.01  # per-class score a candidate must exceed
    nms_threshold: float = 0.45  # IoU above which a lower-scored box of the same class is dropped
    topk_candidates: int = 400  # per class, before NMS
    max_detections: int = 200  # per image, after NMS


@dataclass(frozen=True)
class DataConfig:
    class_names: tuple[str, ...] = ()  # object classes in label order 1..K
    val_fraction: float = 0.1  # seeded split when the source has none
    augment: bool = True  # SSD photometric + geometric augmentation while training
    # The zoom-out (SSD's "expand") shrinks no object below this fraction of the smallest
    # default box's size (`ssd.transforms.zoom_out_limit`): objects the detector has no box
    # for only teach it noise. 0 = the paper's unbounded zoom-out, up to 4x.
    zoom_out_floor: float = 1.0
    seed: int = 0
    # Without augmentation every epoch sees the same samples: prepare them once, keep them in
    # Ray's object store and read them back each epoch (skipped when they would not fit).
    cache: bool = True


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32  # per training worker
    optimizer: str = "sgd"  # sgd (the paper's) | adamw
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "step"  # step | cosine
    lr_milestones: tuple[float, ...] = (0.67, 0.89)  # fractions of training, step schedule
    lr_gamma: float = 0.1
    warmup_epochs: float = 0.0
    grad_clip_norm: float | None = None
    neg_pos_ratio: float = NEG_POS_RATIO
    # Hard negatives every image gives at least, so images without objects teach what is not
    # one (0 = the paper's rule: ratio x positives, none from an empty image); `ssd.loss`.
    min_negatives: int = 0
    loc_weight: float = 1.0  # alpha in L = (L_cls + alpha * L_loc) / N
    iou_threshold: float = IOU_THRESHOLD
    num_workers: int = 2
    seed: int = 0
    eval_every: int = 1  # epochs between COCO evaluations on the val split (and always at the end)
    # > 0: size the run in optimiser steps instead: train.epochs becomes the fewest epochs that
    # hold this many steps of the data at hand (small datasets get more epochs, large ones fewer)
    steps: int = 0


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01
    max_request_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 40_000_000


@dataclass(frozen=True)
class Config:
    name: str = "ssd300_vgg16"
    model: ModelConfig = field(default_factory=ModelConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


def _ssd300_vgg16() -> Config:
    return Config()  # the defaults above are the paper's SSD300


def _ssd512_vgg16() -> Config:
    # SSD512 of the paper (Caffe release): one more feature map, 1/8 stride at 64x64.
    return Config(
        name="ssd512_vgg16",
        model=ModelConfig(image_size=512),
        anchors=AnchorConfig(
            feature_maps=(64, 32, 16, 8, 4, 2, 1),
            steps=(8, 16, 32, 64, 128, 256, 512),
            scales=(0.04, 0.1, 0.26, 0.42, 0.58, 0.74, 0.9, 1.06),
            aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2, 3), (2,), (2,)),
        ),
    )


def _ssdlite320() -> Config:
    # SSDLite (MobileNetV2 paper §6.3): 6 maps from stride 16 down to 1x1, ratios 2 and 3
    # everywhere, scales by the paper's rule between 0.2 and 0.95 (as torchvision's SSDLite).
    return Config(
        name="ssdlite320",
        model=ModelConfig(backbone="mobilenet_v2", image_size=320, image_mean=(0.485, 0.456, 0.406)),
        anchors=AnchorConfig(
            feature_maps=(20, 10, 5, 3, 2, 1),
            steps=None,
            scales=None,
            min_scale=0.2,
            max_scale=0.95,
            aspect_ratios=((2, 3),) * 6,
        ),
        train=TrainConfig(optimizer="sgd", lr=0.015, weight_decay=4e-5, lr_schedule="cosine"),
    )


def _tiny() -> Config:
    # Small enough to train at >= 30 images/s on two CPU cores; 128 px, 5 maps.
    return Config(
        name="tiny",
        model=ModelConfig(backbone="tiny", image_size=128, width=32),
        anchors=AnchorConfig(
            feature_maps=(16, 8, 4, 2, 1),
            steps=None,
            scales=None,
            min_scale=0.1,
            max_scale=0.85,
            aspect_ratios=((2,), (2, 3), (2, 3), (2,), (2,)),
        ),
        train=TrainConfig(
            epochs=20,
            batch_size=32,
            optimizer="adamw",
            lr=3e-3,
            weight_decay=1e-4,
            lr_schedule="cosine",
            warmup_epochs=1.0,
        ),
    )


PRESETS = {
    "ssd300_vgg16": _ssd300_vgg16,
    "ssd512_vgg16": _ssd512_vgg16,
    "ssdlite320": _ssdlite320,
    "tiny": _tiny,
}


def preset(name: str) -> Config:
    """The named preset (one of `PRESETS`), validated."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    raw = PRESETS[name]()
    return validate(_build(Config, to_dict(raw), raw, ""))  # normalise ints to declared floats


# --- (de)serialisation -------------------------------------------------------------------


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (lists for tuples), safe for YAML, JSON and torch.save."""
    return _plain(dataclasses.asdict(cfg))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def from_dict(data: dict[str, Any], base: Config | None = None) -> Config:
    """Build a Config from a (possibly partial) nested dict; unknown keys are errors.

    Missing keys keep the value of `base` (default: `Config()`); a ``preset`` key picks
    the base preset first.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a mapping, got {type(data).__name__}")
    data = dict(data)
    if "preset" in data:
        base = preset(str(data.pop("preset")))
    return validate(_build(Config, data, base or Config(), ""))


def _build(cls: type, data: dict[str, Any], base: Any, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = prefix.rstrip(".") or "config"
        raise ConfigError(f"unknown field {prefix}{unknown[0]} in {where}; expected one of {sorted(names)}")
    values = {}
    for name in names:
        current = getattr(base, name)
        if name not in data:
            values[name] = current
        elif dataclasses.is_dataclass(hints[name]):
            sub = data[name]
            if not isinstance(sub, dict):
                raise ConfigError(f"{prefix}{name} must be a mapping, got {sub!r}")
            values[name] = _build(hints[name], sub, current, f"{prefix}{name}.")
        else:
            values[name] = _coerce(data[name], hints[name], f"{prefix}{name}")
    return cls(**values)


def _coerce(value: Any, hint: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint} at {path}")  # a bug in this module


def to_yaml(cfg: Config) -> str:
    import yaml  # here, not at import: `ssd` needs only torch to build and run a model

    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def from_yaml(text: str, base: Config | None = None) -> Config:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config is not valid YAML: {exc}") from exc
    return from_dict(data or {}, base)


def load(path: str | Path, base: Config | None = None) -> Config:
    """Read a YAML config file (a full tree, or a partial one on top of ``preset:``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    return from_yaml(path.read_text(), base)


def override(cfg: Config, assignments: list[str] | tuple[str, ...]) -> Config:
    """Apply ``key.path=value`` strings; values are YAML scalars or lists (``a=[1, 2]``)."""
    import yaml

    data: dict[str, Any] = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key.path=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return from_dict(data, cfg)


def config_hash(cfg: Config) -> str:
    """Stable short hash of the whole tree (for caches and manifests)."""
    blob = json.dumps(to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def flatten(cfg: Config) -> dict[str, Any]:
    """``{"train.lr": 0.001, ...}`` for MLflow params."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value

    walk(to_dict(cfg), "")
    return out


# --- validation --------------------------------------------------------------------------


def validate(cfg: Config) -> Config:
    """Return `cfg` unchanged, or raise ConfigError naming the first bad field."""
    m, a, t, i, d, s = cfg.model, cfg.anchors, cfg.train, cfg.inference, cfg.data, cfg.serve
    checks = [
        (m.backbone in BACKBONES, "model.backbone", f"must be one of {BACKBONES}"),
        (m.num_classes >= 2, "model.num_classes", "must be >= 2 (background + at least one class)"),
        (m.image_size >= 32, "model.image_size", "must be >= 32 pixels"),
        (m.width >= 4, "model.width", "must be >= 4"),
        (m.memory_format in MEMORY_FORMATS, "model.memory_format", f"must be one of {MEMORY_FORMATS}"),
        (len(m.image_mean) == 3 and len(m.image_std) == 3, "model.image_mean", "mean and std need 3 values"),
        (all(v > 0 for v in m.image_std), "model.image_std", "must be > 0"),
        (
            len(a.feature_maps) >= 1 and all(f >= 1 for f in a.feature_maps),
            "anchors.feature_maps",
            "must be a non-empty list of positive sizes",
        ),
        (
            len(a.aspect_ratios) == len(a.feature_maps),
            "anchors.aspect_ratios",
            f"needs one list per feature map ({len(a.feature_maps)})",
        ),
        (all(r > 0 for rs in a.aspect_ratios for r in rs), "anchors.aspect_ratios", "must be > 0"),
        (
            a.steps is None or len(a.steps) == len(a.feature_maps),
            "anchors.steps",
            f"needs one step per feature map ({len(a.feature_maps)})",
        ),
        (
            a.scales is None or len(a.scales) == len(a.feature_maps) + 1,
            "anchors.scales",
            f"needs {len(a.feature_maps) + 1} values (one per feature map, plus one)",
        ),
        (all(x > 0 for x in a.resolved_scales()), "anchors.scales", "must be > 0"),
        (0 < a.min_scale < a.max_scale, "anchors.min_scale", "must satisfy 0 < min_scale < max_scale"),
        (t.lr > 0, "train.lr", f"must be > 0, got {t.lr}"),
        (t.epochs >= 1, "train.epochs", "must be >= 1"),
        (t.eval_every >= 1, "train.eval_every", "must be >= 1 (epochs between evaluations)"),
        (t.steps >= 0, "train.steps", "must be >= 0 (0: train.epochs sizes the run)"),
        (t.batch_size >= 1, "train.batch_size", "must be >= 1"),
        (
            t.batch_size >= 2 or m.backbone == "vgg16",
            "train.batch_size",
            f"must be >= 2: the {m.backbone} backbone has BatchNorm, which needs 2 samples per step",
        ),
        (t.optimizer in ("sgd", "adamw"), "train.optimizer", "must be sgd or adamw"),
        (t.lr_schedule in ("step", "cosine"), "train.lr_schedule", "must be step or cosine"),
        (0 <= t.momentum < 1, "train.momentum", "must be in [0, 1)"),
        (t.weight_decay >= 0, "train.weight_decay", "must be >= 0"),
        (t.warmup_epochs >= 0, "train.warmup_epochs", "must be >= 0"),
        (t.grad_clip_norm is None or t.grad_clip_norm > 0, "train.grad_clip_norm", "must be > 0"),
        (t.neg_pos_ratio > 0, "train.neg_pos_ratio", "must be > 0"),
        (t.min_negatives >= 0, "train.min_negatives", "must be >= 0"),
        (t.loc_weight >= 0, "train.loc_weight", "must be >= 0"),
        (0 < t.iou_threshold < 1, "train.iou_threshold", "must be in (0, 1)"),
        (t.num_workers >= 1, "train.num_workers", "must be >= 1"),
        (0 <= i.score_threshold < 1, "inference.score_threshold", "must be in [0, 1)"),
        (0 < i.nms_threshold <= 1, "inference.nms_threshold", "must be in (0, 1]"),
        (i.topk_candidates >= 1, "inference.topk_candidates", "must be >= 1"),
        (i.max_detections >= 1, "inference.max_detections", "must be >= 1"),
        (0 <= d.val_fraction < 1, "data.val_fraction", "must be in [0, 1)"),
        (d.zoom_out_floor >= 0, "data.zoom_out_floor", "must be >= 0 (0: the paper's zoom-out)"),
        (
            not d.class_names or len(d.class_names) == m.num_classes - 1,
            "data.class_names",
            f"needs model.num_classes - 1 = {m.num_classes - 1} names",
        ),
        (1 <= s.port <= 65535, "serve.port", "must be a TCP port"),
        (s.max_batch_size >= 1, "serve.max_batch_size", "must be >= 1"),
        (s.max_request_bytes >= 1, "serve.max_request_bytes", "must be >= 1"),
    ]
    for ok, name, message in checks:
        if not ok:
            raise ConfigError(f"{name} {message}")
    return cfg


def with_classes(cfg: Config, class_names: tuple[str, ...]) -> Config:
    """The config with the dataset's classes (labels 1..K, 0 = background)."""
    return override(
        cfg, [f"model.num_classes={len(class_names) + 1}", f"data.class_names={list(class_names)}"]
    )
