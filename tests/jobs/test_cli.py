import subprocess
import sys

import pytest
import yaml

from jobs.cli import main

RAYSSD = [sys.executable, "-m", "jobs.cli"]


def run(*args):
    return subprocess.run([*RAYSSD, *args], capture_output=True, text=True, timeout=300)


def test_help_lists_only_working_commands():
    from jobs.cli import build_parser

    out = run("--help")
    assert out.returncode == 0
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == {
        *("quickstart", "demo", "config", "presets", "data", "prepare", "train", "evaluate"),
        *("export", "tune", "label", "serve", "submit", "bench"),
    }
    for command in sub.choices:
        assert command in out.stdout


def test_config_prints_the_resolved_yaml(capsys):
    try:
        main(["config", "--preset", "tiny", "--set", "train.epochs=3"])
    except SystemExit as exit_:
        assert exit_.code == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["name"] == "tiny" and data["train"]["epochs"] == 3


def test_a_bad_override_is_a_one_line_error_naming_the_field():
    out = run("config", "--set", "train.lr=-0.5")
    assert out.returncode == 2
    assert "train.lr" in out.stderr and "Traceback" not in out.stderr


def test_presets_lists_every_preset_with_its_default_box_count():
    out = run("presets")
    assert out.returncode == 0
    assert "8732" in out.stdout and "24564" in out.stdout and "tiny" in out.stdout


@pytest.mark.slow
def test_demo_trains_and_reports_a_real_map():
    args = ["--steps", "3", "--train-images", "16", "--val-images", "8", "--set", "train.batch_size=8"]
    out = run("demo", *args)
    assert out.returncode == 0, out.stderr
    assert "step    3/3" in out.stdout
    line = next(x for x in out.stdout.splitlines() if x.startswith("held-out mAP"))
    value = float(line.split("mAP@0.5")[1].split()[0])
    assert 0.0 <= value <= 1.0


def test_a_config_mistake_in_a_command_is_a_clear_error_not_a_traceback():
    out = run("demo", "--steps", "1", "--set", "model.image_size=160")  # maps no longer fit the anchors
    assert out.returncode == 2
    assert "anchors.feature_maps" in out.stderr and "Traceback" not in out.stderr
