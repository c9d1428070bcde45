"""bench_small_rows_linear: a decode step's products, fastlm's small-rows kernel against oneDNN's
packed matmul and F.linear. The providers must compute the same product (a bench that times a
wrong answer is no bench), the rows must be forward-only and the estimate must count them."""
import json

import pytest
import torch

from fastlm.bench import __main__ as cli
from fastlm.bench import bench_small_rows_linear as bench
from fastlm.models import packed_linear

pytestmark = pytest.mark.skipif(packed_linear._small_rows_op() is None,
                                reason="fastlm._C is not built")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 67, 33), (3, 96, 129)])
def test_providers_compute_the_same_product(shape, dtype):
    case = bench.make_case(shape, dtype, torch.device("cpu"))
    x, w, b, packed = case.make_inputs()
    want = (x.double() @ w.double().T + b.double())
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    timed = 0
    for p in bench.providers(torch.device("cpu")):
        if p.name == "onednn-packed" and packed is None:
            continue  # oneDNN cannot pack this dtype on this CPU: the bench skips the row
        got = p.fn(x, w, b, packed)
        assert got.shape == (shape[0], shape[2]) and got.dtype == dtype, p.name
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol, msg=p.name)
        timed += 1
    assert timed >= 2


def test_cli_times_forward_only_and_the_estimate_counts_those_rows(tmp_path, capsys):
    argv = ["--device", "cpu", "--ops", "small_rows_linear", "--sizes", "2x64x96",
            "--dtypes", "float32", "--budget", "0.01"]
    planned, _, _ = cli.estimate(cli.parse_args(argv))
    path = tmp_path / "rows.json"
    assert cli.main(argv + ["--json", str(path)]) == 0
    rows = json.loads(path.read_text())
    assert {r["mode"] for r in rows} == {"fwd"}  # no backward rows, even with the default modes
    assert sorted(r["provider"] for r in rows) == ["fastlm-cpu", "onednn-packed", "torch"]
    assert planned["small_rows_linear"] == len(rows)
    timed = [r for r in rows if "median_ms" in r]
    assert {r["provider"] for r in timed} >= {"fastlm-cpu", "torch"}
    assert all(r["shape"] == [2, 64, 96] and r["gb_per_s"] > 0 for r in timed)
