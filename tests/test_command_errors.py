"""Every command ends through fastlm.command.run_command: an error it does not handle itself is
one line naming the command (exit 1), the traceback only with FASTLM_DEBUG=1; Ctrl-C exits 130."""
import os
import re
import subprocess
import sys

import pytest

from fastlm.command import run_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def boom():
    raise RuntimeError("shape mismatch in layer 3\n  (a long second line)")


def test_an_unhandled_error_is_one_line(capsys, monkeypatch):
    monkeypatch.delenv("FASTLM_DEBUG", raising=False)
    assert run_command(boom) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "error: RuntimeError: shape mismatch in layer 3" in err and "FASTLM_DEBUG=1" in err
    assert "Traceback" not in err


def test_fastlm_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("FASTLM_DEBUG", "1")
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_command(boom)


def test_exit_status_and_interrupt(capsys):
    assert run_command(lambda: 3) == 3 and run_command(lambda: None) == 0

    def interrupted():
        raise KeyboardInterrupt

    assert run_command(interrupted) == 130
    assert "interrupted" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse's own exits pass through
        run_command(lambda: exec("raise SystemExit(2)"))


def test_every_entry_point_ends_through_run_command():
    found = subprocess.run(["git", "grep", "-nE", r"(sys\.exit|SystemExit)\(main\(", "--",
                            "fastlm", "bench/__main__.py"], cwd=ROOT, capture_output=True,
                           text=True).stdout
    assert not found, f"entry points that bypass fastlm.command.run_command:\n{found}"
    mains = subprocess.run(["git", "ls-files", "fastlm/*__main__.py"], cwd=ROOT,
                           capture_output=True, text=True).stdout.split()
    assert len(mains) >= 9
    for path in mains:
        text = open(os.path.join(ROOT, path)).read()
        assert re.search(r"sys\.exit\(run_command\(main\)\)", text), path


def test_a_real_command_reports_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FASTLM_DEBUG"}
    done = subprocess.run([sys.executable, "-m", "fastlm.plot", str(tmp_path / "missing")], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and done.stderr.count("\n") <= 2, done.stderr
