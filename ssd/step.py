"""One SSD training step: forward, multibox loss, non-finite check, backward, clipping, update.

The only copy of the step: the Ray Train loop (`pipelines.train.loop`), `rayssd demo`, the
test fixtures and the benchmarks all call `TrainStep`, so "the same numerics without Ray"
holds by construction. With AMP (on by default on CUDA) the forward runs under autocast in
bfloat16 where the device supports it (no scaler needed: bf16 has float32's range), else in
float16 with a gradient scaler; on CUDA images are channels-last. The loss is always computed
in float32.

Host syncs: a Python `if` on a GPU tensor waits for the queue to drain. The finiteness check
is the only one in the step; it runs every `check_every` steps (1 on the CPU, where it costs
nothing, `CUDA_CHECK_EVERY` on CUDA), on a flag the steps in between accumulate on the device.
Between checks a non-finite loss still reaches the optimiser (under the float16 scaler that
update is skipped, in bfloat16 or float32 it is not); the next check stops the run, saying
which steps, on every rank at once (the flag is all-reduced). The float16 scaler itself reads
its overflow flag back every step: bfloat16, where the GPU has it, needs no scaler.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ssd.config import TrainConfig
from ssd.loss import multibox_loss
from ssd.optim import learning_rate, set_learning_rate

CUDA_CHECK_EVERY = 50  # steps between finiteness checks (host syncs) on CUDA


def amp_dtype(device: torch.device) -> torch.dtype:
    """The autocast type of `device`: bfloat16 on CPUs and on GPUs that run it natively
    (compute capability 8.0 on: Ampere, Hopper, ...), else float16. (torch's
    `is_bf16_supported` also says yes where bfloat16 is only emulated, slowly: V100, T4.)"""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        return torch.float16
    return torch.bfloat16


class TrainStep:
    """Callable that trains `model` one step on a batch of matched samples.

    `model` may be wrapped (DistributedDataParallel): the step only calls it. `amp` defaults
    to "on when `device` is CUDA". The learning rate follows `ssd.optim.learning_rate` over
    `total_steps` steps of `steps_per_epoch` each; `step` counts the updates done so far (set
    it when resuming). `check_every` (default: 1 on the CPU, `CUDA_CHECK_EVERY` on CUDA) is
    how often the loss's finiteness is read back; call `check` at the end of an epoch.
    `channels_last` (default: on CUDA) hands the images to the model in that layout.
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
        check_every: int | None = None,
        channels_last: bool | None = None,
    ) -> None:
        self.model, self.optimizer, self.train = model, optimizer, train
        self.total_steps, self.steps_per_epoch, self.step = total_steps, steps_per_epoch, step
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.amp = self.cuda if amp is None else amp
        self.amp_dtype = amp_dtype(self.device)
        self.channels_last = self.cuda if channels_last is None else channels_last
        # float16 needs loss scaling against underflow; bfloat16 and float32 do not
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.amp and self.amp_dtype == torch.float16
        )
        self.check_every = max(1, check_every or (CUDA_CHECK_EVERY if self.cuda else 1))
        self._finite: torch.Tensor | None = None  # all losses since the last check finite (device)
        self._unchecked_from = step  # first step not yet checked

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
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
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
        finite = torch.isfinite(losses["loss"].detach())
        if self.check_every == 1:
            if not finite:  # the weights have not changed yet
                raise FloatingPointError(
                    f"non-finite loss ({float(losses['loss'].detach())}) at step {self.step + 1}: "
                    "lower train.lr or set train.grad_clip_norm"
                )
        else:
            self._finite = finite if self._finite is None else self._finite & finite
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses["loss"]).backward()
        if t.grad_clip_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        if self.step - self._unchecked_from >= self.check_every:
            self.check()
        return {k: v.detach() for k, v in losses.items()}

    def check(self) -> None:
        """Read back whether every loss since the last check was finite (one host sync);
        FloatingPointError naming the steps if not."""
        finite, first = self._finite, self._unchecked_from
        self._finite, self._unchecked_from = None, self.step
        if finite is not None and dist.is_available() and dist.is_initialized():
            # every rank stops together: one rank's NaN must not leave the others waiting in
            # the next all-reduce of gradients
            flag = finite.to(torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = flag.bool()
        if finite is not None and not bool(finite):
            raise FloatingPointError(
                f"non-finite loss between steps {first + 1} and {self.step}: lower train.lr or set "
                "train.grad_clip_norm"
            )
