"""`rayssd tune`: what is refused before Ray starts.

The end-to-end search test (4 trials on `tiny`, ASHA stopping the weak ones, a real MLflow
server) is not here yet: in a clean CI run the search stalled after ASHA stopped a trial (its
Ray Train placement group was not freed), so it waits for that fix (issue 15)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipelines.data.builtin import write_builtin

pytestmark = pytest.mark.slow


def test_tune_refuses_a_bad_search_before_ray_starts(tmp_path):
    data = tmp_path / "data"
    write_builtin(data, seed=0, train_images=8, val_images=4, image_size=96)
    train = str(data / "annotations" / "instances_train.json")
    argv = [sys.executable, "-m", "jobs.cli", "tune", "--data", train]
    for extra, needle in (
        (["--search", "train.lr=loguniform(0,1)"], "low > 0"),
        (["--search", "train.nope=choice(1,2)"], "train.nope"),
        (["--resume"], "--resume needs --name"),
        (["--trials", "0"], "--trials"),
    ):
        done = subprocess.run([*argv, *extra], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        errors = [line for line in done.stderr.splitlines() if "error:" in line]
        assert done.returncode == 2 and len(errors) == 1 and needle in errors[0], done.stderr[-1500:]
    assert not (tmp_path / "rayssd-runs").exists()
