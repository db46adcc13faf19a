"""Live training progress: workers post to a small named actor, the driver polls and prints.

Ray Train V2 streams nothing back to the driver while `fit()` runs, and its controller's
callbacks run in another process; a zero-CPU actor is the simplest shared place. Rank 0
posts a snapshot every few steps (fire-and-forget, so training never waits on it); every
rank registers where it runs (node, pid) and, at each epoch end, a digest of its
parameters, which shows DDP keeps the replicas identical.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from pipelines.common import ACTOR_NAMESPACE


class ProgressBoard:
    """Actor state: the latest snapshot, the workers, per-epoch parameter digests, events."""

    def __init__(self) -> None:
        self.snapshot: dict[str, Any] = {}
        self.workers: dict[int, dict[str, Any]] = {}
        self.digests: dict[int, dict[int, str]] = {}  # epoch -> rank -> digest
        self.events: list[dict[str, Any]] = []  # attempts, restores, evaluations, in order
        self.epochs: list[dict[str, float]] = []  # rank 0's metrics of every reported epoch, in order

    def post(self, snapshot: dict[str, Any]) -> None:
        self.snapshot = {**snapshot, "time": time.time()}

    def register(self, rank: int, info: dict[str, Any]) -> None:
        self.workers[rank] = info

    def digest(self, epoch: int, rank: int, value: str) -> None:
        self.digests.setdefault(epoch, {})[rank] = value

    def record_epoch(self, metrics: dict[str, float]) -> None:
        self.epochs.append(metrics)

    def event(self, event: dict[str, Any]) -> None:
        self.events.append({**event, "time": time.time()})

    def state(self) -> dict[str, Any]:
        return {
            "snapshot": self.snapshot,
            "workers": self.workers,
            "digests": self.digests,
            "events": self.events,
            "epochs": self.epochs,
        }


def start_board(name: str) -> Any:
    """Create (or find) the named board actor, pinned to this node (next to the driver)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    actor = ray.remote(num_cpus=0)(ProgressBoard)
    return actor.options(
        name=name, namespace=ACTOR_NAMESPACE, get_if_exists=True, scheduling_strategy=here
    ).remote()


def board_handle(name: str | None) -> Any:
    """The named board, or None when there is none (progress is optional)."""
    if not name:
        return None
    import ray

    try:
        return ray.get_actor(name, namespace=ACTOR_NAMESPACE)
    except ValueError:
        return None


class BoardClient:
    """A training worker's side of the board: fire-and-forget calls, so training never waits
    on progress; every call does nothing when there is no board."""

    def __init__(self, name: str | None) -> None:
        self.actor = board_handle(name)

    def post(self, snapshot: dict[str, Any]) -> None:
        if self.actor is not None:
            self.actor.post.remote(snapshot)

    def event(self, message: str) -> None:
        if self.actor is not None:
            self.actor.event.remote({"message": message})

    def record_epoch(self, metrics: dict[str, Any]) -> None:
        if self.actor is not None:
            self.actor.record_epoch.remote({k: v for k, v in metrics.items() if isinstance(v, (int, float))})

    def register(self, rank: int, world: int, start_epoch: int) -> None:
        """Where this rank runs: pid, node, host."""
        if self.actor is None:
            return
        import os

        import ray

        info = {
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "hostname": os.uname().nodename,
            "world_size": world,
            "start_epoch": start_epoch,
        }
        self.actor.register.remote(rank, info)

    def digest(self, epoch: int, rank: int, model: Any) -> None:
        """sha256 of every parameter's bytes: equal on all ranks when DDP keeps them in sync."""
        if self.actor is None:
            return
        import hashlib

        h = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        self.actor.digest.remote(epoch, rank, h.hexdigest()[:16])


def format_snapshot(s: dict[str, Any]) -> str:
    """One status line: epoch, step, loss, images/s, ETA."""
    if not s:
        return "starting workers..."
    eta = s.get("eta_s")
    eta_text = f"ETA {format_duration(eta)}" if eta is not None else "ETA -"
    phase = s.get("phase", "train")
    head = f"epoch {s['epoch']}/{s['epochs']}"
    if phase == "eval":
        return f"{head}  evaluating on the val split...  {eta_text}"
    return (
        f"{head}  step {s['step_in_epoch']}/{s['steps_per_epoch']}  loss {s['loss']:.3f} "
        f"(cls {s['cls_loss']:.3f} loc {s['loc_loss']:.3f})  {s['images_per_s']:.0f} img/s  "
        f"lr {s['lr']:.2e}  {eta_text}"
    )


def format_duration(seconds: float) -> str:
    """m:ss, or h:mm:ss from an hour on."""
    seconds = max(0, int(seconds))
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else (f"{seconds // 60}:{seconds % 60:02d}")
    )


class ProgressPrinter:
    """Background thread on the driver: polls the board and prints status lines. On a
    terminal the line is rewritten in place; in a log, a line every `log_every_s`.
    `on_snapshot` (say, an estimate of when a longer job ends) sees each new snapshot."""

    def __init__(
        self,
        board: Any,
        stream: TextIO | None = None,
        poll_s: float = 1.0,
        log_every_s: float = 15.0,
        quiet: bool = False,
        on_snapshot: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.board = board
        self.on_snapshot = on_snapshot  # called on this thread with every new snapshot
        self.stream = stream or sys.stdout
        self.poll_s = poll_s
        self.log_every_s = log_every_s
        self.quiet = quiet  # events (epoch lines, restores) only, no status line
        self.tty = self.stream.isatty() and not quiet
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rayssd-progress", daemon=True)
        self._seen_events = 0
        self._last_line = ""
        self._last_snapshot: dict[str, Any] = {}

    def __enter__(self) -> ProgressPrinter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._print_state(final=True)

    def _run(self) -> None:
        last_logged = 0.0
        while not self._stop.wait(self.poll_s):
            now = time.time()
            show = self.tty or now - last_logged >= self.log_every_s
            if show or self.on_snapshot is not None:
                self._print_state(show=show)
            if show:
                last_logged = now

    def _print_state(self, final: bool = False, show: bool = True) -> None:
        import ray

        try:
            state = ray.get(self.board.state.remote(), timeout=5)
        except Exception:  # the board is best effort: a missed update is not worth a traceback
            return
        if self.on_snapshot is not None and state["snapshot"] and state["snapshot"] != self._last_snapshot:
            self._last_snapshot = state["snapshot"]
            self.on_snapshot(state["snapshot"])
        events = state["events"][self._seen_events :]
        self._seen_events += len(events)
        for event in events:
            self._write_line(event["message"])
        if not show:
            return
        line = format_snapshot(state["snapshot"])
        if self.tty and not final:
            self.stream.write("\r\x1b[2K" + line)
            self.stream.flush()
        elif not final and not self.quiet and line != self._last_line:
            self._write_line(line)
        self._last_line = line

    def _write_line(self, text: str) -> None:
        prefix = "\r\x1b[2K" if self.tty else ""
        self.stream.write(prefix + text + "\n")
        self.stream.flush()
