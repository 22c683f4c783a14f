"""The Triton flash-attention kernels against the PyTorch reference (float64 oracle, 2x rule)."""

import pytest
import torch
from torch import nn

import vit_kernels as vk
from vit_kernels import reference

from .utils import ATTENTION, DEVICE, QKV_ATTENTION, Op, Sample, check, layer_norm_with, opcheck

# (B, H, N, D). A covering subset, not the product of N x D x H x B: the interpreter costs about
# 10 ms per 64x64 tile step, so every N, D, H and B of the issue appears at least once and the
# whole file stays under 3 minutes on 2 cores.
SHAPES = [
    (1, 1, 1, 32),     # a single token: one key, one (masked) tile, softmax of one logit
    (2, 3, 17, 80),    # tail keys inside the first tile; D = 80 pads to 128 lanes
    (1, 2, 197, 64),   # ViT-B/16 at 224 px: 3 full 64-tiles and a 5-token tail
    (2, 1, 257, 32),   # ViT at 256 px: one token past a power of two (a 1-token last tile)
]


def _norm_parameters(D, dtype, which=("q", "k"), bias=True):
    """Random affine parameters of the q/k norms (the default ones/zeros hide weight/bias bugs)."""
    params = {}
    for name in which:
        params[f"{name}_weight"] = (1 + 0.5 * torch.randn(D, device=DEVICE)).to(dtype).requires_grad_()
        if bias:
            params[f"{name}_bias"] = (0.5 * torch.randn(D, device=DEVICE)).to(dtype).requires_grad_()
    return params


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}N{}D{}".format(*s))
@pytest.mark.parametrize("qk_norm", [False, True])
def test_qkv_attention(shape, dtype, qk_norm):
    B, H, N, D = shape
    qkv = torch.randn(B, N, 3 * H * D, device=DEVICE, dtype=dtype, requires_grad=True)
    norms = _norm_parameters(D, dtype) if qk_norm else {}
    check(QKV_ATTENTION, Sample(dict(qkv=qkv, **norms), dict(num_heads=H)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}N{}D{}".format(*s))
def test_attention_strided(shape, dtype):
    B, H, N, D = shape
    # Three layouts the kernel must read through strides: (B, N, H, D) transposed, a slice of a
    # wider last dim, and plain contiguous.
    q = torch.randn(B, N, H, D, device=DEVICE, dtype=dtype).transpose(1, 2)
    k = torch.randn(B, H, N, D + 8, device=DEVICE, dtype=dtype)[..., 3:D + 3]
    v = torch.randn(B, H, N, D, device=DEVICE, dtype=dtype)
    check(ATTENTION, Sample(dict(q=q.requires_grad_(), k=k.requires_grad_(), v=v.requires_grad_())))


@pytest.mark.parametrize("head_dim", [16, 96, 112, 128])
def test_head_dims(head_dim):
    """The ends of the supported range and the other non-powers of two (padded lanes masked)."""
    B, H, N = 1, 2, 33
    q, k, v = (torch.randn(B, H, N, head_dim, device=DEVICE, requires_grad=True) for _ in range(3))
    check(ATTENTION, Sample(dict(q=q, k=k, v=v)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_qkv_attention_unfused_norm(dtype):
    B, H, N, D = 2, 2, 17, 32
    qkv = torch.randn(B, N, 3 * H * D, device=DEVICE, dtype=dtype, requires_grad=True)
    check(QKV_ATTENTION, Sample(dict(qkv=qkv, **_norm_parameters(D, dtype, bias=False)), dict(num_heads=H, rms=True)))


def test_layer_norm_without_affine_and_eps():
    """elementwise_affine=False and a non-default eps reach the kernel (q-norm only, k unnormed)."""
    B, H, N, D = 1, 2, 40, 16  # D = 16: the smallest supported head dim
    qkv = torch.randn(B, N, 3 * H * D, device=DEVICE, requires_grad=True)
    q_norm = nn.LayerNorm(D, eps=1e-2, elementwise_affine=False, device=DEVICE)
    check(QKV_ATTENTION, Sample(dict(qkv=qkv), dict(num_heads=H, q_norm=q_norm)))


def test_identity_norms_are_no_norms():
    """timm's qk_norm=False gives nn.Identity(): the fused path, bit-identical to no norm."""
    B, H, N, D = 1, 2, 17, 32
    qkv = torch.randn(B, N, 3 * H * D, device=DEVICE)
    with vk.use_backend("triton"):
        expected = vk.ops.qkv_attention(qkv, H)
        assert torch.equal(vk.ops.qkv_attention(qkv, H, q_norm=nn.Identity(), k_norm=nn.Identity()), expected)


# --- dropout ----------------------------------------------------------------------------------

def _keep_mask(B, H, N, p, seed):
    """The kernel's keep mask, read back through v = identity: out_ij = p_ij * keep_ij / (1 - p)."""
    torch.manual_seed(seed)
    q, k = torch.randn(2, B, H, N, 64, device=DEVICE)
    eye = torch.eye(N, 64, device=DEVICE).expand(B, H, N, 64)
    with vk.use_backend("triton"):
        out = vk.ops.attention(q, k, eye, dropout_p=p)
    probs = torch.softmax((q * 64 ** -0.5) @ k.transpose(-2, -1), dim=-1)
    keep = out[..., :N] != 0
    # The kept weights are rescaled by 1 / (1 - p), the dropped ones exactly 0.
    torch.testing.assert_close(out[..., :N], torch.where(keep, probs / (1 - p), 0.0), rtol=1e-4, atol=1e-6)
    return keep


def test_dropout_keep_rate():
    p = 0.3
    keep = _keep_mask(2, 3, 64, p, seed=1)  # 24,576 Bernoulli draws: sd of the rate 0.003
    assert abs(keep.float().mean().item() - (1 - p)) < 0.015
    # Rows and columns are not correlated with position (a counter bug would show as stripes).
    assert abs(keep[..., :32].float().mean() - keep[..., 32:].float().mean()) < 0.03
    # A new call draws a new seed from torch's generator, hence a new mask.
    assert (_keep_mask(2, 3, 64, p, seed=2) != keep).any()


@pytest.mark.parametrize("packed", [False, True])
def test_dropout_forward_backward_consistent(packed):
    """Forward and every gradient match the reference with the kernel's own mask (so the backward
    regenerates the forward's mask)."""
    B, H, N, D, p = 1, 2, 40, 64, 0.25
    keep = _keep_mask(B, H, N, p, seed=3)

    def ref(q, k, v):
        probs = torch.softmax((q * D ** -0.5) @ k.transpose(-2, -1), dim=-1)
        return (probs * keep / (1 - p)) @ v

    def kernel(qkv):
        # Replay _keep_mask's draws so this call gets the same Philox seed.
        torch.manual_seed(3)
        torch.randn(2, B, H, N, 64, device=DEVICE)
        if packed:
            return vk.ops.qkv_attention(qkv, H, dropout_p=p)
        return vk.ops.attention(*reference.split_qkv(qkv, H), dropout_p=p).transpose(1, 2).reshape(B, N, -1)

    def masked(qkv):
        return ref(*reference.split_qkv(qkv, H)).transpose(1, 2).reshape(B, N, -1)

    qkv = torch.randn(B, N, 3 * H * D, device=DEVICE, requires_grad=True)
    check(Op(kernel, masked), Sample(dict(qkv=qkv)))


# --- edge values --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_large_logits_do_not_overflow(dtype):
    B, H, N, D = 1, 2, 33, 64
    # |q . k| * scale around 1e4: exp would overflow without the running-max subtraction.
    q, k, v = (torch.randn(B, H, N, D, device=DEVICE) * s for s in (100.0, 100.0, 1.0))
    assert (q.double() @ k.double().transpose(-2, -1) * D ** -0.5).abs().max() > 1e3
    [ours] = check(ATTENTION, Sample(dict(q=q.to(dtype), k=k.to(dtype), v=v.to(dtype))))
    assert torch.isfinite(ours["out"]).all()


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's numpy on NaN
def test_nan_in_gives_nan_out():
    B, H, N, D = 1, 2, 20, 32
    q, k, v = torch.randn(3, B, H, N, D, device=DEVICE)
    q[0, 0, 5, 7] = float("nan")
    with vk.use_backend("triton"):
        out = vk.ops.attention(q, k, v)
    assert torch.isnan(out[0, 0, 5]).all()
    # The NaN stays in its own row: other queries and other heads are untouched.
    assert torch.isfinite(out[0, 0, :5]).all() and torch.isfinite(out[0, 1]).all()


# --- bad input ------------------------------------------------------------------------------------

def test_bad_inputs():
    q = torch.randn(1, 2, 17, 32, device=DEVICE)
    with vk.use_backend("triton"):
        with pytest.raises(ValueError, match="shapes do not match"):
            vk.ops.attention(q, q[:, :1], q)
        with pytest.raises(ValueError, match="k is torch.float16"):
            vk.ops.attention(q, q.half(), q)
        with pytest.raises(ValueError, match="v is .* on meta"):
            vk.ops.attention(q, q, q.to("meta"))
        with pytest.raises(ValueError, match="expected a multiple of 3 \\* num_heads = 9"):
            vk.ops.qkv_attention(torch.randn(1, 17, 192, device=DEVICE), num_heads=3)
        with pytest.raises(ValueError, match="head_dim is 8"):
            vk.ops.qkv_attention(torch.randn(1, 17, 48, device=DEVICE), num_heads=2)
        with pytest.raises(ValueError, match="head_dim is 256"):
            vk.ops.attention(*torch.randn(3, 1, 1, 4, 256, device=DEVICE))
        with pytest.raises(ValueError, match="q must be a floating-point tensor"):
            vk.ops.attention(*[q.to(torch.int32)] * 3)
        with pytest.raises(ValueError, match="head dim .* must be >= 1; got 0"):
            vk.ops.attention(*torch.randn(3, 1, 1, 4, 0, device=DEVICE))
        with pytest.raises(ValueError, match="num_heads must be >= 1"):
            vk.ops.qkv_attention(torch.randn(1, 17, 48, device=DEVICE), num_heads=0)
        with pytest.raises(ValueError, match="dropout_p must be in"):
            vk.ops.attention(q, q, q, dropout_p=1.0)
        with pytest.raises(ValueError, match="expects q's 17"):
            vk.ops.attention(q, q[:, :, :5], q[:, :, :5])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors without the interpreter")
def test_triton_backend_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setattr(vk.backend, "_INTERPRETER", False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 1, 4, 32)
    with vk.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        vk.ops.attention(q, q, q)


# --- torch.library --------------------------------------------------------------------------------

OPCHECK_SAMPLES = {
    # q-norm with weight and bias, no k-norm: the fused norm arguments and their absence.
    "qkv_attention, q-norm": lambda qkv, H, D: (QKV_ATTENTION, Sample(
        dict(qkv=qkv, **_norm_parameters(D, torch.float32, which=("q",))), dict(num_heads=H))),
    "attention, dropout": lambda qkv, H, D: (ATTENTION, Sample(
        dict(zip("qkv", (t.detach().requires_grad_() for t in reference.split_qkv(qkv, H)))), dict(dropout_p=0.3))),
}


@pytest.mark.parametrize("name", list(OPCHECK_SAMPLES))
def test_opcheck(name):
    B, H, N, D = 1, 2, 17, 32
    op, case = OPCHECK_SAMPLES[name](torch.randn(B, N, 3 * H * D, device=DEVICE, requires_grad=True), H, D)
    prefix = name.split(",")[0]
    checked = opcheck(op, case)
    assert checked == [f"vit_kernels.{prefix}_fwd.default", f"vit_kernels.{prefix}_bwd.default"], checked


def test_torch_compile_fullgraph():
    B, H, N, D = 1, 2, 17, 32
    qkv = torch.randn(B, N, 3 * H * D, device=DEVICE, requires_grad=True)
    k_norm = layer_norm_with(*_norm_parameters(D, torch.float32, which=("k",)).values())

    def f(qkv):
        return vk.ops.qkv_attention(qkv, H, k_norm=k_norm).sum()

    # On the CPU the interpreter cannot run Inductor's generated Triton launches, so compile
    # there checks tracing (no graph break) with aot_eager; on a GPU it runs Inductor.
    compiler = "inductor" if DEVICE == "cuda" else "aot_eager"
    with vk.use_backend("triton"):
        compiled = torch.compile(f, fullgraph=True, backend=compiler)
        (g_compiled,) = torch.autograd.grad(compiled(qkv), qkv)
        (g_eager,) = torch.autograd.grad(f(qkv), qkv)
    torch.testing.assert_close(g_compiled, g_eager)


# --- GPU only -------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 3, 577, 64), (1, 2, 1025, 80), (1, 1, 4096, 128), (4, 6, 197, 64)],
                         ids=lambda s: "B{}H{}N{}D{}".format(*s))
@pytest.mark.parametrize("qk_norm", [False, True])
def test_qkv_attention_gpu(shape, dtype, qk_norm):
    test_qkv_attention(shape, dtype, qk_norm)


@pytest.mark.cuda
def test_grid_beyond_65535_heads():
    """B * H = 70,000 programs on grid axis 0 (axes 1 and 2 stop at 65,535)."""
    B, H, N, D = 35000, 2, 5, 16
    q, k, v = torch.randn(3, B, H, N, D, device="cuda", dtype=torch.float16)
    with vk.use_backend("triton"):
        out = vk.ops.attention(q, k, v)
    torch.testing.assert_close(out, reference.attention(q, k, v), atol=2e-3, rtol=2e-3)
