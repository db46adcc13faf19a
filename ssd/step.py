"""One SSD training step: forward, multibox loss, non-finite check, backward, clipping, update.

The only copy of the step: the Ray Train loop (`pipelines.train.loop`), `rayssd demo`, the
test fixtures and the benchmarks all call `TrainStep`, so "the same numerics without Ray"
holds by construction. On CUDA the forward runs under autocast (float16) with a gradient
scaler and channels-last images; the loss is always computed in float32.
"""

from __future__ import annotations

import torch
from torch import nn

from ssd.config import TrainConfig
from ssd.loss import multibox_loss
from ssd.optim import learning_rate, set_learning_rate


class TrainStep:
    """Callable that trains `model` one step on a batch of matched samples.

    `model` may be wrapped (DistributedDataParallel): the step only calls it. `amp` defaults
    to "on when `device` is CUDA". The learning rate follows `ssd.optim.learning_rate` over
    `total_steps` steps of `steps_per_epoch` each; `step` counts the updates done so far (set
    it when resuming).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        train: TrainConfig,
        *,
        total_steps: int,
        steps_per_epoch: int,
        step: int = 0,
        device: torch.device | str = "cpu",
        amp: bool | None = None,
    ) -> None:
        self.model, self.optimizer, self.train = model, optimizer, train
        self.total_steps, self.steps_per_epoch, self.step = total_steps, steps_per_epoch, step
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.amp = self.cuda if amp is None else amp
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)

    @property
    def lr(self) -> float:
        """Learning rate of the next step."""
        return learning_rate(self.train, self.step, self.total_steps, self.steps_per_epoch)

    def __call__(
        self, images: torch.Tensor, cls_targets: torch.Tensor, loc_targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """One update.

        Args:
            images: uint8 or float [B, 3, S, S], the network input (see `ssd.model`).
            cls_targets: integer [B, A], 0 = background (from `ssd.matching`).
            loc_targets: float [B, A, 4], encoded offsets of the matched boxes.

        Returns `multibox_loss`'s dict (``loss``, ``cls``, ``loc``, ``num_pos``), detached.
        Raises FloatingPointError on a non-finite loss, before the weights change.
        """
        t = self.train
        set_learning_rate(self.optimizer, self.lr)
        if self.cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, enabled=self.amp):
            cls_logits, loc_preds = self.model(images)
        losses = multibox_loss(
            cls_logits.float(),
            loc_preds.float(),
            cls_targets.long(),
            loc_targets.float(),
            neg_pos_ratio=t.neg_pos_ratio,
            alpha=t.loc_weight,
            min_negatives=t.min_negatives,
        )
        if not torch.isfinite(losses["loss"]):
            raise FloatingPointError(
                f"non-finite loss ({float(losses['loss'].detach())}) at step {self.step + 1}: "
                "lower train.lr or set train.grad_clip_norm"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses["loss"]).backward()
        if t.grad_clip_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        return {k: v.detach() for k, v in losses.items()}
