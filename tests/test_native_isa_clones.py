"""The AVX2 copies of the C++ CPU kernels are AVX2 code. A wrapper compiled for AVX2 runs AVX2
instructions only where its callees were inlined into it; gcc once left ce_row_forward's clone a
bare jump to the generic SSE2 code (cross-entropy's forward ran 2.6x slower than it should on
every AVX2 CPU). Every function of fastlm._C named *_avx2 (or in an attention_avx2 namespace)
must hold 256-bit (ymm) instructions."""
import re
import shutil
import subprocess

import pytest

from tests.utils import require_backend

import torch


def functions(so_path: str) -> dict[str, list[str]]:
    """name -> instructions, from objdump's disassembly of the library."""
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", so_path],
                         capture_output=True, text=True, check=True).stdout
    funcs: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            current = m.group(1)
            funcs[current] = []
        elif current is not None and line.strip():
            funcs[current].append(line)
    return funcs


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs binutils' objdump")
def test_every_avx2_clone_runs_avx2_instructions():
    require_backend("layer_norm", "cpu", torch.device("cpu"))
    import fastlm._C

    funcs = functions(fastlm._C.__file__)
    clones = {name: body for name, body in funcs.items()
              if ("_avx2" in name.split("(")[0] or "attention_avx2::" in name)
              and "has_avx2" not in name and "@plt" not in name and "[clone .cold]" not in name}
    assert len(clones) >= 10, sorted(clones)  # the kernels' clones were found at all
    scalar = [name for name, body in clones.items() if not any("ymm" in i for i in body)]
    assert not scalar, f"AVX2 clones without AVX2 code (a callee was not inlined): {scalar}"


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs binutils' objdump")
def test_the_avx512_bf16_decode_product_uses_its_dot_product_instruction():
    """small_rows_linear's bf16 path for AVX512-BF16 CPUs is built on every machine (the CPUs
    that run it are checked at run time): its row kernels must hold vdpbf16ps."""
    require_backend("layer_norm", "cpu", torch.device("cpu"))
    import fastlm._C

    funcs = functions(fastlm._C.__file__)
    kernels = {name: body for name, body in funcs.items()
               if "rows_bf16dp" in name and "[clone .cold]" not in name}
    assert kernels  # the row kernels (1 to 4 rows of x; gcc may inline some into the switch)
    missing = [name for name, body in kernels.items() if not any("vdpbf16ps" in i for i in body)]
    assert not missing, missing
