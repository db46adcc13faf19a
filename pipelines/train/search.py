"""Search spaces for `rayssd tune`: ``KEY=SPEC`` strings → Ray Tune domains, and a default space
per preset.

A spec is one of ``uniform(a,b)``, ``loguniform(a,b)``, ``randint(a,b)`` (integers a..b-1),
``choice(v1,v2,...)``, ``grid(v1,v2,...)`` (every value in turn: Tune's grid search, so each
sample of the other keys runs once per value) or a plain value (fixed for every trial). KEY is
a config field as ``--set`` takes it (``train.lr``); each sampled value is applied with
`ssd.config.override`, so a value the config refuses fails before any trial runs, naming the
key. Specs are parsed, never
evaluated: numbers with ``float``, choice values with ``yaml.safe_load``.
"""

from __future__ import annotations

import re
from typing import Any

from ssd import config as C

_SPEC = re.compile(r"^(?P<kind>uniform|loguniform|randint|choice|grid)\((?P<args>.*)\)$")


def parse_spec(text: str) -> tuple[str, Any]:
    """``KEY=SPEC`` → (key, a Ray Tune domain or a fixed value); ValueError naming the spec."""
    import yaml
    from ray import tune

    key, sep, spec = text.partition("=")
    key, spec = key.strip(), spec.strip()
    if not sep or not key or not spec:
        raise ValueError(f"--search {text!r}: expected KEY=SPEC, e.g. train.lr=loguniform(1e-4,1e-2)")
    match = _SPEC.match(spec)
    if match is None:
        try:
            return key, yaml.safe_load(spec)
        except yaml.YAMLError as exc:
            raise ValueError(f"--search {text!r}: {spec!r} is not a value or a spec") from exc
    kind, args = match["kind"], [a.strip() for a in match["args"].split(",") if a.strip()]
    if kind in ("choice", "grid"):
        if not args:
            raise ValueError(f"--search {text!r}: {kind}() needs at least one value")
        values = [yaml.safe_load(a) for a in args]
        return key, tune.choice(values) if kind == "choice" else tune.grid_search(values)
    if len(args) != 2:
        raise ValueError(f"--search {text!r}: {kind}() takes two numbers, low and high")
    try:
        low, high = (float(a) for a in args)
    except ValueError:
        raise ValueError(f"--search {text!r}: {kind}() takes two numbers, got {args}") from None
    if not low < high or (kind == "loguniform" and low <= 0):
        positive = " and low > 0" if kind == "loguniform" else ""
        raise ValueError(f"--search {text!r}: expected low < high{positive}")
    if kind == "uniform":
        return key, tune.uniform(low, high)
    if kind == "loguniform":
        return key, tune.loguniform(low, high)
    if not (low.is_integer() and high.is_integer()):
        raise ValueError(f"--search {text!r}: randint() takes integers")
    return key, tune.randint(int(low), int(high))


def default_space(cfg: C.Config) -> dict[str, str]:
    """The specs searched when none are given: what the paper picks by hand around the
    preset's own settings — learning rate, the loss weight α, the negative:positive ratio and
    the warm-up."""
    t = cfg.train
    return {
        "train.lr": f"loguniform({t.lr / 3:.3g},{t.lr * 3:.3g})",
        "train.loc_weight": "uniform(0.5,2.0)",
        "train.neg_pos_ratio": "choice(2,3,4)",
        "train.warmup_epochs": f"choice(0,{max(1.0, t.warmup_epochs):g})",
    }


def build_space(cfg: C.Config, specs: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """(the Tune param space {key: domain or value}, the specs as given {key: spec}); the
    preset's default space when `specs` is empty. Every key is checked against the config by
    applying a sample of its domain."""
    texts = [f"{k}={v}" for k, v in default_space(cfg).items()] if not specs else list(specs)
    space, shown = {}, {}
    for text in texts:
        key, domain = parse_spec(text)
        if key in space:
            raise ValueError(f"--search names {key} twice")
        if isinstance(domain, dict) and "grid_search" in domain:
            samples = domain["grid_search"]
        else:
            samples = [domain.sample() if hasattr(domain, "sample") else domain]
        for sample in samples:
            try:
                C.override(cfg, [f"{key}={_as_override(sample)}"])
            except (ValueError, KeyError) as exc:
                raise ValueError(f"--search {text!r}: {exc}") from None
        space[key], shown[key] = domain, text.partition("=")[2].strip()
    return space, shown


def trial_config(cfg: C.Config, params: dict[str, Any]) -> C.Config:
    """The preset's config with one trial's sampled values."""
    return C.override(cfg, [f"{key}={_as_override(value)}" for key, value in sorted(params.items())])


def _as_override(value: Any) -> str:
    """A sampled value as `ssd.config.override` reads it (numpy scalars as Python numbers)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return repr(value)
    return str(value)
