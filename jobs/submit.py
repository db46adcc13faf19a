"""`rayssd submit VERB ARGS...`: run a rayssd job on a Ray cluster through its Jobs API.

    rayssd submit [--address http://HEAD:8265] [--no-wait] [--pip] VERB [ARGS ...]
    python -m jobs.submit ...

Sends ``python -m jobs.VERB ARGS`` with the runtime environment of `runtime_env.yaml` (this
checkout as the working directory), follows the job's log and exits with the job's
outcome: 0 when it SUCCEEDED, 1 when it FAILED or was STOPPED. The same job by hand:

    ray job submit --address http://HEAD:8265 --runtime-env runtime_env.yaml --working-dir . \\
        -- python -m jobs.VERB ARGS
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from jobs.options import run_job

DESCRIPTION = """Run a rayssd job (train, label, evaluate, serve, prepare, quickstart, data) on a
Ray cluster through its Jobs API: sends `python -m jobs.VERB ARGS` with runtime_env.yaml's
environment (this checkout as the working directory), follows the job's log, and exits 0
when the job SUCCEEDED, 1 when it FAILED or was stopped. Paths in ARGS are read on the
cluster. $MLFLOW_TRACKING_URI is passed on to the job; without it the job's MLflow records
stay in the job's own working directory on the cluster."""

VERBS = ("train", "label", "evaluate", "serve", "prepare", "quickstart", "data")
PROJECT = Path(__file__).resolve().parents[1]
RUNTIME_ENV_FILE = PROJECT / "runtime_env.yaml"
DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # the head's dashboard, where the Jobs API listens
FINAL = ("SUCCEEDED", "FAILED", "STOPPED")
FORWARDED_ENV = ("MLFLOW_TRACKING_URI",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help=f"the cluster's dashboard URL (default: $RAY_ADDRESS, else {DEFAULT_ADDRESS})",
    )
    parser.add_argument(
        "--no-wait", action="store_true", help="print the job id and return without following the log"
    )
    parser.add_argument(
        "--pip",
        action="store_true",
        help="install pyproject.toml's dependencies in the job's environment (for nodes that lack them)",
    )
    parser.add_argument("--job-id", help="submission id (default: rayssd-VERB-YYYYmmdd-HHMMSS)")
    parser.add_argument("verb", choices=VERBS, metavar="VERB", help=f"the job: {', '.join(VERBS)}")
    parser.add_argument("job_args", nargs=argparse.REMAINDER, metavar="ARGS", help="the job's own arguments")


def dashboard_url(address: str | None) -> str:
    """The Jobs API URL for `address`: http(s)://HOST:PORT as given; host:port gets http://."""
    address = address or DEFAULT_ADDRESS
    if address.startswith("ray://") or address == "auto":
        raise ValueError(
            f"--address {address}: submitting needs the head's dashboard URL, e.g. {DEFAULT_ADDRESS} "
            "(ray://, auto and GCS addresses are for connecting a driver)"
        )
    return address if address.startswith(("http://", "https://")) else f"http://{address}"


def runtime_env(pip: bool = False, env: dict[str, str] | None = None) -> dict[str, Any]:
    """runtime_env.yaml with its working directory made absolute, the forwarded environment
    variables and, with `pip`, the project's dependencies."""
    if not RUNTIME_ENV_FILE.is_file():
        raise FileNotFoundError(f"{RUNTIME_ENV_FILE} is missing: rayssd submit runs from a rayssd checkout")
    spec = yaml.safe_load(RUNTIME_ENV_FILE.read_text()) or {}
    spec["working_dir"] = str((PROJECT / spec.get("working_dir", ".")).resolve())
    env = os.environ if env is None else env
    spec["env_vars"] = {
        **spec.get("env_vars", {}),
        **{key: env[key] for key in FORWARDED_ENV if env.get(key)},
    }
    if pip:
        spec["pip"] = project_dependencies()
    return spec


def project_dependencies() -> list[str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise ValueError("--pip reads pyproject.toml with tomllib: use Python >= 3.11") from None
    with open(PROJECT / "pyproject.toml", "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def entrypoint(verb: str, job_args: list[str]) -> str:
    if verb not in VERBS:
        raise ValueError(f"unknown job {verb!r}; expected one of {', '.join(VERBS)}")
    args = job_args[1:] if job_args[:1] == ["--"] else job_args
    return shlex.join(["python", "-m", f"jobs.{verb}", *args])


def use_local_token() -> None:
    """Send the local Ray token (as `ray` commands do once RAY_AUTH_MODE=token): clusters
    started by Ray >= 2.5x require it by default. An explicit RAY_AUTH_MODE is left alone."""
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"
        if "ray._raylet" in sys.modules:  # Ray has read its configuration in this process already:
            sys.modules["ray._raylet"].Config.initialize("")  # read it again, as Ray's own CLI does


def run(args: argparse.Namespace) -> int:
    use_local_token()  # before Ray reads its configuration
    from ray.job_submission import JobSubmissionClient

    quiet = (
        "ray._private.runtime_env",
        "ray.dashboard.modules.dashboard_sdk",
        "ray.dashboard.modules.job.sdk",
    )
    for name in quiet:
        logging.getLogger(name).setLevel(logging.ERROR)  # one line per skipped file otherwise
    url = dashboard_url(args.address)
    env = runtime_env(pip=args.pip)
    command = entrypoint(args.verb, args.job_args)
    if "MLFLOW_TRACKING_URI" not in env["env_vars"]:
        print(
            "note: $MLFLOW_TRACKING_URI is not set: the job's MLflow records go to sqlite:///mlflow.db "
            "in its working directory on the cluster",
            file=sys.stderr,
        )
    try:
        client = JobSubmissionClient(url)
    except Exception as exc:  # connection refused, not a Ray dashboard, ...
        raise ValueError(f"no Ray Jobs API at {url}: {exc}") from None
    job_id = client.submit_job(
        entrypoint=command,
        runtime_env=env,
        submission_id=args.job_id or time.strftime(f"rayssd-{args.verb}-%Y%m%d-%H%M%S"),
        metadata={"rayssd.verb": args.verb},
    )
    print(f"submitted {job_id} to {url}: {command}", flush=True)
    if args.no_wait:
        print(f"follow it with: ray job logs --address {url} --follow {job_id}")
        return 0
    try:
        asyncio.run(_follow(client, job_id))
        status = _wait_final(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; {job_id} goes on (stop it: ray job stop --address {url} {job_id})")
        return 130
    info = client.get_job_info(job_id)
    print(
        f"job {job_id}: {status}" + (f" ({info.message})" if status != "SUCCEEDED" and info.message else "")
    )
    return 0 if status == "SUCCEEDED" else 1


async def _follow(client: Any, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def _wait_final(client: Any, job_id: str, timeout_s: float = 60.0) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in FINAL or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> None:
    run_job("submit", DESCRIPTION, add_arguments, run, argv)


if __name__ == "__main__":
    main()
