import subprocess
import sys

import pytest

from car_backend.cli import build_parser, main

COMMANDS = ["serve", "worker", "segment", "prelabel", "bench", "eval", "report"]


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "car_backend.cli", *args], capture_output=True, text=True,
                          env=env, timeout=60)


def test_help_lists_every_command_and_the_settings():
    out = run_cli("--help")
    assert out.returncode == 0
    for command in COMMANDS:
        assert command in out.stdout
    assert "CAR_PROPOSAL_MODEL" in out.stdout and "REDIS_URL" in out.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_real_help(command):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    assert len(sub.description) > 40
    out = run_cli(command, "--help")
    assert out.returncode == 0
    assert out.stdout.startswith(f"usage: car-backend {command}")


def test_bad_setting_is_reported_before_anything_runs(monkeypatch, capsys):
    monkeypatch.setenv("CAR_DEVICE", "gpu0")
    assert main(["serve"]) == 2
    assert "CAR_DEVICE='gpu0' is not allowed; use one of: auto, cpu, cuda" in capsys.readouterr().err


def test_missing_arguments_exit_non_zero():
    out = run_cli("segment")
    assert out.returncode != 0
    assert "--labels" in out.stderr


def test_report_needs_the_backends_redis():
    import os

    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    out = run_cli("report", "--project", "3", env=env)
    assert out.returncode == 2 and "REDIS_URL" in out.stderr
