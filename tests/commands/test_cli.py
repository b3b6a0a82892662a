"""The console script: every subcommand maps to a module with cli_main and a working --help."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from glmkit.commands.cli import COMMANDS, main


def test_usage_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_command_is_an_error(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_has_cli_main_and_help(name):
    module = importlib.import_module(COMMANDS[name][0])
    assert callable(getattr(module, "cli_main", None)), f"{COMMANDS[name][0]} lacks cli_main"
    with pytest.raises(SystemExit) as e:
        module.cli_main(["--help"])
    assert e.value.code == 0


@pytest.mark.slow
def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "glmkit", "--help"], capture_output=True, text=True, check=True)
    assert "usage: glmkit" in out.stdout
