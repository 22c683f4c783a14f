"""The Triton flash-attention kernels against the PyTorch reference (float64 oracle, 2x rule)."""

import pytest
import torch
from torch import nn

import vit_kernels as vk
from vit_kernels import reference
from vit_kernels.ops import _attention as attention_op

from .utils import assert_within_pytorch_error, poisoned_allocations

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (B, H, N, D). A covering subset, not the product of N x D x H x B: the interpreter costs about
# 10 ms per 64x64 tile step, so every N, D, H and B of the issue appears at least once and the
# whole file stays under 3 minutes on 2 cores.
SHAPES = [
    (1, 1, 1, 32),     # a single token: one key, one (masked) tile, softmax of one logit
    (2, 3, 17, 80),    # tail keys inside the first tile; D = 80 pads to 128 lanes
    (1, 2, 197, 64),   # ViT-B/16 at 224 px: 3 full 64-tiles and a 5-token tail
    (2, 1, 257, 32),   # ViT at 256 px: one token past a power of two (a 1-token last tile)
]


def _randomised(norm: nn.LayerNorm) -> nn.LayerNorm:
    """A LayerNorm with random affine parameters (the default ones/zeros hide weight/bias bugs)."""
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn_like(norm.weight))
        norm.bias.copy_(0.5 * torch.randn_like(norm.bias))
    return norm


def _copy_to(norm, dtype):
    return None if norm is None else _copy_module(norm, dtype)


def _copy_module(module, dtype):
    clone = type(module)(module.normalized_shape, eps=module.eps).to(DEVICE, dtype)
    clone.load_state_dict(module.state_dict())
    return clone


def _parameters(*modules):
    return [p for m in modules if m is not None for p in m.parameters()]


def _run(fn, inputs, modules, grad_out):
    """fn(*inputs, *modules) and the gradients of <out, grad_out> w.r.t. inputs and module parameters."""
    out = fn(*inputs, *modules)
    grads = torch.autograd.grad(out, [*inputs, *_parameters(*modules)], grad_out.to(out.dtype))
    return out, grads


def _check_against_reference(op, ref, inputs, modules, names):
    """Run op on the kernel path (poisoned outputs) and the reference in the same dtype and in float64."""
    exact_inputs = [x.detach().double().requires_grad_() for x in inputs]
    exact_modules = [_copy_to(m, torch.float64) for m in modules]
    exact_out = ref(*exact_inputs, *exact_modules)
    grad_out = torch.randn_like(exact_out)
    exact = _run(ref, exact_inputs, exact_modules, grad_out)
    baseline = _run(ref, inputs, modules, grad_out)
    with vk.use_backend("triton"), poisoned_allocations():
        actual = _run(op, inputs, modules, grad_out)
    for name, a, b, e in zip(["out", *names], [actual[0], *actual[1]], [baseline[0], *baseline[1]],
                             [exact[0], *exact[1]]):
        assert_within_pytorch_error(name, a, b, e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}N{}D{}".format(*s))
@pytest.mark.parametrize("qk_norm", [False, True])
def test_qkv_attention(shape, dtype, qk_norm):
    B, H, N, D = shape
    qkv = torch.randn(B, N, 3 * H * D, device=DEVICE, dtype=dtype, requires_grad=True)
    norms = [_randomised(nn.LayerNorm(D)).to(DEVICE, dtype) if qk_norm else None for _ in range(2)]
    names = ["dqkv"] + (["dq_norm.weight", "dq_norm.bias", "dk_norm.weight", "dk_norm.bias"] if qk_norm else [])

    def op(qkv, q_norm, k_norm):
        return vk.ops.qkv_attention(qkv, H, q_norm=q_norm, k_norm=k_norm)

    def ref(qkv, q_norm, k_norm):
        return reference.qkv_attention(qkv, H, q_norm=q_norm, k_norm=k_norm)

    _check_against_reference(op, ref, [qkv], norms, names)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}N{}D{}".format(*s))
def test_attention_strided(shape, dtype):
    B, H, N, D = shape
    # Three layouts the kernel must read through strides: (B, N, H, D) transposed, a slice of a
    # wider last dim, and plain contiguous.
    q = torch.randn(B, N, H, D, device=DEVICE, dtype=dtype).transpose(1, 2)
    k = torch.randn(B, H, N, D + 8, device=DEVICE, dtype=dtype)[..., 3:D + 3]
    v = torch.randn(B, H, N, D, device=DEVICE, dtype=dtype)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    _check_against_reference(vk.ops.attention, reference.attention, inputs, [], ["dq", "dk", "dv"])


@pytest.mark.parametrize("head_dim", [16, 96, 112, 128])
def test_head_dims(head_dim):
    """The ends of the supported range and the other non-powers of two (padded lanes masked)."""
    B, H, N = 1, 2, 33
    inputs = [torch.randn(B, H, N, head_dim, device=DEVICE, requires_grad=True) for _ in range(3)]
    _check_against_reference(vk.ops.attention, reference.attention, inputs, [], ["dq", "dk", "dv"])


class _RMSNorm(nn.Module):
    """A norm the kernel does not fuse (not an nn.LayerNorm): applied in PyTorch."""

    def __init__(self, normalized_shape, eps=1e-6):
        super().__init__()
        self.normalized_shape, self.eps = normalized_shape, eps
        self.weight = nn.Parameter(1 + 0.5 * torch.randn(normalized_shape))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_qkv_attention_unfused_norm(dtype):
    B, H, N, D = 2, 2, 17, 32
    qkv = torch.randn(B, N, 3 * H * D, device=DEVICE, dtype=dtype, requires_grad=True)
    norms = [_RMSNorm(D).to(DEVICE, dtype), _RMSNorm(D).to(DEVICE, dtype)]

    def op(qkv, q_norm, k_norm):
        return vk.ops.qkv_attention(qkv, H, q_norm=q_norm, k_norm=k_norm)

    def ref(qkv, q_norm, k_norm):
        return reference.qkv_attention(qkv, H, q_norm=q_norm, k_norm=k_norm)

    names = ["dqkv", "dq_norm.weight", "dk_norm.weight"]
    _check_against_reference(op, ref, [qkv], norms, names)


def test_layer_norm_without_affine_and_eps():
    """elementwise_affine=False and a non-default eps reach the kernel (q-norm only, k unnormed)."""
    B, H, N, D = 1, 2, 40, 16  # D = 16: the smallest supported head dim
    qkv = torch.randn(B, N, 3 * H * D, device=DEVICE, requires_grad=True)
    q_norm = nn.LayerNorm(D, eps=1e-2, elementwise_affine=False).to(DEVICE)
    exact = reference.qkv_attention(qkv.double(), H, q_norm=q_norm.double())
    baseline = reference.qkv_attention(qkv, H, q_norm=q_norm.float())
    with vk.use_backend("triton"):
        assert_within_pytorch_error("out", vk.ops.qkv_attention(qkv, H, q_norm=q_norm), baseline, exact)


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

    qkv = torch.randn(B, N, 3 * H * D, device=DEVICE, requires_grad=True)
    grad_out = torch.randn(B, N, H * D, device=DEVICE, dtype=torch.float64)
    results = {}
    for name, x in (("exact", qkv.detach().double().requires_grad_()), ("baseline", qkv), ("actual", qkv)):
        if name == "actual":
            # Replay _keep_mask's draws so this call gets the same Philox seed.
            torch.manual_seed(3)
            torch.randn(2, B, H, N, 64, device=DEVICE)
            with vk.use_backend("triton"):
                if packed:
                    out = vk.ops.qkv_attention(x, H, dropout_p=p)
                else:
                    out = vk.ops.attention(*reference.split_qkv(x, H), dropout_p=p)
                    out = out.transpose(1, 2).reshape(B, N, -1)
        else:
            out = ref(*reference.split_qkv(x, H)).transpose(1, 2).reshape(B, N, -1)
        results[name] = (out, *torch.autograd.grad(out, x, grad_out.to(x.dtype)))
    for i, name in enumerate(("out", "dqkv")):
        assert_within_pytorch_error(name, results["actual"][i], results["baseline"][i], results["exact"][i])


# --- edge values --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_large_logits_do_not_overflow(dtype):
    B, H, N, D = 1, 2, 33, 64
    # |q . k| * scale around 1e4: exp would overflow without the running-max subtraction.
    q, k, v = (torch.randn(B, H, N, D, device=DEVICE) * s for s in (100.0, 100.0, 1.0))
    exact = reference.attention(q.double(), k.double(), v.double())
    baseline = reference.attention(*(t.to(dtype) for t in (q, k, v)))
    with vk.use_backend("triton"):
        out = vk.ops.attention(*(t.to(dtype) for t in (q, k, v)))
    assert (q.double() @ k.double().transpose(-2, -1) * D ** -0.5).abs().max() > 1e3
    assert torch.isfinite(out).all()
    assert_within_pytorch_error("out", out, baseline, exact)


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


def test_implementation_tells_the_truth():
    with vk.use_backend("triton"):
        assert vk.ops.implementation("attention", DEVICE)[0] == "triton"
    with vk.use_backend("torch"):
        assert vk.ops.implementation("attention", DEVICE)[0] == "torch"


# --- torch.library --------------------------------------------------------------------------------

def test_opcheck():
    B, H, N, D = 1, 2, 17, 32
    qkv = torch.randn(B, N, 3 * H * D, device=DEVICE, requires_grad=True)
    w, b = torch.randn(2, D, device=DEVICE, requires_grad=True)
    q, k, v = (t.detach().requires_grad_() for t in reference.split_qkv(qkv, H))
    with vk.use_backend("triton"):
        torch.library.opcheck(attention_op.qkv_attention_fwd_op, (qkv, H, D ** -0.5, 0.0, None, w, b, 1e-5,
                                                                  None, None, 0.0))
        torch.library.opcheck(attention_op.attention_fwd_op, (q, k, v, 0.3, 0.0, None, True))
        # The backward op has no derivative of its own (no double backward): plain tensors.
        qkv, w, b = qkv.detach(), w.detach(), b.detach()
        out, lse = attention_op.qkv_attention_fwd_op(qkv, H, D ** -0.5, 0.0, None, w, b, 1e-5, None, None, 0.0)
        torch.library.opcheck(attention_op.qkv_attention_bwd_op, (torch.randn_like(out), qkv, out, lse, H,
                                                                  D ** -0.5, 0.0, None, w, b, 1e-5, None, None, 0.0))


def test_torch_compile_fullgraph():
    B, H, N, D = 1, 2, 17, 32
    qkv = torch.randn(B, N, 3 * H * D, device=DEVICE, requires_grad=True)
    k_norm = _randomised(nn.LayerNorm(D)).to(DEVICE)

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
