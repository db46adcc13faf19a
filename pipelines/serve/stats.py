"""Serving numbers: each replica counts its requests and batches (`Recorder`) and pushes them
(`Reporter`) to one `StatsBoard` actor, which `rayssd serve` reads for MLflow (`flat_metrics`)
and ``GET /stats`` returns.
"""

import asyncio
import logging
import math
import time
import uuid
from collections import Counter, deque
from typing import Any

import numpy as np
import ray

log = logging.getLogger(__name__)

PUSH_INTERVAL_S = 0.5  # replicas send their numbers to the board this often
KEEP_SAMPLES_S = 600.0  # the board keeps latency and batch samples this long


class Recorder:
    """One replica's counts since it started, and the samples not yet sent to the board."""

    def __init__(self) -> None:
        self.key = uuid.uuid4().hex
        self.counts: Counter[str] = Counter()
        self.latencies: list[tuple[float, float]] = []  # (end time s, seconds) of answered requests
        self.batches: list[tuple[float, int]] = []  # (time s, size)

    def request(self, status: int, seconds: float) -> None:
        self.counts["requests"] += 1
        self.counts[f"status:{status}"] += 1
        if status == 200:  # a refusal's latency says nothing about detection
            self.latencies.append((time.time(), seconds))

    def batch(self, size: int) -> None:
        self.counts[f"batch_size:{size}"] += 1
        self.batches.append((time.time(), size))

    def take(self) -> dict[str, Any]:
        snapshot = {"counts": dict(self.counts), "latencies": self.latencies, "batches": self.batches}
        self.latencies, self.batches = [], []
        return snapshot


class Reporter:
    """Sends a replica's `Recorder` to the board every `PUSH_INTERVAL_S` from its event loop."""

    def __init__(self, board: Any) -> None:
        self.board = board
        self.recorder = Recorder()
        self._task: asyncio.Task | None = None
        self._sent: dict[str, int] = {}

    def ensure_running(self) -> None:
        """Start the sending task (call from the replica's event loop)."""
        if self._task is None and self.board is not None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(PUSH_INTERVAL_S)
            if self.recorder.counts == self._sent:
                continue
            snapshot = self.recorder.take()
            try:
                await self.board.push.remote(self.recorder.key, snapshot)
            except ray.exceptions.RayActorError:
                log.warning("serving stats board is gone; this replica stops reporting")
                return
            self._sent = dict(snapshot["counts"])


class StatsBoard:
    """Ray actor: the latest counts of every replica (kept after it dies) and recent samples."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.counts: dict[str, dict[str, int]] = {}
        self.pushes = 0  # samples carry the number of the push that brought them
        self.latencies: deque[tuple[int, float, float]] = deque(maxlen=200_000)  # (push, time, s)
        self.batches: deque[tuple[int, float, int]] = deque(maxlen=200_000)  # (push, time, size)

    def push(self, replica: str, snapshot: dict[str, Any]) -> None:
        self.pushes += 1
        self.counts[replica] = snapshot["counts"]
        self.latencies.extend((self.pushes, t, x) for t, x in snapshot["latencies"])
        self.batches.extend((self.pushes, t, n) for t, n in snapshot["batches"])
        horizon = time.time() - KEEP_SAMPLES_S
        for samples in (self.latencies, self.batches):
            while samples and samples[0][1] < horizon:
                samples.popleft()

    def summary(self, window_s: float | None = None, after: list | None = None) -> dict[str, Any]:
        """Totals since deployment, plus latency (answered requests) and batch sizes of the
        samples that arrived since `after` (the ``cursor`` of an earlier summary: each sample
        is then reported once), else that ended in the last `window_s` seconds, else all kept.
        """
        now = time.time()
        totals: Counter[str] = Counter()
        for counts in self.counts.values():
            totals.update(counts)
        status = {k.split(":", 1)[1]: v for k, v in sorted(totals.items()) if k.startswith("status:")}
        sizes = {int(k.split(":", 1)[1]): v for k, v in totals.items() if k.startswith("batch_size:")}
        if after is not None:
            push, since = after
            window_s = now - since
            latencies = [x for p, _, x in self.latencies if p > push]
            recent = [n for p, _, n in self.batches if p > push]
        else:
            since = now - window_s if window_s else -math.inf
            latencies = [x for _, t, x in self.latencies if t >= since]
            recent = [n for _, t, n in self.batches if t >= since]
        ms = np.array(latencies) * 1000.0
        return {
            "requests": totals["requests"],
            "errors": sum(v for k, v in status.items() if int(k) >= 400),
            "status": status,
            "batches": sum(sizes.values()),
            "batch_sizes": {str(k): sizes[k] for k in sorted(sizes)},
            "window_s": window_s,
            "answered": len(ms),
            "latency_ms": {f"p{q}": float(np.percentile(ms, q)) for q in (50, 95, 99)} if len(ms) else None,
            "batch_size_mean": float(np.mean(recent)) if recent else None,
            "batch_size_max": max(recent) if recent else None,
            "cursor": [self.pushes, now],
        }


def flat_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """`StatsBoard.summary` as MLflow metrics: ``requests``, ``errors``, ``status_<code>``,
    ``latency_p50_ms`` .. ``latency_p99_ms``, ``requests_per_s``, ``batch_size_mean`` / ``_max``."""
    metrics = {"requests": summary["requests"], "errors": summary["errors"], "batches": summary["batches"]}
    metrics.update({f"status_{code}": n for code, n in summary["status"].items()})
    for name, value in (summary["latency_ms"] or {}).items():
        metrics[f"latency_{name}_ms"] = value
    if summary["window_s"]:
        metrics["requests_per_s"] = summary["answered"] / summary["window_s"]
    for key in ("batch_size_mean", "batch_size_max"):
        if summary[key] is not None:
            metrics[key] = summary[key]
    return metrics
