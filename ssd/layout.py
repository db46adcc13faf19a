"""Which memory layout a model runs fastest in on this machine: channels-last or contiguous.

Measured, not assumed: oneDNN's channels-last convolutions are 24-39 % faster on an AVX-512
Xeon and about 20 % slower on an AVX2-only AMD EPYC (Zen 3), for the same model and torch.
So on the CPU a short probe times a few steps of the model in both layouts, interleaved,
and keeps the faster; the answer is cached per machine (CPU model, ISA, the oneDNN/ATen ISA
caps in force, torch version, threads) and per model shape, batch and mode, in
``$RAYSSD_CACHE_DIR`` (default ``~/.cache/rayssd``) ``/layouts.json``, so a machine pays
for it once. ``model.memory_format`` overrides it (``channels_last`` | ``contiguous``);
CUDA always takes channels-last (cuDNN's tensor-core convolutions want it).

Pure torch: training (`pipelines.train.loop`), the detector of labelling and serving
(`ssd.detector.Detector`) and `benchmarks/bench_core` all decide here.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ssd import config as C

try:
    import fcntl
except ImportError:  # Windows: probes may then overlap
    fcntl = None

CACHE_ENV = "RAYSSD_CACHE_DIR"
ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")  # variables that cap the ISA torch uses
PROBE_ROUNDS = 3  # timed steps per layout, interleaved, after one warm-up each
PROBE_MAX_BATCH = 4  # the probe's batch, at most: the layout's effect shows by then
MARGIN = 0.03  # channels-last must be this much faster to be chosen (it costs a conversion)


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def cpu_isa() -> str:
    """The widest vector ISA the CPU has: AVX-512 or AVX2, + AMX."""
    try:
        flags = next(
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
        ).split()
    except (OSError, StopIteration):
        return "?"
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return isa + (" + AMX" if "amx_tile" in flags else "")


def machine_key() -> str:
    """What the probe's answer depends on besides the model: CPU, ISA and the caps on it that
    oneDNN and ATen honour (`ONEDNN_MAX_CPU_ISA`, `ATEN_CPU_CAPABILITY`), torch, threads."""
    caps = ",".join(f"{v}={os.environ[v]}" for v in ISA_CAPS if v in os.environ)
    return (
        f"{cpu_name()} ({cpu_isa()}{'; ' + caps if caps else ''}) torch {torch.__version__} "
        f"{torch.get_num_threads()} threads"
    )


def _model_key(cfg: C.Config, batch: int, training: bool) -> str:
    m = cfg.model
    width = f" w{m.width}" if m.backbone == "tiny" else ""
    mode = "train" if training else "infer"
    boxes = cfg.anchors.num_default_boxes()  # the heads' widths follow the anchors
    return f"{m.backbone}{width} {m.image_size}px {m.num_classes} classes {boxes} boxes batch {batch} {mode}"


def cache_key(cfg: C.Config, batch: int, training: bool) -> str:
    """The cache entry of this machine and `cfg`'s model run at `batch` (capped at
    `PROBE_MAX_BATCH`, as the probe runs it) in training or inference."""
    return f"{machine_key()} | {_model_key(cfg, _probe_batch(batch), training)}"


def _probe_batch(batch: int) -> int:
    return max(1, min(batch, PROBE_MAX_BATCH))


def channels_last(
    model: nn.Module,
    cfg: C.Config,
    *,
    batch: int,
    training: bool,
    device: torch.device | str = "cpu",
    cache_dir: str | os.PathLike | None = None,
) -> bool:
    """Whether `model` (built from `cfg`) should run channels-last on `device`.

    `batch` is the batch it will run at (the probe uses at most `PROBE_MAX_BATCH`);
    `training` times forward + backward in train mode, else forward under inference mode.
    `model` is not changed: the probe runs on copies. Costs a few steps once per machine and
    model shape (cached); nothing on CUDA or when `cfg.model.memory_format` is set.
    """
    chosen = cfg.model.memory_format
    if chosen != "auto":
        return chosen == "channels_last"
    if torch.device(device).type == "cuda":
        return True
    key = cache_key(cfg, batch, training)
    path = _cache_file(cache_dir)
    # One probe at a time per cache: a process that starts beside another (two labelling
    # actors, two training ranks) waits for its answer instead of timing under its load.
    with _locked(path):
        cached = _read(path).get(key) if path else None
        if isinstance(cached, dict) and isinstance(cached.get("channels_last"), bool):
            return cached["channels_last"]
        times = probe(model, cfg, batch=_probe_batch(batch), training=training)
        faster = times["channels_last"] < times["contiguous"] * (1 - MARGIN)
        if path:
            _write(path, key, {"channels_last": faster, **{f"{k}_s": round(v, 5) for k, v in times.items()}})
    return faster


def probe(model: nn.Module, cfg: C.Config, *, batch: int, training: bool) -> dict[str, float]:
    """Seconds per step of copies of `model` in each layout: the best of `PROBE_ROUNDS`
    interleaved rounds after a warm-up (interleaving shares out any load from elsewhere).
    Images arrive contiguous, as the callers get them; a training step lays them out first,
    as `ssd.step.TrainStep` does, and inference leaves that to the first convolution."""
    size = cfg.model.image_size
    generator = torch.Generator().manual_seed(0)  # the caller's random stream stays as it was
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)
    formats = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    copies = {
        name: copy.deepcopy(model).cpu().to(memory_format=memory_format).train(training)
        for name, memory_format in formats.items()
    }
    best = dict.fromkeys(formats, float("inf"))
    for round_ in range(PROBE_ROUNDS + 1):
        for name, copied in copies.items():
            start = time.perf_counter()
            _step(copied, images, formats[name], training)
            if round_:  # round 0 warms up (oneDNN builds its kernels)
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def _step(model: nn.Module, images: torch.Tensor, memory_format: torch.memory_format, training: bool) -> None:
    if training:
        cls_logits, loc_preds = model(images.contiguous(memory_format=memory_format))
        (cls_logits.float().mean() + loc_preds.float().mean()).backward()
        model.zero_grad(set_to_none=True)
    else:
        with torch.inference_mode():
            model(images)


def _cache_file(cache_dir: str | os.PathLike | None) -> Path | None:
    """Where answers are kept; None (probe every time) where no home directory is known."""
    try:
        root = Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rayssd")
    except RuntimeError:  # no $HOME and no passwd entry, as in some containers
        return None
    return root / "layouts.json"


@contextlib.contextmanager
def _locked(path: Path | None) -> Iterator[None]:
    """An exclusive lock on `path`'s lock file where the platform and the folder allow one."""
    handle = None
    if path is not None and fcntl is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(path.with_suffix(".lock"), "a")  # noqa: SIM115 (closed below)
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            pass  # a read-only or odd folder: go on unlocked
    try:
        yield
    finally:
        if handle is not None:
            handle.close()  # releases the lock


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # none yet, unreadable or half-written by someone else: probe again
    return data if isinstance(data, dict) else {}


def _write(path: Path, key: str, value: dict) -> None:
    """Add one answer, atomically (a reader never sees half a file); readable by all, so a
    shared `RAYSSD_CACHE_DIR` serves every user. A cache that cannot be written costs only
    a probe next time."""
    data = _read(path)
    data[key] = value
    temporary = None
    try:
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
            temporary = f.name
            json.dump(data, f, indent=1, sort_keys=True)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except OSError:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
