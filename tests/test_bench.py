"""The benchmark harness on the CPU: tiny shapes, so the whole file runs in well under a minute."""
import csv
import json
import re

import pytest
import torch

from vit_kernels import __main__ as cli
from vit_kernels import bench
from vit_kernels.bench import output, runner
from vit_kernels.bench.case import Case
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
    if _has_matplotlib():
        assert list((out_dir / "plots").glob("*.png"))


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


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
])
def test_unknown_names_list_valid_ones(field, name, valid, capsys):
    with pytest.raises(ValueError, match=rf"unknown .*'{name}'.*{re.escape(valid)}"):
        bench.resolve(bench.Plan(device="cpu", **{field: [name]}))
    # The CLI turns it into an error message and exit status 2, not a traceback.
    assert cli.main(["bench", f"--{field}", name, "--device", "cpu"]) == 2
    assert valid in capsys.readouterr().err


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
