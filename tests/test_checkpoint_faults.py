"""fastlm.checkpoint under faults (issue 19): a manifest of the wrong shape or a missing one falls
back to the previous checkpoint with a report; what killed saves leave behind is cleared by the
next save; a save that cannot write removes its own temporary directory, names the place and
leaves the checkpoints already there untouched."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from fastlm import checkpoint


def save(run, step, **kw):
    model = nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return checkpoint.save(run, step, model, opt, {"step": step}, {"model": {}},
                           {"val_loss": 1.0 / (step + 1)}, **kw)


@pytest.mark.parametrize("manifest", [
    "[]", "{}", '{"format": "fastlm-checkpoint", "version": 1}',
    '{"format": "fastlm-checkpoint", "version": 1, "step": 2, "config": {}, "metrics": {}, '
    '"files": []}',
    '{"format": "fastlm-checkpoint", "version": 1, "step": 2, "config": {}, "metrics": {}, '
    '"files": {"x": 3}}',
    '{"format": "fastlm-checkpoint", "version": 1, "step": "2", "config": {}, "metrics": {}, '
    '"files": {}}',
    '{"format": "fastlm-checkpoint", "version": 1, "step": 2, "config": {}, "metrics": {}, '
    '"files": {"../../outside": {"sha256": "0"}}}',
    b"\xff\xfe not utf-8",
])
def test_manifest_of_the_wrong_shape_falls_back(tmp_path, manifest):
    save(tmp_path, 1)
    newest = save(tmp_path, 2)
    data = manifest if isinstance(manifest, bytes) else manifest.encode()
    (newest / "manifest.json").write_bytes(data)
    with pytest.raises(checkpoint.CheckpointError, match="manifest.json"):
        checkpoint.load(newest)
    reports = []
    assert checkpoint.load(tmp_path, warn=reports.append).step == 1
    assert len(reports) == 1 and "step_000002" in reports[0]


def test_missing_manifest_is_reported(tmp_path):
    save(tmp_path, 1)
    (save(tmp_path, 2) / "manifest.json").unlink()
    reports = []
    assert checkpoint.load(tmp_path, warn=reports.append).step == 1
    assert len(reports) == 1 and "step_000002" in reports[0] and "missing" in reports[0]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def test_killed_saves_leave_nothing_behind(tmp_path):
    save(tmp_path, 1)
    root = checkpoint.checkpoint_dir(tmp_path)
    pid = _dead_pid()
    (root / f".tmp-step_000002-{pid}").mkdir()  # killed mid-write
    (root / f".tmp-step_000002-{pid}" / "model.safetensors").write_bytes(b"half")
    (root / "step_000001").rename(root / f".old-step_000001-{pid}")  # killed mid-replace
    live = root / f".tmp-step_000009-{os.getppid()}"  # a save still running elsewhere
    live.mkdir()
    save(tmp_path, 3)
    assert sorted(p.name for p in root.iterdir()) == [live.name, "step_000001", "step_000003"]
    assert checkpoint.load(root / "step_000001").step == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_failed_save_keeps_the_last_good_checkpoint(tmp_path):
    good = save(tmp_path, 1)
    root = checkpoint.checkpoint_dir(tmp_path)
    root.chmod(0o500)
    try:
        with pytest.raises(checkpoint.SaveError, match=str(root)):
            save(tmp_path, 2)
    finally:
        root.chmod(0o700)
    assert [p.name for p in root.iterdir()] == [good.name]
    assert checkpoint.load(tmp_path).step == 1


def test_full_disk_leaves_no_temp_dir(tmp_path, monkeypatch):
    good = save(tmp_path, 1)

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", no_space)
    with pytest.raises(checkpoint.SaveError, match="No space left on device"):
        save(tmp_path, 2)
    assert [p.name for p in checkpoint.checkpoint_dir(tmp_path).iterdir()] == [good.name]


def test_weights_get_the_mode_of_the_other_files(tmp_path):
    path = save(tmp_path, 1)
    modes = {p.name: p.stat().st_mode & 0o777 for p in path.iterdir()}
    assert modes["model.safetensors"] == modes["optimizer.pt"], modes
