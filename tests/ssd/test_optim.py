import pytest
import torch

from ssd import config as C
from ssd.optim import build_optimizer, learning_rate


def train_cfg(*overrides):
    return C.override(C.preset("ssd300_vgg16"), list(overrides)).train


def test_step_schedule_warms_up_then_decays_by_gamma_at_the_milestones():
    t = train_cfg("train.lr=0.1", "train.warmup_epochs=1", "train.lr_milestones=[0.5, 0.75]")
    # 10 steps per epoch, 100 steps: warm-up over steps 0..9, x0.1 at step 50, x0.01 at 75
    assert learning_rate(t, 0, 100, 10) == pytest.approx(0.01)
    assert learning_rate(t, 9, 100, 10) == pytest.approx(0.1)
    assert learning_rate(t, 49, 100, 10) == pytest.approx(0.1)
    assert learning_rate(t, 50, 100, 10) == pytest.approx(0.01)
    assert learning_rate(t, 99, 100, 10) == pytest.approx(0.001)


def test_cosine_schedule_ends_near_zero():
    t = train_cfg("train.lr=0.2", "train.lr_schedule=cosine")
    assert learning_rate(t, 0, 100, 10) == pytest.approx(0.2)
    assert learning_rate(t, 50, 100, 10) == pytest.approx(0.1)
    assert learning_rate(t, 100, 100, 10) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(("name", "kind"), [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_optimizer_follows_the_config_and_spares_biases_from_weight_decay(name, kind):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    opt = build_optimizer(model, train_cfg(f"train.optimizer={name}", "train.weight_decay=0.01"))
    assert isinstance(opt, kind)
    decayed, spared = opt.param_groups
    assert decayed["weight_decay"] == 0.01 and len(decayed["params"]) == 1  # the conv kernel
    assert spared["weight_decay"] == 0.0 and len(spared["params"]) == 3  # conv bias, BN weight and bias
