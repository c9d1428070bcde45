"""`python -m fastlm.bench` on a CPU defaults to the quick preset (one shape per op, the main peers,
a small budget), and every run prints its estimated duration before it starts."""
import json

from fastlm.bench import __main__ as cli

from fastlm.ops.dispatch import IMPLEMENTED


def test_bare_command_on_cpu_is_quick_with_one_shape_per_op_and_main_peers():
    args = cli.parse_args(["--device", "cpu"])
    assert args.quick and args.budget == cli.QUICK_BUDGET_S
    for op in IMPLEMENTED:
        assert cli.op_shapes(op, args) == [cli.QUICK_SHAPES[op]]
        assert "torch-compile" not in cli.op_providers(op, args)
        assert "fastlm-reference" not in cli.op_providers(op, args)
    # the full grids and an explicit --providers stay as they were
    small = cli.parse_args(["--device", "cpu", "--sizes", "small"])
    assert not small.quick and small.budget == 1.0 and cli.op_shapes("layer_norm", small) is None
    assert cli.op_providers("layer_norm", small) is None
    forced = cli.parse_args(["--device", "cpu", "--providers", "torch-compile"])
    assert cli.op_providers("layer_norm", forced) == {"torch-compile"}


def test_estimate_counts_rows_of_the_grid():
    quick = cli.estimate(cli.parse_args(["--device", "cpu", "--dtypes", "float32"]))
    medium = cli.estimate(cli.parse_args(["--device", "cpu", "--sizes", "medium"]))
    # quick, float32: one shape, 3 modes, torch + fastlm-cpu for a norm
    assert quick[0]["layer_norm"] == 1 * 3 * 2
    assert medium[0]["layer_norm"] > quick[0]["layer_norm"]
    assert medium[1] > 10 * quick[1]  # seconds
    assert medium[2].startswith("estimate: ") and f"{sum(medium[0].values())} rows" in medium[2]


def test_quick_run_prints_the_estimate_first_and_times_the_planned_rows(tmp_path, capsys):
    path = tmp_path / "quick.json"
    assert cli.main(["--device", "cpu", "--ops", "layer_norm", "--dtypes", "float32",
                     "--modes", "fwd", "--budget", "0.02", "--json", str(path)]) == 0
    err = capsys.readouterr().err
    assert err.index("estimate: 2 rows") < err.index("layer_norm")  # before the run's bar
    assert "estimated ~" in err
    rows = json.loads(path.read_text())
    assert sorted(r["provider"] for r in rows) == ["fastlm-cpu", "torch"]
    assert {tuple(r["shape"]) for r in rows} == {cli.QUICK_SHAPES["layer_norm"]}
    assert all(r["median_ms"] > 0 for r in rows)


def test_quick_times_bfloat16_only_where_auto_precision_would_train_in_it(monkeypatch):
    import fastlm.precision

    monkeypatch.setattr(fastlm.precision, "resolve_precision",
                        lambda requested, device: ("fp32", "auto: no native bf16"))
    args = cli.parse_args(["--device", "cpu"])
    assert [str(d) for d in args.dtypes] == ["torch.float32"]
    assert "bfloat16 left out (auto: no native bf16" in args.dtype_note
    # an explicit --dtypes and the full grids are what they were
    assert len(cli.parse_args(["--device", "cpu", "--dtypes", "float32,bfloat16"]).dtypes) == 2
    assert len(cli.parse_args(["--device", "cpu", "--sizes", "small"]).dtypes) == 2
    monkeypatch.setattr(fastlm.precision, "resolve_precision",
                        lambda requested, device: ("bf16", "auto: native bf16, 2.0x fp32"))
    fast = cli.parse_args(["--device", "cpu"])
    assert len(fast.dtypes) == 2 and fast.dtype_note is None
