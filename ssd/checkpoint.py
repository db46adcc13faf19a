"""Checkpoint files: everything needed to rebuild a model, and to continue training it.

One ``torch.save`` dict of tensors and plain values, so ``torch.load(weights_only=True)``
reads it without running any code from the file:

* ``format``, ``version`` — what this is;
* ``config`` — the full config tree (`ssd.config.to_dict`), so a checkpoint rebuilds its
  own model with no other input;
* ``dataset`` — class names and source category ids (labels 1..K ↔ ids), plus any
  other plain facts about the data the model was trained on;
* ``model`` — the state dict;
* ``epoch`` (epochs completed), ``step`` (optimiser steps taken), ``metrics`` (the last
  reported ones);
* ``optimizer`` — optimiser state, absent in a model-only file (``for_inference``).

The learning rate is a pure function of the step (`ssd.optim.learning_rate`), so the
step is the whole scheduler state.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssd import config as C
from ssd.model import SSD, build_ssd

FORMAT = "rayssd-checkpoint"
VERSION = 1
FILE_NAME = "checkpoint.pt"


def make_checkpoint(
    model: nn.Module,
    cfg: C.Config,
    dataset: dict[str, Any],
    *,
    epoch: int,
    step: int,
    optimizer: torch.optim.Optimizer | None = None,
    metrics: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The checkpoint dict of `model` (unwrap DDP first). `dataset` needs ``class_names``
    and ``category_ids`` (K each, labels 1..K); tensors are moved to the CPU."""
    for key in ("class_names", "category_ids"):
        if key not in dataset:
            raise ValueError(f"checkpoint dataset info lacks {key!r}")
    if len(dataset["class_names"]) != cfg.model.num_classes - 1:
        raise ValueError(
            f"checkpoint dataset has {len(dataset['class_names'])} classes but model.num_classes is "
            f"{cfg.model.num_classes} (classes + background)"
        )
    ckpt: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "config": C.to_dict(cfg),
        "dataset": _plain(dataset),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "epoch": int(epoch),
        "step": int(step),
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
    }
    if optimizer is not None:
        ckpt["optimizer"] = _to_cpu(optimizer.state_dict())
    return ckpt


def for_inference(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The same checkpoint without the optimiser state (about a third of the size with SGD)."""
    return {k: v for k, v in ckpt.items() if k != "optimizer"}


def save(ckpt: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write `ckpt` to `path` (a file, or a directory that gets ``checkpoint.pt``) atomically."""
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path.mkdir(parents=True, exist_ok=True)
        path = path / FILE_NAME
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)
    return path


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint file (or a directory holding ``checkpoint.pt``) with
    ``weights_only=True``; raises ValueError if it is not a rayssd checkpoint."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle and zip errors of every kind: say which file, and why
        why = " ".join(str(exc).split())  # torch's messages run over several lines
        raise ValueError(f"{path} is not a readable rayssd checkpoint: {why}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a rayssd checkpoint (no format {FORMAT!r} marker)")
    if ckpt.get("version", 0) > VERSION:
        raise ValueError(f"{path} is checkpoint version {ckpt['version']}; this rayssd reads up to {VERSION}")
    return ckpt


def config_of(ckpt: dict[str, Any]) -> C.Config:
    """The checkpoint's config. A backbone weights file named there is not needed any more
    (the state dict holds the trained weights) and may not exist on this machine, so it is
    dropped."""
    cfg = C.from_dict(ckpt["config"])
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backbone_weights=None))


def build_model(ckpt: dict[str, Any]) -> tuple[SSD, C.Config]:
    """The trained model (in eval mode, on the CPU) and its config."""
    cfg = config_of(ckpt)
    model = build_ssd(cfg)
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _plain(value: Any) -> Any:
    """Lists, dicts, str, int, float, bool, None only: what weights_only loading accepts."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"checkpoint dataset info holds a {type(value).__name__}; only plain values are stored")
