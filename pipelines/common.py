"""What every stage shares: starting Ray, the actor namespace, quiet logs, worker memory.

Kept small on purpose: a stage (`data`, `train`, `label`, `serve`, `track`) imports this,
`data` and `track`, never another stage's internals.

Memory: glibc returns freed blocks above its mmap/trim thresholds to the kernel at once, so every
batch of targets ([B, A, 4] floats, megabytes) is page-faulted in again from zero. On two
cores that costs more than the matching itself (measured in benchmarks/bench_core.py).
Keeping such blocks in the heap removes the faults. Called once per worker process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
from typing import Any

log = logging.getLogger(__name__)

# Named actors (epoch clock, progress board, serving statistics) live here, so that the
# driver, Ray Train workers and Ray Data workers (each in their own job namespace by
# default) find the same ones.
ACTOR_NAMESPACE = "rayssd"

# A Ray we start ourselves keeps idle worker processes for a minute instead of Ray's one
# second. Beyond one worker per CPU (the trainers and named actors take those on a laptop)
# Ray kills an idle task worker after the threshold, so every epoch's data tasks would start
# a new process that imports torch again: measured 6.5 s against 2.4 s per epoch of 128
# `tiny` images on 2 cores. On a cluster started with `ray start`, set
# RAY_idle_worker_killing_time_threshold_ms=60000 there for the same effect.
LOCAL_RAY_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 60_000}

# Environment of a Ray we start ourselves (the raylet and every worker inherit it). Serve's
# HTTP proxy hands requests to the ingress over gRPC instead of as Ray actor tasks (with the
# ingress's own gRPC calls to the detector, `pipelines.serve.deployments.Ingress`): 1-client
# p50 over the direct call 15-18 ms against 19-29 ms on 2 cores (benchmarks/bench_serve).
# On a cluster started with `ray start`, set it in the nodes' environment for the same effect.
LOCAL_RAY_ENV = {"RAY_SERVE_PROXY_USE_GRPC": "1"}

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP_BYTES = 256 * 1024 * 1024


def keep_freed_memory(max_bytes: int = _KEEP_BYTES) -> bool:
    """Ask glibc to keep up to `max_bytes` of freed memory for reuse. False if not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mmap_limit = min(max_bytes, 32 * 1024 * 1024)  # glibc caps the mmap threshold at 32 MiB
        ok = (
            libc.mallopt(_M_MMAP_THRESHOLD, mmap_limit) == 1
            and libc.mallopt(_M_TRIM_THRESHOLD, max_bytes) == 1
        )
    except (OSError, AttributeError) as exc:
        log.debug("mallopt unavailable: %s", exc)
        return False
    return bool(ok)


class JobError(RuntimeError):
    """The work itself failed, not its input (a job exits with status 1 instead of 2); the
    message says what failed and what to do."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (docker stop, Kubernetes, systemd): the job stops as on Ctrl-C."""


_terminated = threading.Event()


def _raise_terminated(signum: int, frame: Any) -> None:
    _terminated.set()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated("stopped by SIGTERM")


def stop_on_sigterm() -> None:
    """Make SIGTERM stop the job as Ctrl-C does: `Terminated` (a KeyboardInterrupt) is raised in
    the main thread, so a job ends its MLflow run as KILLED, says how to resume, and its local
    Ray shuts down with it. Called by `jobs.options.call_job` and again by `start_ray`: Ray's
    own handlers, installed while it connects, print a stack dump and abort. Main thread only."""
    if threading.current_thread() is threading.main_thread() and not _terminated.is_set():
        signal.signal(signal.SIGTERM, _raise_terminated)


def was_terminated() -> bool:
    """Whether this process has received SIGTERM (its exit status is then 143)."""
    return _terminated.is_set()


def quiet_ray_data() -> None:
    """Ray Data's progress bars on a terminal; in logs, no per-operator INFO lines."""
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray").setLevel(logging.WARNING)


def start_ray(address: str | None, **init_kwargs: Any) -> bool:
    """Connect to `address` (``auto``, ``ray://host:10001``; None: a new local Ray) unless
    Ray is already up in this process, with quiet logs. Returns whether it started Ray."""
    import ray

    quiet_ray_data()
    if ray.is_initialized():
        return False
    init_kwargs.setdefault("include_dashboard", False)
    init_kwargs.setdefault("log_to_driver", False)
    init_kwargs.setdefault("logging_level", logging.WARNING)
    if address == "local" or (address is None and not os.environ.get("RAY_ADDRESS")):  # a new local Ray
        init_kwargs.setdefault("_system_config", LOCAL_RAY_SYSTEM_CONFIG)
        for name, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(name, value)  # a user's own setting wins
    ray.init(address=address, **init_kwargs)
    stop_on_sigterm()
    return True
