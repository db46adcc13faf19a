import subprocess
import sys

import yaml

from jobs.cli import main

RAYSSD = [sys.executable, "-m", "jobs.cli"]


def run(*args):
    return subprocess.run([*RAYSSD, *args], capture_output=True, text=True, timeout=300)


def test_help_lists_only_working_commands():
    out = run("--help")
    assert out.returncode == 0
    for command in ("demo", "config", "presets"):
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


def test_demo_trains_and_reports_map():
    out = run(
        "demo", "--steps", "3", "--train-images", "16", "--val-images", "8", "--set", "train.batch_size=8"
    )
    assert out.returncode == 0, out.stderr
    assert "held-out mAP@[.5:.95]" in out.stdout
    assert "step    3/3" in out.stdout
