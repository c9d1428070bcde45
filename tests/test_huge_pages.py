"""Importing fastlm before torch turns on torch's transparent-huge-page allocation for large CPU
tensors (THP_MEM_ALLOC_ENABLE), unless the user set the variable: a 64 MB tensor then sits on
2 MB pages, and with THP_MEM_ALLOC_ENABLE=0 it does not."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")

PROBE = """
import fastlm, torch
x = torch.ones(16 << 20)  # 64 MB, every page touched
for line in open("/proc/self/smaps_rollup"):
    if line.startswith("AnonHugePages:"):
        print(int(line.split()[1]))
"""


def huge_kib(env_value: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if env_value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                         check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(),
                    reason="the kernel has no transparent huge pages (Linux, THP not 'never')")
def test_large_tensors_get_huge_pages_by_default_and_the_users_setting_wins():
    assert huge_kib(None) >= 32 * 1024  # at least half of the tensor on 2 MB pages
    if "[always]" not in THP.read_text():  # with 'always' every large mapping gets them anyway
        assert huge_kib("0") == 0


def test_importing_fastlm_sets_the_variable_only_when_unset():
    code = "import os, fastlm; print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "1"
    env["THP_MEM_ALLOC_ENABLE"] = "0"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "0"
