"""`rayssd tune`'s search specs: parsed, never evaluated, checked against the config before any
trial runs, and applied to a trial's config as `--set` would."""

from __future__ import annotations

import pytest
from ray import tune

from pipelines.train.search import build_space, default_space, parse_spec, trial_config
from ssd import config as C

CFG = C.preset("tiny")


def test_each_spec_becomes_its_tune_domain():
    key, lr = parse_spec("train.lr=loguniform(1e-4,1e-2)")
    assert key == "train.lr" and isinstance(lr, tune.search.sample.Float)
    assert all(1e-4 <= lr.sample() <= 1e-2 for _ in range(50))
    assert isinstance(parse_spec("train.loc_weight=uniform(0.5, 2)")[1], tune.search.sample.Float)
    batch = parse_spec("train.batch_size=choice(8,16,32)")[1]
    assert {batch.sample() for _ in range(200)} == {8, 16, 32}
    assert {parse_spec("data.seed=randint(0,3)")[1].sample() for _ in range(200)} == {0, 1, 2}
    assert parse_spec("train.optimizer=grid(sgd,adamw)")[1] == {"grid_search": ["sgd", "adamw"]}
    assert parse_spec("train.epochs=4") == ("train.epochs", 4)


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("train.lr", "expected KEY=SPEC"),
        ("train.lr=loguniform(0,1)", "low > 0"),
        ("train.lr=uniform(2,1)", "low < high"),
        ("train.lr=uniform(a,b)", "two numbers"),
        ("train.batch_size=randint(1.5,4)", "integers"),
        ("train.batch_size=choice()", "at least one value"),
        ("train.nope=uniform(0,1)", "train.nope"),
        ("train.lr=uniform(-1,-0.5)", "train.lr"),  # the config refuses a negative rate
        ("train.optimizer=grid(sgd,rmsprop)", "train.optimizer"),  # every grid value is checked
        ("__import__('os')=1", "__import__"),  # a key, not code
    ],
)
def test_a_bad_spec_is_refused_naming_it(spec, needle):
    with pytest.raises(ValueError, match="--search") as refused:
        build_space(CFG, [spec])
    assert needle in str(refused.value)


def test_the_default_space_surrounds_the_presets_own_settings_and_every_sample_is_a_valid_config():
    space, shown = build_space(CFG, [])
    assert (
        set(space)
        == set(default_space(CFG))
        == {
            "train.lr",
            "train.loc_weight",
            "train.neg_pos_ratio",
            "train.warmup_epochs",
        }
    )
    assert shown["train.loc_weight"] == "uniform(0.5,2.0)"
    for _ in range(20):
        params = {k: v.sample() for k, v in space.items()}
        cfg = trial_config(CFG, params)
        assert CFG.train.lr / 3 * 0.999 <= cfg.train.lr <= CFG.train.lr * 3 * 1.001
        assert cfg.train.neg_pos_ratio in (2, 3, 4) and cfg.model == CFG.model
    with pytest.raises(ValueError, match="twice"):
        build_space(CFG, ["train.lr=uniform(0.001,0.01)", "train.lr=uniform(0.001,0.01)"])
