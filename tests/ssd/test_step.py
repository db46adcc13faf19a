import copy

import pytest
import torch

from ssd import config as C
from ssd.anchors import default_boxes
from ssd.loss import multibox_loss
from ssd.matching import encode_targets_batch
from ssd.model import build_ssd
from ssd.optim import build_optimizer, learning_rate
from ssd.step import TrainStep

NUM_CLASSES = 4


def _setup(overrides=(), seed=0):
    cfg = C.override(C.preset("tiny"), [f"model.num_classes={NUM_CLASSES}", *overrides])
    torch.manual_seed(seed)
    model = build_ssd(cfg).train()
    g = torch.Generator().manual_seed(seed)
    size = cfg.model.image_size
    images = torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8, generator=g)
    boxes = [torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.4, 0.3, 0.9, 0.8]]) for _ in range(4)]
    labels = [torch.tensor([1, NUM_CLASSES - 1]) for _ in range(4)]
    cls_t, loc_t = encode_targets_batch(boxes, labels, default_boxes(cfg))
    return cfg, model, images, cls_t.to(torch.int16), loc_t


def _reference_update(model, cfg, images, cls_t, loc_t, lr):
    """The step written out by hand: forward, loss, backward, SGD at `lr`."""
    optimizer = build_optimizer(model, cfg.train)
    for group in optimizer.param_groups:
        group["lr"] = lr
    t = cfg.train
    losses = multibox_loss(*model(images), cls_t.long(), loc_t, t.neg_pos_ratio, t.loc_weight)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    optimizer.step()
    return losses


@pytest.mark.parametrize("overrides", [(), ("train.neg_pos_ratio=1", "train.loc_weight=2.5")])
def test_a_step_equals_the_hand_written_update_with_the_configs_loss_weights(overrides):
    cfg, model, images, cls_t, loc_t = _setup(overrides)
    twin = copy.deepcopy(model)
    step = TrainStep(model, build_optimizer(model, cfg.train), cfg.train, total_steps=10, steps_per_epoch=5)
    lr = step.lr
    losses = step(images, cls_t, loc_t)
    expected = _reference_update(twin, cfg, images, cls_t, loc_t, lr)
    assert step.step == 1
    assert float(losses["loss"]) == pytest.approx(float(expected["loss"].detach()), rel=1e-6)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_the_learning_rate_follows_the_schedule_from_the_resumed_step():
    cfg, model, images, cls_t, loc_t = _setup(["train.warmup_epochs=1"])
    optimizer = build_optimizer(model, cfg.train)
    step = TrainStep(model, optimizer, cfg.train, total_steps=20, steps_per_epoch=10, step=3)
    step(images, cls_t, loc_t)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(learning_rate(cfg.train, 3, 20, 10))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.train.lr * 4 / 10)  # warm-up: step 4 of 10
    assert step.step == 4


def test_a_non_finite_loss_raises_before_the_weights_change():
    cfg, model, images, cls_t, loc_t = _setup()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    step = TrainStep(model, build_optimizer(model, cfg.train), cfg.train, total_steps=10, steps_per_epoch=5)
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* at step 1: lower train.lr"):
        step(images, cls_t, torch.full_like(loc_t, float("nan")))
    for name, param in model.named_parameters():  # (BatchNorm statistics move in any forward)
        torch.testing.assert_close(param.detach(), before[name], msg=name)
    assert step.step == 0


def test_clipping_bounds_the_gradient_norm():
    cfg, model, images, cls_t, loc_t = _setup(["train.grad_clip_norm=0.01"])
    step = TrainStep(model, build_optimizer(model, cfg.train), cfg.train, total_steps=10, steps_per_epoch=5)
    step(images, cls_t, loc_t)
    norm = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])
    )
    assert float(norm) == pytest.approx(0.01, rel=1e-3)


def test_checked_every_few_steps_a_non_finite_loss_is_caught_at_the_next_check():
    cfg, model, images, cls_t, loc_t = _setup()
    nan = torch.full_like(loc_t, float("nan"))
    step = TrainStep(
        model, build_optimizer(model, cfg.train), cfg.train, total_steps=10, steps_per_epoch=5, check_every=3
    )
    step(images, cls_t, loc_t)
    step(images, cls_t, nan)  # no host sync, so no raise yet
    with pytest.raises(FloatingPointError, match=r"non-finite loss between steps 1 and 3"):
        step(images, cls_t, loc_t)

    cfg, model, images, cls_t, loc_t = _setup()
    step = TrainStep(
        model, build_optimizer(model, cfg.train), cfg.train, total_steps=10, steps_per_epoch=5, check_every=3
    )
    for _ in range(4):  # checked after step 3; step 4 waits for the next check
        step(images, cls_t, loc_t)
    step.check()  # the end of an epoch: steps 4 was finite
    step(images, cls_t, nan)
    with pytest.raises(FloatingPointError, match=r"between steps 5 and 5"):
        step.check()


def test_amp_on_the_cpu_runs_in_bfloat16_without_a_scaler_and_near_float32():
    cfg, model, images, cls_t, loc_t = _setup()
    twin = copy.deepcopy(model)
    amp = TrainStep(
        model, build_optimizer(model, cfg.train), cfg.train, total_steps=10, steps_per_epoch=5, amp=True
    )
    full = TrainStep(twin, build_optimizer(twin, cfg.train), cfg.train, total_steps=10, steps_per_epoch=5)
    assert amp.amp_dtype == torch.bfloat16 and not amp.scaler.is_enabled()
    low, high = amp(images, cls_t, loc_t), full(images, cls_t, loc_t)
    assert float(low["loss"]) == pytest.approx(float(high["loss"]), rel=0.05)
    assert low["loss"].dtype == torch.float32  # the loss itself is float32
