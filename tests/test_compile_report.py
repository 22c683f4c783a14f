"""The sm_90 compile report: its launch recording, its reading of the SASS, and its rules.

The compiled cases run in tests/sm90_probe.py, a process without TRITON_INTERPRET: this
session's kernels are interpreted, and compiling needs the real JIT.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import vit_kernels as vk
from vit_kernels import backend

pytest.importorskip("triton")
from vit_kernels.compile_report import report, sm90  # noqa: E402  (after the skip: it imports triton)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compiling_env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.fixture(scope="module")
def probe():
    done = subprocess.run([sys.executable, "-m", "tests.sm90_probe"], env=_compiling_env(),
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_pipelined_gemm_holds_every_stage_in_shared_memory(probe):
    # Triton's pipeliner keeps num_stages (A, B) tile pairs in shared memory: with the
    # launch's specialisation it pipelines, so the report sees the kernel that really runs.
    # The fc1 launch reads its operands through TMA descriptors (UTMALDG); its pointer variant
    # through cp.async (LDGSTS).
    for path, load in (("", "UTMALDG"), ("pointer_", "LDGSTS")):
        for stages in (3, 4):
            row = probe[f"{path}stages{stages}"]["row"]
            assert row["error"] is None
            assert row["shared"] >= stages * probe[f"{path}stages{stages}"]["tile_bytes"], row
            assert row["loads"][load] > 0 and row["matrix"]["HGMMA"] > 0, row
            assert row["violations"] == [], row
        assert probe[f"{path}stages4"]["row"]["shared"] > probe[f"{path}stages3"]["row"]["shared"]


def test_without_the_launch_attributes_the_pipeliner_gives_up(probe):
    # Why specialisation is taken from Triton's binder: without the divisibility attributes
    # the same kernel compiles to something else: through pointers no cp.async or fewer
    # stages; through descriptors (which carry their own strides) another epilogue.
    guessed, real = probe["pointer_without_attrs"], probe["pointer_stages4"]["row"]
    assert guessed["error"] is None
    assert guessed["loads"]["LDGSTS"] < real["loads"]["LDGSTS"] or guessed["shared"] < real["shared"], guessed
    guessed, real = probe["without_attrs"], probe["stages4"]["row"]
    assert guessed["error"] is None
    assert guessed["instructions"] != real["instructions"], (guessed, real)


def test_spilling_kernel_is_caught(probe):
    row = probe["spilling"]
    assert row["stack"] > 0 and row["local_loads"] + row["local_stores"] > 0, row
    assert any(v.startswith("spills") for v in row["violations"]), row


def test_bf16_dot_runs_on_wgmma_only_with_a_full_warpgroup(probe):
    four, two = probe["dot_w4"], probe["dot_w2"]
    assert four["matrix"]["HGMMA"] > 0 and four["matrix"]["HMMA"] == 0 and four["violations"] == [], four
    # wgmma needs 4 warps: with 2 the dot falls back to mma.sync, which the gate rejects.
    assert two["matrix"]["HGMMA"] == 0 and two["matrix"]["HMMA"] > 0, two
    assert any("wgmma expected" in v for v in two["violations"]), two


def test_records_the_launches_of_forward_and_backward():
    from vit_kernels.kernels import gemm as kernels

    meta = dict(device="meta", dtype=torch.float16)
    x = torch.empty(197, 64, **meta, requires_grad=True)
    w = torch.empty(256, 64, **meta, requires_grad=True)
    b = torch.empty(256, **meta, requires_grad=True)
    with vk.use_backend("triton"), backend.record_launches() as saved:
        vk.ops.linear_gelu(x, w, b).sum().backward()
    with vk.use_backend("triton"), backend.record_launches() as recomputed:
        vk.ops.linear_gelu(x, w, b, recompute=True).sum().backward()

    def epilogue(launch):
        """(activation id, EPILOGUE, the epilogue flags set)."""
        flags = {k for k, v in launch.kwargs.items() if v is True} & {"HAS_BIAS", "STORE_PRE", "COL_SUM"}
        return launch.kwargs["ACT"], getattr(launch.kwargs["EPILOGUE"], "value", launch.kwargs["EPILOGUE"]), flags

    def mnk(launch):
        return launch.args[6:9]

    gelu = kernels.ACT_IDS["gelu"]
    split = kernels.split_k(256, 64, 197, kernels.num_programs(x.device))
    # Saved pre-activation: the forward GEMM stores it; the backward forms dY * act'(pre) in one
    # elementwise pass, then dX and dW are plain GEMMs (db is a PyTorch sum, no launch).
    assert [launch.kernel for launch in saved] == [kernels.gemm, kernels._act_grad_product, kernels.gemm, kernels.gemm]
    fwd, product, dx, dw = saved
    assert epilogue(fwd) == (gelu, 0, {"HAS_BIAS", "STORE_PRE"}) and mnk(fwd) == (197, 256, 64)
    assert product.kwargs["ACT"] == gelu and product.args[3] == 197 * 256
    assert epilogue(dx) == (0, 0, set()) and mnk(dx) == (197, 64, 256) and dx.kwargs["SPLIT_K"] == 1
    # dW = dPre^T @ x, split over the 197 tokens where the output has too few tiles (float32 slices).
    assert epilogue(dw) == (0, 0, set()) and mnk(dw) == (256, 64, 197) and dw.kwargs["SPLIT_K"] == split
    assert dw.args[2].shape == ((split, 256, 64) if split > 1 else (256, 64))
    # Recomputed: no pre-activation stored; the backward's first GEMM recomputes it and writes
    # dY * act'(pre) from its epilogue (EPILOGUE_GRAD_OF_ACC), then the same dX and dW.
    assert [launch.kernel for launch in recomputed] == [kernels.gemm] * 4
    fwd, grad, dx, dw = recomputed
    assert epilogue(fwd) == (gelu, 0, {"HAS_BIAS"})
    assert epilogue(grad) == (gelu, 1, {"HAS_BIAS"}) and mnk(grad) == (197, 256, 64)
    assert epilogue(dx) == (0, 0, set()) and mnk(dx) == (197, 64, 256)
    assert epilogue(dw) == (0, 0, set()) and mnk(dw) == (256, 64, 197) and dw.kwargs["SPLIT_K"] == split
    # The arguments are what a GPU launch would get: here the meta tensors, with their shapes.
    assert saved[0].args[0].shape == (197, 64) and saved[0].args[0].device.type == "meta"


SASS = """
        Function : kernel
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDGSTS.E.BYPASS.128 [R37], desc[UR14][R8.64], P5 ;
        /*0020*/                   FFMA R2, R3, R4, R5 ;
        /*0030*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0040*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0050*/              @!P5 BRA 0x20 ;
        /*0060*/                   LDL R9, [R1] ;
        /*0070*/               @P0 BRA 0x0 ;
        /*0080*/                   EXIT ;
        /*0090*/                   BRA 0x90 ;
"""


def test_reads_instruction_counts_and_the_main_loop():
    sass = sm90.read_sass(SASS)
    assert sass["instructions"] == 10
    assert sass["counts"]["HGMMA"] == 2 and sass["counts"]["LDGSTS"] == 1 and sass["counts"]["LDL"] == 1
    # Two loops hold the HGMMAs: the inner one (0x20..0x50, 4 instructions) is the main loop;
    # the trap loop after EXIT (a branch to itself) is no loop.
    assert sass["main_loop"] == 4


@pytest.mark.parametrize("warps, registers, shared, expected", [
    (8, 175, 131072, 1),      # shared memory and registers both allow one
    (4, 128, 32768, 4),       # registers: 4 warps x 128 x 32 = 16K of 64K
    (4, 32, 0, 16),           # warps: 64 per SM
    (1, 16, 0, 32),           # the 32-block limit
])
def test_ctas_per_sm(warps, registers, shared, expected):
    assert sm90.ctas_per_sm(warps, registers, shared) == expected


def _row(**changes):
    row = dict(error=None, shared=1024, stack=0, local_loads=0, local_stores=0,
               matrix=dict(HGMMA=8, HMMA=0, FFMA=0), dots=[["bf16", "tf32"]])
    return {**row, **changes}


def test_gate_rules():
    assert report.violations(_row()) == []
    assert "shared memory" in report.violations(_row(shared=228 * 1024))[0]
    assert report.violations(_row(stack=16))[0].startswith("spills")
    assert "wgmma expected" in report.violations(_row(matrix=dict(HGMMA=0, HMMA=4, FFMA=0)))[0]
    # A full-precision float32 dot has no tensor-core form: FFMA is what it should be.
    assert report.violations(_row(matrix=dict(HGMMA=0, HMMA=0, FFMA=900), dots=[["f32", "ieee"]])) == []
    assert report.violations(_row(error="CompilationError: out of resources"))[0].startswith("does not compile")


def test_gemm_main_loop_rule():
    # The K loop of every GEMM variant stays within 1.2x the plainest one's with the same config:
    # an activation derivative applied as A is loaded (the old fc1 backward) is caught.
    def gemm_row(config, loop):
        return dict(kernel=report.GEMM_KERNEL, config=config, error=None, main_loop=loop, violations=[])
    rows = [gemm_row("a", 72), gemm_row("a", 86), gemm_row("a", 87), gemm_row("b", 500),
            dict(gemm_row("a", 900), kernel="vit_kernels.kernels.attention._attention_fwd")]
    report._check_gemm_main_loops(rows)
    assert [bool(r["violations"]) for r in rows] == [False, False, True, False, False]
    assert "over 1.2x" in rows[2]["violations"][0]


_WAVES = """
import json
from vit_kernels.compile_report import launches, report
scenario = [s for s in launches.scenarios() if s.name == report.WAVE_SCENARIO]
print(json.dumps(report.waves(launches.record(scenario, ("bf16",)))))
"""


def test_weight_gradient_waves():
    # ViT-B/16 training at batch 256 on 132 SMs: both weight gradients (768 x 3072 outputs, K = 50432
    # tokens) are split until the last round of the persistent launch keeps >= 90% of the SMs busy.
    # In a compiling process: the interpreter has its own tile and program count.
    done = subprocess.run([sys.executable, "-c", _WAVES], env=_compiling_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    weight_grads = [w for w in rows if w["weight_grad"]]
    assert {(w["M"], w["N"]) for w in weight_grads} == {(768, 3072), (3072, 768)}
    for w in weight_grads:
        assert w["split_k"] > 1 and w["programs"] == 132 and w["last_wave"] >= report.MIN_LAST_WAVE, w
        assert not w["violations"]
    # Unsplit, the 72 tiles of 128 x 256 would leave 60 of the 132 SMs idle.
    assert [w["tiles"] // w["split_k"] for w in weight_grads] == [72] * len(weight_grads)


_ATTENTION_COUNTS = """
import json
from vit_kernels.compile_report import launches, report
names = [launches.attention_scenario_name(shape) for shape in launches.ATTENTION_SHAPES]
scenarios = [s for s in launches.scenarios() if s.name in names]
print(json.dumps(report.attention_counts(launches.record(scenarios, ("bf16",)))))
"""


def test_attention_work_and_traffic():
    # At batch 256: the backward reads q, k, v, o, dO and lse once and writes dq, dk, dv once, and
    # its scratch fits in L2. MMA work, counted here by hand: full 64-row blocks over 16-token
    # tails (197 -> 192 + 16 = 208), the last tokens as one 16-token tail over 64-token blocks
    # (197 -> 256), in the forward's 2 GEMMs and the backward's 5. Above 64 lanes the backward
    # pads its last key block (197 -> 256 keys over 208 queries) and runs 6 GEMMs (the second s^T
    # of dv's own pass); 80 lanes are 64 + 16, except in tails and dq^T, where the second tile is
    # 64 lanes wide (wgmma's M).
    done = subprocess.run([sys.executable, "-c", _ATTENTION_COUNTS], env=_compiling_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    tailed_197 = 192 * 208 + 16 * 256     # N = 197: full-block rows x tailed tokens + tail x padded
    expected = {  # (B * H, N, D): MMA work over 7 N^2 D
        (3072, 197, 64): 7 * 64 * tailed_197 / (7 * 197**2 * 64),
        (4096, 257, 80): (2 * (80 * 256 * 272 + 128 * 16 * 320) + (5 * 80 + 128) * 320 * 272) / (7 * 257**2 * 80),
        (1536, 197, 128): (2 * 128 * tailed_197 + 6 * 128 * 256 * 208) / (7 * 197**2 * 128),
    }
    assert {(r["heads"], r["N"], r["D"]) for r in rows} == set(expected)
    for row in rows:
        assert row["programs"] == 264, row
        assert row["traffic"] <= report.MAX_BACKWARD_TRAFFIC and not row["violations"], row
        assert row["scratch_mb"] * 2**20 < report.L2_BYTES
        assert row["mma_work"] == round(expected[row["heads"], row["N"], row["D"]], 3), row
    assert max(r["mma_work"] for r in rows if r["D"] == 64) <= report.MAX_MMA_WORK


def test_cli_refuses_the_interpreter(capsys):
    from vit_kernels.__main__ import main
    if not backend.interpreter_enabled():
        pytest.skip("this session compiles kernels")
    assert main(["compile-report"]) == 2
    assert "TRITON_INTERPRET" in capsys.readouterr().err


def test_cli_check_and_json(tmp_path):
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "vit_kernels", "compile-report", "--kernels", "_act_grad_product",
                           "--check", "--json", str(out), "--markdown", str(tmp_path / "report.md")],
                          env=_compiling_env(), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["failures"] == [] and data["rows"]
    assert {r["kernel"] for r in data["rows"]} == {"vit_kernels.kernels.gemm._act_grad_product"}
    # From real scenarios; bf16 and fp16 only, since float32 runs cuBLAS outside the interpreter
    # (backend.float32_dots_on_kernels).
    labels = {v["label"].split(" | ")[0] for v in data["variants"]}
    assert {label.split()[0] for label in labels} == {"bf16", "fp16"}, labels
    assert data["cold_start"]["compilations"] > 0
    assert "## Gate" in (tmp_path / "report.md").read_text()


def test_gate_fails_on_a_spilling_kept_config_not_on_a_pruned_one():
    def row(variant_id, stack, kept=True):
        return dict(kernel="k", variant=f"v{variant_id}", variant_id=variant_id, config="c", kept=kept,
                    violations=[f"spills: {stack} B stack"] if stack else [])
    variants = [dict(id=0, kernel="k", label="v0"), dict(id=1, kernel="k", label="v1")]
    clean = report.Report({}, [row(0, 0), row(1, 0), row(1, 8, kept=False)], variants, {}, [], [])
    assert clean.failures() == []
    spilling = report.Report({}, [row(0, 0), row(1, 8)], variants, {}, [], [])
    assert [(f["variant"], f["violations"]) for f in spilling.failures()] == \
        [("v1", ["spills: 8 B stack"]), ("v1", ["no kept config passes"])]
