"""Optimiser and learning-rate schedule from `TrainConfig` (SSD §3: SGD, momentum 0.9,
weight decay 5e-4, step decay), with AdamW and cosine decay as options."""

from __future__ import annotations

import math

import torch
from torch import nn

from ssd.config import TrainConfig


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum (the paper's) or AdamW; no weight decay on norms and biases."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum)
    return torch.optim.AdamW(groups, lr=train.lr)


def learning_rate(train: TrainConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Learning rate at optimiser step `step` (0-based) of `total_steps`.

    Linear warm-up over ``warmup_epochs``, then either steps of ``lr_gamma`` at the
    ``lr_milestones`` (fractions of training) or a cosine decay to zero.
    """
    warmup = int(train.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return train.lr * (step + 1) / warmup
    if train.lr_schedule == "cosine":
        progress = (step - warmup) / max(1, total_steps - warmup)
        return train.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    passed = sum(step >= m * total_steps for m in train.lr_milestones)
    return train.lr * train.lr_gamma**passed


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
