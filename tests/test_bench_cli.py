"""`python -m fastlm.bench` on CPU with tiny shapes: JSON rows, provider filter, explicit shapes,
the table, --compare on a planted regression, plots and the RESULTS.md report."""
import json
import sys

import pytest
from fastlm.bench import __main__ as cli
from fastlm.bench import bench_layer_norm, compare, plot, report, utils
from fastlm.ops.dispatch import IMPLEMENTED

FAST = ["--dtypes", "float32", "--budget", "0.02", "--providers", "torch,fastlm-cpu"]
ENV_KEYS = ("device", "device_type", "torch", "triton", "cuda", "commit", "date", "threads")


@pytest.fixture(scope="module")
def norm_run(tmp_path_factory):
    """One tiny run of both norms (shared by the tests below: the ceilings take a second)."""
    path = tmp_path_factory.mktemp("bench") / "norms.json"
    status = cli.main(["--ops", "layer_norm,rms_norm", "--sizes", "64x32,128x32",
                       "--modes", "fwd,full", *FAST, "--json", str(path)])
    assert status == 0
    return path, json.loads(path.read_text())


def test_default_ops_are_fastlm_ops_in_their_order():
    """The defaults come from fastlm.ops' one op list; an op without a bench would drop out."""
    assert cli.parse_args([]).ops == list(IMPLEMENTED)


def test_json_rows_carry_case_timing_and_environment(norm_run):
    _, rows = norm_run
    assert {r["op"] for r in rows} == {"layer_norm", "rms_norm"}
    assert {r["provider"] for r in rows} == {"torch", "fastlm-cpu"}  # --providers honoured
    assert {tuple(r["shape"]) for r in rows} == {(64, 32), (128, 32)}
    assert {r["mode"] for r in rows} == {"fwd", "full"}
    for r in rows:
        assert r["dtype"] == "float32"
        assert r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert r["gb_per_s"] > 0 and r["pct_of_copy_bw"] > 0
        assert r["roofline_copy_gbps"] > 0 and r["roofline_matmul_tflops"] > 0
        assert r["speedup_vs_torch"] > 0
        for key in ENV_KEYS:
            assert key in r, key
    # The explicit shape is installed only for the run: the presets are untouched afterwards.
    assert "custom" not in bench_layer_norm.SHAPES


def test_table_shows_throughput_and_roofline(norm_run):
    _, rows = norm_run
    table = utils.format_table(rows)
    assert "GB/s" in table and "% copy" in table and "vs torch" in table
    skipped_row = {k: v for k, v in rows[0].items() if k != "median_ms"}
    skipped = utils.format_table([{**skipped_row, "skipped": "no GPU"}])
    assert "skipped: no GPU" in skipped


def test_attention_rows_report_tflops_against_the_matmul_ceiling(tmp_path, capsys):
    path = tmp_path / "attn.json"
    assert cli.main(["--ops", "attention", "--sizes", "32x16", "--modes", "fwd", "--dtypes",
                     "float32", "--budget", "0.02", "--providers", "torch", "--json",
                     str(path)]) == 0
    rows = json.loads(path.read_text())
    assert {tuple(r["shape"]) for r in rows} == {(1, 4, 32, 16)}
    assert all(r["tflops"] > 0 and r["pct_of_matmul_peak"] > 0 for r in rows)
    assert "TFLOP/s" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--ops", "layer_norm", "--sizes", "64"], "layer_norm shapes have 2 numbers"),
    (["--ops", "layer_norm", "--sizes", "huge"], "neither one of small"),
    (["--ops", "layer_norm", "--sizes", "0x4"], "must be > 0"),
    (["--ops", "bpe", "--sizes", "64x32"], "takes only small"),
    (["--ops", "nope"], "no benchmark named 'nope'"),
    (["--ops", "layer_norm", "--budget", "0"], "--budget must be > 0"),
    (["--ops", "layer_norm", "--compare", "/no/such.json"], "no such file"),
])
def test_bad_arguments_name_what_to_fix(argv, message, capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(argv)
    assert message in capsys.readouterr().err


def test_compare_detects_a_planted_regression(norm_run, tmp_path, capsys):
    path, rows = norm_run
    old = [dict(r) for r in rows]
    victim = next(r for r in old if r["op"] == "rms_norm" and r["provider"] == "fastlm-cpu"
                  and r["mode"] == "full" and r["shape"] == [128, 32])
    victim["median_ms"] /= 3  # the old run was 3x faster: the new one regressed
    old_path = tmp_path / "old.json"
    old_path.write_text(json.dumps(old))

    entries = compare.compare(old, rows, threshold=0.10)
    assert len(entries) == len(rows)  # every row matched by op, provider, shape, dtype, mode
    bad = [e for e in entries if e["status"] == "regression"]
    assert len(bad) == 1 and bad[0]["op"] == "rms_norm" and bad[0]["ratio"] == pytest.approx(3)

    assert cli.main(["compare", str(old_path), str(path)]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION rms_norm fastlm-cpu 128x32 float32 full" in out
    assert cli.main(["compare", str(path), str(path)]) == 0  # a run against itself: nothing
    # A threshold above the slow-down lets it pass.
    assert cli.main(["compare", str(old_path), str(path), "--threshold", "5"]) == 0


def test_run_with_compare_exits_1_on_regression(tmp_path, capsys):
    old = tmp_path / "old.json"
    assert cli.main(["--ops", "layer_norm", "--sizes", "64x32", "--modes", "fwd", *FAST,
                     "--json", str(old)]) == 0
    rows = json.loads(old.read_text())
    for r in rows:
        r["median_ms"] /= 100  # impossible to match: every row regresses
    old.write_text(json.dumps(rows))
    status = cli.main(["--ops", "layer_norm", "--sizes", "64x32", "--modes", "fwd", *FAST,
                       "--json", str(tmp_path / "new.json"), "--compare", str(old)])
    assert status == 1
    assert capsys.readouterr().out.count("REGRESSION") == len(rows)


def test_plots_are_pngs(norm_run, tmp_path):
    pytest.importorskip("matplotlib")
    _, rows = norm_run
    paths = plot.plot_rows(rows, str(tmp_path))
    assert sorted(p.rsplit("/", 1)[1] for p in paths) == ["layer_norm.png", "rms_norm.png"]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plots_without_matplotlib_say_how_to_install(norm_run, tmp_path, monkeypatch, capsys):
    _, rows = norm_run
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(plot.MissingMatplotlib, match="pip install matplotlib"):
        plot.plot_rows(rows, str(tmp_path))
    json_path = tmp_path / "plot.json"
    json_path.write_text(json.dumps(rows))
    assert cli.main(["plot", str(json_path), "--out", str(tmp_path / "png")]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err


def test_report_takes_the_latest_table_per_device_and_op(norm_run, tmp_path):
    _, rows = norm_run
    folder = tmp_path / "results" / "cpu-test"
    folder.mkdir(parents=True)
    old = [{**r, "date": "2020-01-01T00:00:00+00:00", "commit": "old0000"} for r in rows]
    new = [{**r, "date": "2030-01-01T00:00:00+00:00", "commit": "new1111"} for r in rows
           if r["op"] == "layer_norm"]
    (folder / "a.json").write_text(json.dumps(old))
    (folder / "b.json").write_text(json.dumps(new))
    (folder / "broken.json").write_text("[{")  # skipped with a warning, not fatal
    profile = {"preset": "tiny", "batch": 2, "seq_len": 128, "dtype": "float32",
               "compile": False, "tokens_per_s": 1234.5, "step_ms": 20.0, "mfu": None,
               "peak_memory_bytes": 2 ** 28, "power_w": None, "energy_j_per_token": None,
               "date": "2030-01-01T00:00:00+00:00", "commit": "new1111", "device": "Test CPU"}
    (folder / "profile-tiny.json").write_text(json.dumps(profile))
    out = tmp_path / "RESULTS.md"
    assert report.main(["--results", str(tmp_path / "results"), "--out", str(out)]) == 0
    text = out.read_text()
    layer_norm = text[text.index("### layer_norm"):text.index("### rms_norm")]
    rms_norm = text[text.index("### rms_norm"):]
    assert "commit new1111" in layer_norm and "2030-01-01" in layer_norm
    assert "commit old0000" in rms_norm  # only the old file holds rms_norm
    assert "| fastlm-cpu | 64x32 | float32 | fwd |" in layer_norm
    assert "| tiny | 2x128 | float32 | no | 1,234 |" in text
    # The output depends only on the files: a second build is identical.
    assert report.build(str(tmp_path / "results")) == text


def test_provider_filter_reaches_benches_with_their_own_loop(tmp_path, capsys):
    from fastlm.bench import bench_adamw_step

    original = bench_adamw_step.providers
    path = tmp_path / "adamw.json"
    assert cli.main(["--ops", "adamw_step", "--sizes", "1x64x128", "--dtypes", "float32",
                     "--budget", "0.02", "--providers", "torch-fused,fastlm-cpu,nope",
                     "--json", str(path)]) == 0
    rows = json.loads(path.read_text())
    assert sorted(r["provider"] for r in rows) == ["fastlm-cpu", "torch-fused"]
    assert all(r["shape"] == [1, 64, 128] and r["median_ms"] > 0 for r in rows)
    assert bench_adamw_step.providers is original  # restored after the run
    assert "no row from nope" in capsys.readouterr().err
