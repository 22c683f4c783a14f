"""Regression tests of issue #13: inputs that once gave a silently wrong answer, an out-of-bounds
read or a crash deep inside; each now computes the right result or raises a clear error."""
import os
import subprocess
import sys
import threading

import pytest
import torch

import vit_kernels as vk
from vit_kernels import backend, reference
from vit_kernels.kernels import attention as attention_kernels

from .utils import ADD_LAYER_NORM, DEVICE, LINEAR, QKV_ATTENTION, Sample, check, poisoned_allocations

needs_interpreter = pytest.mark.skipif(not backend.interpreter_enabled(), reason="the Triton interpreter's limits")


# --- 1. strided, expanded and offset 1-D parameters -------------------------------------------------

def _views(base: torch.Tensor, width: int):
    """Three non-contiguous (width,) views of ``base``: stepped, expanded (stride 0), offset."""
    return {"stepped": base[: 2 * width : 2], "expanded": base[:1].expand(width), "offset": base[1 : width + 1]}


@pytest.mark.parametrize("view", ["stepped", "expanded", "offset"])
@pytest.mark.parametrize("param", ["weight", "bias", "gamma", "row_scale"])
def test_add_layer_norm_strided_parameters(param, view):
    # row_scale's gradient has one element per sample: enough samples for the numerics rule.
    B, N, C = (40, 3, 40) if param == "row_scale" else (3, 11, 40)
    x, residual = torch.randn(B, N, C, device=DEVICE), torch.randn(B, N, C, device=DEVICE)
    size = B if param == "row_scale" else C
    base = (1 + 0.3 * torch.randn(2 * size + 1, device=DEVICE))
    tensors = dict(x=x, residual=residual, weight=None, bias=None, gamma=None, row_scale=None)
    tensors[param] = base
    for t in (x, residual, base):
        t.requires_grad_()
    # d<param> is base's gradient, through the view.
    check(ADD_LAYER_NORM, Sample(tensors, dict(eps=1e-6), views={param: lambda b: _views(b, size)[view]}))


@pytest.mark.parametrize("view", ["stepped", "expanded", "offset"])
@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_linear_strided_bias(activation, view):
    x, weight = torch.randn(5, 33, 32, device=DEVICE), torch.randn(24, 32, device=DEVICE) / 32 ** 0.5
    base = torch.randn(49, device=DEVICE)
    tensors = {name: t.requires_grad_() for name, t in dict(x=x, weight=weight, bias=base).items()}
    check(LINEAR, Sample(tensors, dict(activation=activation), views={"bias": lambda b: _views(b, 24)[view]}))


@pytest.mark.parametrize("view", ["stepped", "expanded", "offset"])
def test_qk_norm_strided_parameters(view):
    B, N, H, D = 2, 37, 2, 32
    qkv = torch.randn(B, N, 3 * H * D, device=DEVICE)
    bases = dict(q_weight=1 + 0.3 * torch.randn(2 * D + 1, device=DEVICE),
                 q_bias=0.3 * torch.randn(2 * D + 1, device=DEVICE),
                 k_weight=1 + 0.3 * torch.randn(2 * D + 1, device=DEVICE),
                 k_bias=0.3 * torch.randn(2 * D + 1, device=DEVICE))
    views = {name: lambda b: _views(b, D)[view] for name in bases}
    # The k-norm's bias stays stepped: one bias added to every key shifts each row's scores
    # by a constant, so the gradient of an expanded (shared) k bias is exactly 0 and its
    # error only rounding noise of a cancellation.
    views["k_bias"] = lambda b: _views(b, D)["stepped"]
    tensors = {name: t.requires_grad_() for name, t in dict(qkv=qkv, **bases).items()}
    check(QKV_ATTENTION, Sample(tensors, dict(num_heads=H), views=views))


# --- 2. the qk-norm partial sums do not depend on which configs ran before --------------------------

class _ConfigsInSequence:
    """Stands in for an autotuned backward kernel: runs the jitted kernel once per config on the
    same arguments, as the autotuner's trials do before the winner's run (the last config)."""

    def __init__(self, autotuned, configs):
        self.fn, self.configs = autotuned.fn, configs

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            for config in self.configs:
                meta = dict(kwargs, **config)
                self.fn[grid(meta) if callable(grid) else grid](*args, **meta)
        return run


@pytest.mark.skipif(DEVICE == "cuda", reason="calls the jitted kernels directly, as the interpreter runs them")
@pytest.mark.parametrize("blocks", [(64, 128), (128, 64)], ids=["small-then-large", "large-then-small"])
def test_qk_norm_gradients_whatever_configs_ran_before(monkeypatch, blocks):
    # Both block sizes of the backward: keys per block (the k-norm's sums) and queries per step.
    configs = [{"BLOCK_M": size, "BLOCK_N": size} for size in blocks]
    monkeypatch.setattr(attention_kernels, "_attention_bwd",
                        _ConfigsInSequence(attention_kernels._attention_bwd, configs))
    B, N, H, D = 1, 197, 2, 32  # 197 rows: 3 blocks of 64 and a tail, 1 block of 128 and a tail
    qkv = torch.randn(B, N, 3 * H * D, device=DEVICE)
    norms = dict(q_weight=1 + 0.3 * torch.randn(D), q_bias=0.3 * torch.randn(D),
                 k_weight=1 + 0.3 * torch.randn(D), k_bias=0.3 * torch.randn(D))
    tensors = {name: t.requires_grad_() for name, t in dict(qkv=qkv, **norms).items()}
    check(QKV_ATTENTION, Sample(tensors, dict(num_heads=H)))


# --- 3. bfloat16 dots in the interpreter are refused, not computed wrongly -------------------------

@needs_interpreter
def test_bfloat16_dots_refused_in_interpreter():
    x, w = torch.randn(4, 32, dtype=torch.bfloat16), torch.randn(16, 32, dtype=torch.bfloat16)
    q = torch.randn(1, 2, 8, 32, dtype=torch.bfloat16)
    model = vk.create_model("vit_tiny_patch16_224", img_size=32, depth=1)
    calls = {"linear": lambda: vk.ops.linear(x, w), "linear_gelu": lambda: vk.ops.linear_gelu(x, w),
             "mlp": lambda: vk.ops.mlp(x, w, None, w.t()),
             "attention": lambda: vk.ops.attention(q, q, q),
             "qkv_attention": lambda: vk.ops.qkv_attention(torch.randn(1, 8, 96, dtype=torch.bfloat16), 1)}
    with vk.use_backend("triton"):
        for op, call in calls.items():
            with pytest.raises(RuntimeError, match=f"{op}: bfloat16 on the Triton interpreter"):
                call()
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="bfloat16"):
            model(torch.randn(1, 3, 32, 32))
    # The reference computes them.
    with vk.use_backend("torch"):
        assert torch.isfinite(vk.ops.linear(x, w)).all()


# --- 4. add_layer_norm: the same function as PyTorch's LayerNorm on every input ----------------------

@pytest.mark.parametrize("width", [3, 197, 768, 1000, 5000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_layer_norm_constant_rows_are_exact(width, dtype):
    x = torch.full((5, width), 100.3, device=DEVICE, dtype=dtype)
    residual = torch.full((5, width), -3.7, device=DEVICE, dtype=dtype)
    bias = torch.randn(width, device=DEVICE, dtype=dtype)
    with vk.use_backend("triton"), poisoned_allocations():
        normed, _ = vk.ops.add_layer_norm(x, residual, None, bias, eps=1e-6)
    assert torch.equal(normed, bias.expand_as(normed))  # (h - mean) is exactly 0, as in PyTorch


def test_add_layer_norm_overflowed_variance_is_nan():
    x = torch.randn(4, 32, device=DEVICE) * 1e30  # (h - mean)^2 overflows float32
    with vk.use_backend("triton"):
        normed, _ = vk.ops.add_layer_norm(x, None, None, torch.ones(32, device=DEVICE))
    assert torch.isnan(normed).all()
    assert torch.isnan(torch.nn.functional.layer_norm(x, (32,), None, torch.ones(32, device=DEVICE))).all()


# --- 5, 6. the backend choice: per thread, and clear errors from the environment ---------------------

def test_use_backend_is_per_thread():
    default = vk.get_backend()
    entered, release = threading.Event(), threading.Event()
    seen = {}

    def holder():
        with vk.use_backend("torch"):
            seen["holder"] = vk.get_backend()
            entered.set()
            release.wait(10)
        seen["holder after"] = vk.get_backend()

    thread = threading.Thread(target=holder)
    thread.start()
    entered.wait(10)
    seen["other"] = vk.get_backend()  # while the holder is inside its block
    with vk.use_backend("triton"):
        release.set()
        thread.join(10)
        seen["other inside"] = vk.get_backend()  # the holder's exit does not touch this thread
    assert seen == {"holder": "torch", "other": default, "other inside": "triton", "holder after": default}
    assert vk.get_backend() == default


def test_set_backend_is_the_default_under_use_backend():
    default = vk.get_backend()
    try:
        with vk.use_backend("torch"):
            vk.set_backend("triton")
            assert vk.get_backend() == "torch"  # the block's choice wins inside it
        assert vk.get_backend() == "triton"
    finally:
        vk.set_backend(default)


def _python(code: str, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("VIT_KERNELS_BACKEND", "TRITON_INTERPRET")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**environment, **env}, timeout=300)


def test_bad_backend_environment_variable_is_named():
    result = _python("import vit_kernels", VIT_KERNELS_BACKEND="bogus")
    assert result.returncode != 0
    assert "VIT_KERNELS_BACKEND='bogus'" in result.stderr and "'auto'" in result.stderr


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU tensors")
def test_interpreter_enabled_after_import_is_a_clear_error():
    result = _python("import os, torch, vit_kernels as vk\n"
                     "os.environ['TRITON_INTERPRET'] = '1'\n"
                     "with vk.use_backend('triton'):\n"
                     "    vk.ops.add_layer_norm(torch.randn(2, 8), None, None, None)")
    assert result.returncode != 0
    assert "TRITON_INTERPRET=1 was set after vit_kernels was imported" in result.stderr, result.stderr[-2000:]


# --- 7. empty and impossible attention shapes ---------------------------------------------------------

@pytest.mark.parametrize("backend_name", ["triton", "torch"])
@pytest.mark.parametrize("shape", [(0, 5), (2, 0)], ids=["B0", "N0"])
def test_qkv_attention_empty(backend_name, shape):
    qkv = torch.randn(*shape, 3 * 2 * 16, device=DEVICE, requires_grad=True)
    with vk.use_backend(backend_name):
        out = vk.ops.qkv_attention(qkv, num_heads=2)
        out.sum().backward()
    assert out.shape == (*shape, 32) and qkv.grad.shape == qkv.shape


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_attention_without_head_dim_is_a_value_error(backend_name):
    with vk.use_backend(backend_name), pytest.raises(ValueError, match="head dim .* must be >= 1; got 0"):
        vk.ops.attention(*torch.randn(3, 1, 2, 4, 0, device=DEVICE))
    with vk.use_backend(backend_name), pytest.raises(ValueError, match="head dim .* must be >= 1; got 0"):
        vk.ops.qkv_attention(torch.randn(1, 4, 0, device=DEVICE), num_heads=2)


# --- 9. double backward and float64: one rule for every op ------------------------------------------

def _kernel_ops():
    """Every kernel op as a callable of float inputs of ``dtype`` that require grad."""
    def inputs(dtype):
        x = torch.randn(2, 40, 32, device=DEVICE, dtype=dtype, requires_grad=True)
        w = (torch.randn(24, 32, device=DEVICE, dtype=dtype) / 32 ** 0.5).requires_grad_()
        qkv = torch.randn(2, 40, 96, device=DEVICE, dtype=dtype, requires_grad=True)
        return x, w, qkv
    return {
        "add_layer_norm": lambda x, w, qkv: vk.ops.add_layer_norm(x, x, w[0], None)[0],
        "linear": lambda x, w, qkv: vk.ops.linear(x, w),
        "linear_gelu": lambda x, w, qkv: vk.ops.linear_gelu(x, w),
        # fc2 = fc1^T (a transposed view): 32 -> 24 -> 32 features.
        "mlp": lambda x, w, qkv: vk.ops.mlp(x, w, w[:, 0], w.t(), w[0]),
        "attention": lambda x, w, qkv: vk.ops.attention(*qkv.unflatten(-1, (3, 1, 32)).permute(2, 0, 3, 1, 4)),
        "qkv_attention": lambda x, w, qkv: vk.ops.qkv_attention(qkv, 1),
    }, inputs


@pytest.mark.parametrize("op", list(_kernel_ops()[0]))
def test_double_backward_is_refused_with_the_op_name(op):
    fn, inputs = _kernel_ops()
    x, w, qkv = inputs(torch.float32)
    with vk.use_backend("triton"):
        out = fn[op](x, w, qkv)
        with pytest.raises(RuntimeError, match=rf"vit_kernels.ops.{op}: double backward .*use_backend\('torch'\)"):
            torch.autograd.grad(out.square().sum(), [x, w, qkv], create_graph=True, allow_unused=True)
    with vk.use_backend("torch"):  # what the message says to do
        out = fn[op](x, w, qkv)
        grads = torch.autograd.grad(out.square().sum(), [x, w, qkv], create_graph=True, allow_unused=True)
        used = [g for g in grads if g is not None]
        torch.autograd.grad(sum(g.square().sum() for g in used), [x, w, qkv], allow_unused=True)


def test_patch_embed_double_backward_matches_the_reference():
    # Its backward is PyTorch ops on the saved inputs, so autograd differentiates it again.
    x = torch.randn(2, 3, 8, 12, device=DEVICE, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, 4, 4, device=DEVICE, dtype=torch.float64, requires_grad=True)
    second = []
    for fn in (vk.ops.patch_embed, reference.patch_embed):
        gx, gw = torch.autograd.grad(fn(x, w).square().sum(), [x, w], create_graph=True)
        second.append(torch.autograd.grad(gx.square().sum() + gw.square().sum(), [x, w]))
    for ours, theirs in zip(*second):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("op", list(_kernel_ops()[0]))
def test_float64_runs_the_reference_on_every_backend(op):
    fn, inputs = _kernel_ops()
    args = inputs(torch.float64)
    with vk.use_backend("torch"):
        expected = fn[op](*args)
    with vk.use_backend("triton"):
        assert torch.equal(fn[op](*args), expected)


# --- 10. dtype mixes the docstring allows, on both backends --------------------------------------------

@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_add_layer_norm_mixed_dtypes(backend_name):
    x, residual = torch.randn(4, 40, device=DEVICE).half(), torch.randn(4, 40, device=DEVICE)
    weight, bias = torch.randn(40, device=DEVICE).half(), torch.randn(40, device=DEVICE)
    exact_normed, exact_residual = reference.add_layer_norm(x.double(), residual.double(), weight.double(),
                                                            bias.double())
    with vk.use_backend(backend_name):
        normed, new_residual = vk.ops.add_layer_norm(x, residual, weight, bias)
    assert normed.dtype == torch.float16 and new_residual.dtype == torch.float32
    torch.testing.assert_close(new_residual.double(), exact_residual, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(normed.double(), exact_normed, rtol=2e-3, atol=2e-3)
