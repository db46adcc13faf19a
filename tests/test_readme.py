"""Every command in the README's ```bash blocks is one the code accepts: `rayssd` and
`python -m jobs.*` lines parse with the real argument parsers, benchmark options exist,
`ray job submit` lines use the project's runtime_env.yaml and a job that parses, and curl
lines call routes and query parameters the endpoint has. What they do is run by the other
tests (the quickstart by test_quickstart, submit by test_submit, the rest by each job's
tests) and by CI (`./run.sh test`)."""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from jobs.cli import build_parser

PROJECT = Path(__file__).resolve().parents[1]
README = PROJECT / "README.md"
OTHER_TOOLS = {"mlflow", "ray", "kubectl", "pip", "git"}  # not ours: named, not parsed here
# variables README lines export, with the values the tools that read them accept (None: any)
EXPORTS = {"RAY_AUTH_MODE": {"token"}, "MLFLOW_TRACKING_URI": None, "RAY_ADDRESS": None}
ENDPOINT = {"/detect": {"score_threshold", "max_detections"}, "/healthz": set(), "/model": set()}


def readme_commands() -> list[str]:
    """Each command of the ```bash blocks, continuation lines joined, comments removed."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def _job_parser(module: str):
    import argparse

    job = importlib.import_module(module)
    parser = argparse.ArgumentParser(prog=module, exit_on_error=False)
    job.add_arguments(parser)
    return parser


def _check_job(argv: list[str]) -> None:
    module = argv[2]
    if module == "benchmarks" or module.startswith("benchmarks."):
        help_text = subprocess.run(
            [sys.executable, "-m", module, "--help"], cwd=PROJECT, capture_output=True, text=True, timeout=120
        ).stdout
        for option in (a.split("=")[0] for a in argv[3:] if a.startswith("--")):
            assert option in help_text, f"{module} has no {option}"
        return
    _job_parser(module).parse_args(argv[3:])


def check(command: str) -> None:
    argv = shlex.split(command)
    tool = Path(argv[0]).name
    if tool == "rayssd":
        build_parser().parse_args(argv[1:])
    elif tool == "run.sh":
        assert argv[1] in ("quickstart", "test", "demo", "rayssd")
        if argv[1] == "quickstart":
            build_parser().parse_args(argv[1:])
    elif tool.startswith("python"):
        assert argv[1] == "-m", command
        _check_job(argv)
    elif tool == "curl":
        url = next(a for a in argv if a.startswith(("http://", "'http://")))
        parsed = urlparse(url.strip("'"))
        assert parsed.path in ENDPOINT, parsed.path
        assert set(parse_qs(parsed.query)) <= ENDPOINT[parsed.path], parsed.query
    elif tool == "ray" and argv[1:3] == ["job", "submit"]:
        assert "--runtime-env" in argv and argv[argv.index("--runtime-env") + 1] == "runtime_env.yaml"
        job = argv[argv.index("--") + 1 :]
        assert job[:2] == ["python", "-m"] and job[2].startswith("jobs.")
        _check_job(job)
    elif tool == "export":
        for assignment in argv[1:]:
            name, _, value = assignment.partition("=")
            assert name in EXPORTS and value, command
            assert EXPORTS[name] is None or value in EXPORTS[name], command
    else:
        assert tool in OTHER_TOOLS, f"README command not checked by any test: {command}"


def test_the_readme_has_the_commands_a_user_needs():
    commands = readme_commands()
    assert commands[:2] == ["./run.sh quickstart", "./run.sh test"]  # the two commands, first
    assert any(c.startswith("rayssd submit") for c in commands)
    assert any(c.startswith("curl") for c in commands)
    assert "```mermaid" in README.read_text()


@pytest.mark.parametrize("command", readme_commands())
def test_every_readme_command_is_accepted_by_the_code(command):
    check(command)


def test_the_checker_catches_a_stale_option():
    with pytest.raises(SystemExit):
        check("rayssd train --data x.json --no-such-option")
    with pytest.raises(AssertionError):
        check("curl -X POST 'http://127.0.0.1:8000/predict'")
    with pytest.raises(AssertionError):
        check("export RAY_AUTH_MODE=tokens")
