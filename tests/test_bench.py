"""The benchmark harness on the CPU: tiny shapes, so the whole file runs in well under a minute."""
import csv
import errno
import importlib.util
import json
import re
import tempfile

import pytest
import torch

from vit_kernels import __main__ as cli
from vit_kernels import bench
from vit_kernels.bench import output, runner
from vit_kernels.bench.case import Case
from vit_kernels.bench.ops import OP_BENCHES
from vit_kernels.bench.timing import QUICK, Budget, measure, percentile

pytest.importorskip("timm")

# Width 32 with 2 heads and 17 tokens (a 4x4 patch grid plus the class token): every op's code path
# at a size the 2-core CPU runs in milliseconds; 17 is odd so no power-of-two tile hides an edge.
TINY_OPS = [((32, 2), 17, 2)]
TINY_MODEL = dict(img_size=32, depth=2)


def _read_csv(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_quick_run_writes_results_with_metadata(tmp_path, capsys):
    plan = bench.Plan(ops=list(bench.OPS), models=["vit_tiny_patch16_224"], model_kwargs=TINY_MODEL,
                      batches=[2], op_shapes=TINY_OPS, quick=True, device="cpu", out=str(tmp_path))
    rows, out_dir = bench.run(plan)
    printed = capsys.readouterr().out
    assert "GPU kernels were NOT timed" in printed
    assert printed.rstrip().splitlines()[-1].startswith("CPU run: the Triton kernels")
    assert {(r["bench"], r["provider"]) for r in rows} >= {(op, "vk") for op in bench.OPS}
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd", "inference"}
    # "unsteady" is a verdict on the machine (another test process shares the 2 cores), not on the harness.
    bad = [r for r in rows if r["status"] not in ("ok", "unsteady")]
    assert not bad, bad
    saved = _read_csv(out_dir / "results.csv")
    assert len(saved) == len(rows)
    assert list(saved[0]) == output.COLUMNS
    for row in saved:
        for column in ("device", "torch", "triton", "cuda", "commit", "timestamp", "unit", "formula", "dtype"):
            assert row[column], (column, row)
        assert float(row["p20_ms"]) <= float(row["p50_ms"]) <= float(row["p80_ms"])
    (json_path,) = out_dir.glob("run-*.json")
    meta = json.loads(json_path.read_text())
    assert meta["ceilings"]["gbps"] > 0 and meta["ceilings"]["tflops"] > 0
    assert meta["torch"] == torch.__version__ and len(meta["rows"]) == len(rows)
    if importlib.util.find_spec("matplotlib") is not None:
        assert list((out_dir / "plots").glob("*.png"))


def test_upsert_replaces_same_key_and_keeps_others(tmp_path):
    meta = dict(device="dev", torch="t", triton="tr", cuda="c", commit="abc", timestamp="then", backend="auto")
    first = [dict(kind="op", bench="attention", provider=p, mode="fwd", shape="s", dtype="float32",
                  status="ok", p50_ms=1.0) for p in ("vk", "timm")]
    output.upsert_csv(tmp_path / "r.csv", first, meta)
    again = [dict(first[0], p50_ms=0.5), dict(first[0], dtype="bfloat16", p50_ms=2.0)]
    merged = output.upsert_csv(tmp_path / "r.csv", again, dict(meta, timestamp="now"))
    saved = _read_csv(tmp_path / "r.csv")
    assert saved == merged and len(saved) == 3
    by_key = {(r["provider"], r["dtype"]): r for r in saved}
    assert by_key["vk", "float32"]["p50_ms"] == "0.5" and by_key["vk", "float32"]["timestamp"] == "now"
    assert by_key["timm", "float32"]["timestamp"] == "then"


@pytest.mark.parametrize("field, name, valid", [
    ("ops", "atention", "add_layer_norm"),
    ("models", "vit_bsae_patch16_224", "vit_base_patch16_224"),
    ("dtypes", "float8", "bfloat16"),
    ("modes", "backward", "fwd+bwd"),
    ("providers", "vk+compyle", "vk+compile"),
])
def test_unknown_names_list_valid_ones(field, name, valid, capsys):
    with pytest.raises(ValueError, match=rf"unknown .*'{re.escape(name)}'.*{re.escape(valid)}"):
        bench.resolve(bench.Plan(device="cpu", **{field: [name]}))
    # The CLI turns it into a usage error naming the option (exit status 2), not a traceback.
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", f"--{field}", name, "--device", "cpu"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --{field}: unknown" in err and valid in err


@pytest.fixture
def nothing_runs(monkeypatch):
    """Fail the test if the harness gets as far as timing anything."""
    def ran(*args, **kwargs):
        pytest.fail("the run started before the options were checked")
    for name in ("measure_ceilings", "run_cases", "ModelPair"):
        monkeypatch.setattr(bench, name, ran)


@pytest.mark.parametrize("argv, message", [
    (["--batch-sizes", "abc"], "argument --batch-sizes: expected comma-separated integers; got 'abc'"),
    (["--batch-sizes", "-1"], r"argument --batch-sizes: batch sizes must be positive ints; got [-1]"),
    (["--batch-sizes", "4,0"], r"argument --batch-sizes: batch sizes must be positive ints; got [4, 0]"),
    (["--device", "bogus"], "argument --device: expected cpu, cuda or cuda:N; got 'bogus'"),
    (["--device", "meta"], "argument --device: expected cpu, cuda or cuda:N; got 'meta'"),
    (["--providers", "bogus"], "argument --providers: unknown provider 'bogus'; valid providers: vk, timm"),
])
def test_bad_option_is_a_usage_error_before_anything_runs(argv, message, nothing_runs, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--device", "cpu", "--models", "vit_tiny_patch16_224", *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("device, count", [("cuda", 0), ("cuda:1", 1)])
def test_missing_cuda_device_is_a_usage_error(device, count, monkeypatch, nothing_runs, capsys):
    # The device count is faked so the test means the same on a machine with a GPU.
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--device", device])
    assert exit_.value.code == 2
    assert f"argument --device: '{device}' asked for, but torch {torch.__version__} sees {count} CUDA devices" \
        in capsys.readouterr().err


def test_unwritable_out_is_found_before_anything_runs(tmp_path, nothing_runs, capsys):
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "results"  # a directory under a file: no user can create it, root included
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--device", "cpu", "--ops", "add_layer_norm", "--out", str(out)])
    assert exit_.value.code == 2
    assert f"argument --out: cannot write to {out}: Not a directory" in capsys.readouterr().err


def test_results_that_cannot_be_written_at_the_end_are_kept(tmp_path, monkeypatch, capsys):
    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(bench, "upsert_csv", disk_full)
    monkeypatch.setattr(bench, "measure_ceilings", lambda *args: None)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    out = tmp_path / "out"
    # One provider of one op at one shape: the smallest run there is.
    code = cli.main(["bench", "--device", "cpu", "--ops", "add_layer_norm", "--modes", "fwd",
                     "--providers", "eager", "--no-plots", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 1
    (fallback,) = tmp_path.glob("vit_kernels-bench-*/run-*.json")
    assert f"error: could not write the results to {out} ([Errno 28] No space left on device); " \
           f"this run's 1 rows are saved in {fallback}" in printed.err
    assert [(r["bench"], r["provider"]) for r in json.loads(fallback.read_text())["rows"]] == [("add_layer_norm", "eager")]
    assert "add_layer_norm" in printed.out  # the table
    assert list(out.iterdir()) == []  # the write probe left nothing behind


def test_every_provider_name_is_declared():
    # --providers is checked against these lists; a provider added without its name would be refused.
    for op in bench.OPS:
        for case in bench.op_cases(op, torch.device("cpu"), torch.float32, ["fwd"], True, True, TINY_OPS):
            assert set(case.providers) <= set(bench.OP_PROVIDERS), op
    pair = bench.ModelPair("vit_tiny_patch16_224", torch.device("cpu"), torch.float32, **TINY_MODEL)
    assert set(pair.provider_models(compile_=True)) <= set(bench.MODEL_PROVIDERS)


def test_rows_carry_the_tables_formulas():
    # ViT-B/16 attention at batch 1 by hand: 4*B*H*N^2*D flop and 4*M*C*s bytes forward (s = 2 for bf16).
    fwd, bwd, both = bench.op_cases("attention", torch.device("cpu"), torch.bfloat16, bench.OP_MODES, True, False,
                                    [("B", 197, 1)])
    assert (fwd.flops, fwd.bytes) == (4 * 12 * 197**2 * 64, 4 * 197 * 768 * 2)
    assert (both.flops, both.bytes) == (fwd.flops + bwd.flops, fwd.bytes + bwd.bytes)
    for op, entry in OP_BENCHES.items():
        (case,) = bench.op_cases(op, torch.device("cpu"), torch.float32, ["fwd"], True, False, TINY_OPS)
        assert case.formula == entry.formula and case.baseline == entry.baseline


def test_bf16_refused_where_the_gpu_has_none(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Old GPU")
    with pytest.raises(ValueError, match="bfloat16 is not supported on Old GPU"):
        bench.parse_dtypes(["bf16"], torch.device("cuda"))


def _toy_case(providers):
    x = torch.randn(64, 8)
    return Case("op", "toy", "fwd", "64x8", torch.float32, torch.device("cpu"),
                {name: (lambda s, fn=fn: (lambda: (fn(s[0]),))) for name, fn in providers.items()},
                "eager", lambda: (x + torch.randn_like(x),), lambda s: (s[0].double().exp(),), input_sets=2)


def test_oom_in_one_row_is_reported_and_the_run_goes_on():
    def out_of_memory(x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    rows = runner.run_case(_toy_case({"eager": torch.exp, "huge": out_of_memory, "other": torch.exp}), QUICK, None)
    status = {r["provider"]: r["status"] for r in rows}
    assert status == {"eager": "ok", "huge": "oom", "other": "ok"}
    assert "out of memory" in next(r for r in rows if r["provider"] == "huge")["note"]


def test_disagreeing_provider_is_not_timed(monkeypatch):
    timed = []
    real_measure = runner.measure
    monkeypatch.setattr(runner, "measure", lambda calls, *a: timed.append(calls) or real_measure(calls, *a))
    # eager exp is exact to ~1e-7 here, so the limit is the fp32 floor 1e-3: a 1% error and a NaN are caught.
    wrong = lambda x: torch.exp(x) * 1.01
    rows = runner.run_case(_toy_case({"eager": torch.exp, "wrong": wrong, "nan": lambda x: torch.exp(x) / 0 * 0}),
                           QUICK, None)
    by = {r["provider"]: r for r in rows}
    assert by["wrong"]["status"] == by["nan"]["status"] == "mismatch"
    assert "p50_ms" not in by["wrong"] and by["wrong"]["max_err"] == pytest.approx(0.01, rel=1e-3)
    assert len(timed) == 1


def test_percentiles_and_measure_rotate_inputs():
    assert percentile([4, 1, 3, 2, 5], 50) == 3 and percentile([1, 2], 20) == pytest.approx(1.2)
    seen = []
    timing = measure([lambda: seen.append(0), lambda: seen.append(1)], torch.device("cpu"), QUICK)
    assert set(seen) == {0, 1} and timing.runs >= QUICK.min_runs
    assert timing.p20_ms <= timing.p50_ms <= timing.p80_ms


def _sleeper(duration_ms):
    """A call that sleeps ``duration_ms(i)`` milliseconds on its i-th call."""
    import itertools
    import time
    count = itertools.count()
    return lambda: time.sleep(duration_ms(next(count)) / 1e3)


def test_one_time_work_of_every_input_set_is_left_out_of_the_timing():
    # The first call on each set pays 60 ms (a compile, an autotune, a second specialisation),
    # later calls 1 ms: none of the 60 ms calls may be timed, whichever set it belongs to.
    first_slow = lambda i: 60.0 if i == 0 else 1.0  # noqa: E731
    timing = measure([_sleeper(first_slow), _sleeper(first_slow)], torch.device("cpu"), QUICK)
    assert timing.steady and timing.p80_ms < 20, timing


def test_calls_still_changing_speed_are_not_steady():
    # Each call 10% slower than the one before: no number of retries finds a steady time.
    timing = measure([_sleeper(lambda i: 1.1 ** i)], torch.device("cpu"),
                     Budget(warmup_ms=5, measure_ms=20, min_runs=8, max_runs=8))
    assert not timing.steady and timing.halves_ms[1] > 1.25 * timing.halves_ms[0], timing


def test_unsteady_row_is_reported_without_a_speedup(monkeypatch):
    from vit_kernels.bench.timing import Timing
    monkeypatch.setattr(runner, "measure", lambda calls, *a: Timing(1.0, 2.0, 9.0, 10, None, False, (1.0, 9.0)))
    rows = runner.run_case(_toy_case({"eager": torch.exp, "other": torch.exp}), QUICK, None)
    assert all(r["status"] == "unsteady" and "speedup" not in r for r in rows)
    assert "1.000 ms over the first half" in rows[0]["note"]


def test_peak_column_is_left_out_when_a_row_beats_the_ceiling():
    rows = [dict(bench="a", mode="fwd", shape="s", provider="vk", frac_peak_flops=0.5, frac_peak_bw=0.4),
            dict(bench="b", mode="fwd", shape="s", provider="vk", frac_peak_flops=2.28, frac_peak_bw=0.9)]
    meta, said = {"ceilings": {}}, []
    bench._drop_exceeded_ceilings(rows, meta, said.append)
    assert all("frac_peak_flops" not in r for r in rows) and [r["frac_peak_bw"] for r in rows] == [0.4, 0.9]
    assert "228% of the measured matmul ceiling" in said[0] and "frac_peak_flops_left_out" in meta["ceilings"]
