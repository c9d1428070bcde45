"""Every command a user types: `python -m fastlm` lists them, each one runs its --help through
`python -m fastlm <command>`, and every `python -m fastlm.X` the README shows is one of them."""
import os
import re
import subprocess
import sys

import pytest

from fastlm.__main__ import COMMANDS, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bare_fastlm_lists_every_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert f"  {name} " in out


def test_unknown_command_says_so(capsys):
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_readme_commands_are_listed():
    readme = open(os.path.join(ROOT, "README.md")).read()
    shown = set(re.findall(r"python -m (fastlm(?:\.[a-z_]+)*)", readme))
    modules = {module for module, _ in COMMANDS.values()}
    unlisted = {m for m in shown - modules - {"fastlm"} if not m.startswith("fastlm.bench.")}
    assert not unlisted, f"README shows commands `python -m fastlm` does not list: {unlisted}"


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_command_runs(name):
    done = subprocess.run([sys.executable, "-m", "fastlm", name, "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--" in done.stdout, done.stdout[:500]  # a help text: its options
