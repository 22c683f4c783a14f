"""The Triton flash-attention kernels against the PyTorch reference (float64 oracle, 2x rule)."""

import pytest
import torch
import triton
from torch import nn

import vit_kernels as vk
from vit_kernels import reference
from vit_kernels.kernels import attention as attention_kernels

from .utils import (ATTENTION, DEVICE, QKV_ATTENTION, Op, Sample, _qkv_attention, check, layer_norm_with,
                    opcheck)


def _norm_parameters(D, dtype, which=("q", "k"), bias=True):
    """Random affine parameters of the q/k norms (the default ones/zeros hide weight/bias bugs)."""
    params = {}
    for name in which:
        params[f"{name}_weight"] = (1 + 0.5 * torch.randn(D, device=DEVICE)).to(dtype).requires_grad_()
        if bias:
            params[f"{name}_bias"] = (0.5 * torch.randn(D, device=DEVICE)).to(dtype).requires_grad_()
    return params


# --- reading the kernel's dropout mask back -------------------------------------------------------

def _read_keep_mask(B, H, N, D, p, seed, dtype, packed, norms=None):
    """The (B, H, N, N) keep mask of one dropout call of the public op (qkv_attention when ``packed``,
    with ``norms`` {q_weight, q_bias, k_weight, k_bias} fused; attention otherwise) of this shape,
    dtype and seed (torch.manual_seed(seed) just before the call).

    Read back with q = k = 0, so that every logit of a row is equal (a LayerNorm of a zero row is
    its bias, the same for every token) and p_ij = 1 / N whatever the norms, and v = D columns of
    the identity at a time: out_id = keep_{i, start + d} / (N (1 - p)), one call per D keys."""
    keep = torch.zeros(B, H, N, N, dtype=torch.bool, device=DEVICE)
    q_norm = k_norm = None
    if norms:
        q_norm = layer_norm_with(norms["q_weight"].detach(), norms["q_bias"].detach())
        k_norm = layer_norm_with(norms["k_weight"].detach(), norms["k_bias"].detach())
    for start in range(0, N, D):
        width = min(D, N - start)
        cols = torch.arange(width, device=DEVICE)
        eye = torch.zeros(N, D, device=DEVICE, dtype=dtype)
        eye[start + cols, cols] = 1
        with vk.use_backend("triton"):
            if packed:
                qkv = torch.zeros(B, N, 3, H, D, device=DEVICE, dtype=dtype)
                qkv[:, :, 2] = eye[None, :, None, :]
                torch.manual_seed(seed)
                out = vk.ops.qkv_attention(qkv.flatten(2), H, dropout_p=p, q_norm=q_norm, k_norm=k_norm)
                out = out.unflatten(-1, (H, D)).transpose(1, 2)
            else:
                zeros = torch.zeros(B, H, N, D, device=DEVICE, dtype=dtype)
                torch.manual_seed(seed)
                out = vk.ops.attention(zeros, zeros, eye.expand(B, H, N, D), dropout_p=p)
        # Kept weights are 1 / N rescaled by 1 / (1 - p), dropped ones exactly 0.
        scaled = out[..., :width].double() * (N * (1 - p))
        chunk = scaled > 0.5
        torch.testing.assert_close(scaled, chunk.double(), rtol=0, atol=1e-2)
        keep[..., start:start + width] = chunk
    return keep


def _masked_attention(keep):
    """reference.attention with the dropout mask ``keep`` in place of a random one."""
    def attention(q, k, v, scale=None, dropout_p=0.0):
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        probs = torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1)
        if dropout_p > 0:
            probs = probs * keep.to(probs.dtype) / (1 - dropout_p)
        return probs @ v
    return attention


def _masked_qkv_attention(keep):
    """reference.qkv_attention with the dropout mask ``keep``."""
    attention = _masked_attention(keep)

    def qkv_attention(qkv, num_heads, scale=None, dropout_p=0.0, q_norm=None, k_norm=None):
        B, N, _ = qkv.shape
        q, k, v = reference.split_qkv(qkv, num_heads)
        q = q if q_norm is None else q_norm(q)
        k = k if k_norm is None else k_norm(k)
        return attention(q, k, v, scale, dropout_p).transpose(1, 2).reshape(B, N, -1)
    return qkv_attention


def _seeded(fn, seed):
    """fn with torch.manual_seed(seed) just before each call: its dropout seed is the mask's."""
    def call(*args, **kwargs):
        torch.manual_seed(seed)
        return fn(*args, **kwargs)
    return call


def _dropout_ops(keep, seed):
    """(ATTENTION, QKV_ATTENTION) with the kernel seeded as ``_read_keep_mask`` and the reference
    dropping with ``keep``."""
    return (Op(_seeded(vk.ops.attention, seed), _masked_attention(keep)),
            Op(_qkv_attention(_seeded(vk.ops.qkv_attention, seed)), _qkv_attention(_masked_qkv_attention(keep))))


# --- the covering set: every N, head dim, qk-norm, dropout and layout ------------------------------

def _check_case(B, H, N, D, layout, qk_norm, dropout_p, dtype, seed=7):
    """Output and every gradient (dqkv or dq/dk/dv, and the norms' dw, db) through ``check``, whose
    allocations are poisoned, so an unwritten element fails.

    layout: "packed" is qkv_attention on a contiguous (B, N, 3 * H * D) projection, "packed-sliced"
    on a slice of a wider one (rows of 3 * H * D + 8); "strided" is attention on q a transpose of
    (B, N, H, D), k a slice of a wider last dim and v a transpose of (B, H, D, N) (feature stride N).
    qk_norm: fused nn.LayerNorms with random affine parameters (packed layouts only). dropout_p > 0:
    the reference applies the kernel's own mask, read back first."""
    p, dropout = dropout_p, dropout_p > 0
    packed = layout.startswith("packed")
    assert packed or not qk_norm, "qk-norm is a qkv_attention argument"
    norms = _norm_parameters(D, dtype) if qk_norm else {}
    keep = _read_keep_mask(B, H, N, D, p, seed, dtype, packed, norms) if dropout else None
    attention_op, qkv_op = _dropout_ops(keep, seed) if dropout else (ATTENTION, QKV_ATTENTION)
    kwargs = dict(dropout_p=p) if dropout else {}
    if packed:
        C3 = 3 * H * D
        if layout == "packed-sliced":
            qkv = torch.randn(B, N, C3 + 8, device=DEVICE, dtype=dtype)[..., 5:C3 + 5]
        else:
            qkv = torch.randn(B, N, C3, device=DEVICE, dtype=dtype)
        return check(qkv_op, Sample(dict(qkv=qkv.requires_grad_(), **norms), dict(num_heads=H, **kwargs)))
    q = torch.randn(B, N, H, D, device=DEVICE, dtype=dtype).transpose(1, 2)
    k = torch.randn(B, H, N, D + 8, device=DEVICE, dtype=dtype)[..., 3:D + 3]
    v = torch.randn(B, H, D, N, device=DEVICE, dtype=dtype).transpose(-2, -1)
    return check(attention_op, Sample(dict(q=q.requires_grad_(), k=k.requires_grad_(), v=v.requires_grad_()), kwargs))


# Not the product N x D x qk-norm x dropout x layout (5 x 4 x 2 x 2 x 2 = 160 cases, each in two
# dtypes): the interpreter costs about 10 ms per 64 x 64 tile step. Ten cases in which every N
# (1, 16, 17, 197, 257) and every head dim (32, 64, 80, 128) appear at least twice, qk-norm on in
# four and off in six, dropout on in six and off in four, packed in five and strided in five,
# including the awkward ones: N = 1 (one key, softmax of one logit: dq = dk = 0), N = 16 (exactly
# one 16-key tail of a 64-key block), N = 17 (a 1-key tail past 16), N = 197 with head dim 80
# (padded to 128 lanes, 5-token tail of 64-blocks), N = 257 with head dim 128 (a 1-token last
# block, the widest head), qk-norm with dropout (both backward paths in one kernel). qk-norm is an
# argument of qkv_attention only, so the strided cases run without it; one packed case reads a
# sliced (non-contiguous) projection. (B, H) vary so that a head index bug shows.
#
# Dropout p = 0.25 (a rescale 1 / (1 - p) that rounds), except at N = 1, where p = 0.5: there
# PyTorch's dq and dk are exactly 0 (p_11 = 1, ds = p (dp - delta) with delta = dp), while a flash backward
# takes delta = dO . o from the output rounded to the dtype, off from dp by the rounding of
# v / (1 - p): about 1e-4 in float16, which the rule cannot allow against an exact 0. With p = 0.5
# the output 2 v is exact and so is delta.
CASES = [
    # (B, H, N, D, layout, qk_norm, dropout_p)
    (1, 1, 1, 32, "packed", True, 0.0),
    (2, 2, 1, 64, "strided", False, 0.5),
    (1, 2, 16, 128, "packed", False, 0.25),
    (2, 3, 16, 80, "strided", False, 0.0),
    (2, 2, 17, 64, "packed", True, 0.25),
    (1, 2, 17, 128, "strided", False, 0.25),
    (1, 2, 197, 80, "packed-sliced", True, 0.25),
    (1, 2, 197, 32, "strided", False, 0.0),
    (1, 1, 257, 128, "packed", True, 0.0),
    (1, 1, 257, 64, "strided", False, 0.25),
]


def _case_id(case):
    B, H, N, D, layout, qk_norm, dropout_p = case
    return f"B{B}H{H}N{N}D{D}-{layout}" + ("-qknorm" if qk_norm else "") + (f"-dropout{dropout_p}" if dropout_p else "")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_attention_cases(case, dtype):
    _check_case(*case, dtype)


@pytest.mark.parametrize("layout", ["packed", "strided"])
def test_more_heads_than_backward_programs(monkeypatch, layout):
    """The backward's persistent programs each walk several heads, reusing one scratch slot (delta,
    dq^T partials, normalised q): a stale slot would leak one head's sums into the next. Two
    programs for 15 heads, on any device."""
    from vit_kernels.kernels import attention as kernels
    monkeypatch.setattr(kernels, "backward_programs", lambda heads, device: min(heads, 2))
    B, H, N, D = 3, 5, 40, 32
    _check_case(B, H, N, D, layout, layout == "packed", 0.25, torch.float32)


def test_head_dim_tiles():
    """Two tiles where they pad less than one power of two, one tile otherwise."""
    tiles = {d: attention_kernels.head_dim_tiles(d) for d in (16, 17, 24, 32, 40, 48, 64, 72, 80, 96, 100, 112, 128)}
    assert tiles == {16: (16, 0), 17: (32, 0), 24: (32, 0), 32: (32, 0), 40: (32, 16), 48: (32, 16), 64: (64, 0),
                     72: (64, 16), 80: (64, 16), 96: (64, 32), 100: (128, 0), 112: (128, 0), 128: (128, 0)}
    for bad in (15, 129):
        with pytest.raises(ValueError, match="head_dim"):
            attention_kernels.head_dim_tiles(bad)


@pytest.mark.parametrize("head_dim", [16, 48, 72, 96, 112, 128])
def test_head_dims(head_dim):
    """The ends of the supported range and the other non-powers of two: two tiles at 48 (32 + 16),
    72 (64 + 16, 8 lanes past the head dim) and 96 (64 + 32), one padded tile at 112."""
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


# --- determinism of the backward --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed-qknorm", "strided"])
def test_backward_is_deterministic(packed, dtype):
    """Two forward + backward passes on the same inputs and the same seed give bitwise-equal outputs
    and gradients, the norms' weight and bias gradients included (no atomics, partial sums added
    in a fixed order). N = 197: four row and key blocks of 64, several partial slots per head."""
    B, H, N, D, p = 2, 2, 197, 64, 0.25
    if packed:
        leaves = dict(qkv=torch.randn(B, N, 3 * H * D, device=DEVICE, dtype=dtype), **_norm_parameters(D, dtype))
    else:
        leaves = dict(q=torch.randn(B, N, H, D, device=DEVICE, dtype=dtype).transpose(1, 2),
                      k=torch.randn(B, H, N, D, device=DEVICE, dtype=dtype),
                      v=torch.randn(B, H, N, D, device=DEVICE, dtype=dtype))
    dout = torch.randn(B, N, H * D, device=DEVICE, dtype=dtype)

    def forward_backward():
        t = {name: x.detach().requires_grad_() for name, x in leaves.items()}
        torch.manual_seed(123)
        with vk.use_backend("triton"):
            if packed:
                out = vk.ops.qkv_attention(t["qkv"], H, dropout_p=p,
                                           q_norm=layer_norm_with(t["q_weight"], t["q_bias"]),
                                           k_norm=layer_norm_with(t["k_weight"], t["k_bias"]))
            else:
                out = vk.ops.attention(t["q"], t["k"], t["v"], dropout_p=p).transpose(1, 2).reshape(B, N, -1)
            grads = torch.autograd.grad(out, list(t.values()), dout)
        return dict(out=out.detach(), **{f"d{name}": g for name, g in zip(t, grads)})

    first, second = forward_backward(), forward_backward()
    assert list(first) == ["out", *(f"d{name}" for name in leaves)]
    for name in first:
        assert torch.isfinite(first[name]).all() and first[name].abs().sum() > 0, name
        assert torch.equal(first[name], second[name]), f"{name} differs between two identical passes"


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


# Tile configs. The kernels are Triton autotuners, with one config in the interpreter; a test forces
# another by replacing an autotuner's ``configs``. The backward is ``_attention_bwd`` (BLOCK_M
# queries per inner step, BLOCK_N keys per program) or, in the two-kernel backward, ``_attention_bwd_dkdv``
# (the same meaning) and ``_attention_bwd_dq`` (BLOCK_M queries per program, BLOCK_N keys per step):
# whichever of these names the module has is forced.
BACKWARD_KERNELS = ("_attention_bwd", "_attention_bwd_dkdv", "_attention_bwd_dq")


def _tiles(fwd, bwd):
    """{kernel name: triton.Config} with the forward's (BLOCK_M, BLOCK_N) ``fwd`` and the backward's ``bwd``."""
    def config(tile):
        return triton.Config(dict(BLOCK_M=tile[0], BLOCK_N=tile[1]))
    return {"_attention_fwd": config(fwd), **{name: config(bwd) for name in BACKWARD_KERNELS}}


@pytest.fixture
def force_tiles(monkeypatch):
    """force_tiles({kernel name: triton.Config}) makes each named autotuner of the attention kernels
    that exists run that one config (its cache of tuned choices cleared), until the test ends.
    Returns {name: (autotuner, config)} of the kernels forced: the forward and at least one backward."""
    def force(tiles):
        forced = {}
        for name, config in tiles.items():
            kernel = getattr(attention_kernels, name, None)
            if kernel is None:
                continue
            assert hasattr(kernel, "configs") and hasattr(kernel, "cache"), f"{name} is not an autotuner"
            monkeypatch.setattr(kernel, "configs", [config])
            monkeypatch.setattr(kernel, "cache", {})
            monkeypatch.setattr(kernel, "best_config", None, raising=False)
            forced[name] = kernel, config
        assert "_attention_fwd" in forced and set(forced) & set(BACKWARD_KERNELS), sorted(forced)
        return forced
    return force


def _assert_ran(forced):
    """Every forced autotuner launched its forced config (Triton records it as ``best_config``)."""
    for name, (kernel, config) in forced.items():
        assert kernel.best_config is config, f"{name} ran {kernel.best_config}, not the forced {config}"


# Block sizes: powers of two >= 16; (32, 16) splits N = 40 into 2 query blocks and 3 key blocks (an
# 8-key tail) where (64, 64) has one of each.
SMALL, LARGE = (32, 16), (64, 64)


@pytest.mark.parametrize("packed", [False, True], ids=["strided", "packed"])
def test_dropout_mask_independent_of_forward_tiles(force_tiles, packed):
    B, H, N, D, p = 2, 3, 40, 64, 0.3
    masks = []
    for tile in (LARGE, SMALL):
        forced = force_tiles(_tiles(tile, tile))
        masks.append(_read_keep_mask(B, H, N, D, p, 5, torch.float32, packed))
        assert forced["_attention_fwd"][0].best_config is forced["_attention_fwd"][1]
    assert 0.6 < masks[0].float().mean() < 0.8
    assert torch.equal(masks[0], masks[1]), "the keep mask depends on the forward's tiles"


@pytest.mark.parametrize("packed", [False, True], ids=["strided", "packed"])
@pytest.mark.parametrize("fwd,bwd", [(LARGE, LARGE), (SMALL, SMALL), (LARGE, SMALL), (SMALL, LARGE)],
                         ids=lambda t: "{}x{}".format(*t))
def test_dropout_backward_regenerates_mask_whatever_the_tiles(force_tiles, fwd, bwd, packed):
    """Output and gradients under forced forward and backward tiles match the reference with the
    mask read back under the default tiles: the backward regenerates the forward's mask."""
    B, H, N, D, p, seed = 1, 2, 40, 64, 0.25, 9
    keep = _read_keep_mask(B, H, N, D, p, seed, torch.float32, packed)
    forced = force_tiles(_tiles(fwd, bwd))
    attention_op, qkv_op = _dropout_ops(keep, seed)
    if packed:
        qkv = torch.randn(B, N, 3 * H * D, device=DEVICE, requires_grad=True)
        check(qkv_op, Sample(dict(qkv=qkv), dict(num_heads=H, dropout_p=p)))
    else:
        q, k, v = (torch.randn(B, H, N, D, device=DEVICE, requires_grad=True) for _ in range(3))
        check(attention_op, Sample(dict(q=q, k=k, v=v), dict(dropout_p=p)))
    _assert_ran(forced)


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
        # Past 131,072 tokens the dropout counters would wrap (expanded views: no memory).
        long = torch.randn(1, 1, 1, 32, device=DEVICE).expand(1, 1, 131073, 32)
        with pytest.raises(ValueError, match="dropout_p > 0 with 131073 tokens"):
            vk.ops.attention(long, long, long, dropout_p=0.1)
        with pytest.raises(ValueError, match="dropout_p > 0 with 131073 tokens"):
            vk.ops.qkv_attention(torch.randn(1, 1, 96, device=DEVICE).expand(1, 131073, 96), 1, dropout_p=0.1)
    assert attention_kernels.dropout_counters_fit(131072) and not attention_kernels.dropout_counters_fit(131073)


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
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("shape", [(8, 12, 197, 64), (2, 16, 257, 80), (2, 4, 1025, 128)],
                         ids=lambda s: "B{}H{}N{}D{}".format(*s))
@pytest.mark.parametrize("variant", [("packed", False, 0.0), ("packed", True, 0.1), ("strided", False, 0.1)],
                         ids=lambda v: v[0] + ("-qknorm" if v[1] else "") + ("-dropout" if v[2] else ""))
def test_attention_gpu(shape, dtype, variant):
    _check_case(*shape, *variant, dtype)


@pytest.mark.cuda
def test_grid_beyond_65535_heads():
    """B * H = 70,000 programs on grid axis 0 (axes 1 and 2 stop at 65,535)."""
    B, H, N, D = 35000, 2, 5, 16
    q, k, v = torch.randn(3, B, H, N, D, device="cuda", dtype=torch.float16)
    with vk.use_backend("triton"):
        out = vk.ops.attention(q, k, v)
    torch.testing.assert_close(out, reference.attention(q, k, v), atol=2e-3, rtol=2e-3)
