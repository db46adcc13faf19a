"""Running a job as a user does, in its own process, and stopping it as docker, Kubernetes
and systemd do: its merged output read as it comes, SIGTERM once a line appears, and the
processes it started looked up in /proc (no psutil)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
STOP_WITHIN_S = 60  # a generous bound on 2 shared cores; measured ~9 s for serve


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) of every process, from /proc."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            found[int(entry)] = (int(fields[1]), fields[0])
    return found


def descendants(pid: int) -> set[int]:
    """Every process below `pid`, now."""
    table, found, todo = processes(), set(), [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, _) in table.items():
            if ppid == parent and child not in found:
                found.add(child)
                todo.append(child)
    return found


def running(pids: set[int]) -> set[int]:
    """Those of `pids` that still run (zombies do not count)."""
    table = processes()
    return {p for p in pids if p in table and table[p][1] != "Z"}


def command_line(pid: int) -> str:
    """The command line of `pid` ("" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:  # gone meanwhile
        return ""


def still_running(pids: set[int]) -> list[str]:
    """The command lines of those of `pids` that still run (zombies do not count)."""
    return [command_line(p)[:120] for p in running(pids)]


class JobOutput:
    """A subprocess's merged output, collected by a thread (so its pipe never fills)."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, process: subprocess.Popen, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(text in line for line in self.lines):
            assert process.poll() is None, "".join(self.lines)
            assert time.monotonic() < deadline, f"no {text!r} in:\n{''.join(self.lines)}"
            time.sleep(0.2)

    @property
    def text(self) -> str:
        self._thread.join(timeout=10)
        return "".join(self.lines)


def start_job(
    argv: list[str], tmp_path: Path, cwd: Path = PROJECT, **env: str | None
) -> tuple[subprocess.Popen, JobOutput, str]:
    """`python -m ARGV` with its own sqlite MLflow store in `tmp_path` (returned as a URI) and
    `env` on top of this process's environment (None: unset)."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    merged = {**os.environ, "MLFLOW_TRACKING_URI": store, "PYTHONUNBUFFERED": "1", **env}
    merged["PYTHONPATH"] = str(PROJECT)  # from any working directory
    env = {name: value for name, value in merged.items() if value is not None}
    process = subprocess.Popen(
        [sys.executable, "-m", *argv], cwd=cwd, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    return process, JobOutput(process), store


def terminate_once(
    process: subprocess.Popen, output: JobOutput, text: str, before: Callable[[], None] = lambda: None
) -> float:
    """Once `text` is printed (and `before` has run), SIGTERM; the seconds until the process
    ended. The process is killed if anything fails on the way."""
    try:
        output.wait_for(text, process, timeout_s=240)
        before()
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=STOP_WITHIN_S)
        return time.monotonic() - start
    finally:
        if process.poll() is None:
            process.kill()


def assert_all_end(pids: set[int], within_s: float = 15.0) -> None:
    """Every one of `pids` ends within `within_s` (a local Ray's processes follow their parent
    by a few seconds)."""
    deadline = time.monotonic() + within_s
    while still_running(pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not still_running(pids), still_running(pids)
