"""add_layer_norm: the Triton kernel (interpreter on CPU) against float64, with the 2x-PyTorch-error rule."""
import contextlib
import itertools

import torch


import pytest

import vit_kernels as vk
from vit_kernels import reference
from vit_kernels.kernels.add_layer_norm import add_layer_norm_config

from .utils import MIN_SAMPLES, assert_within_pytorch_error, poisoned_allocations

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6


def make_inputs(shape, dtype, residual=True, gamma=True, row_scale=True, affine=True, mean=0.0,
                residual_dtype=None, scale_grad=True, param_dtype=None):
    """x, residual, weight, bias, gamma, row_scale for x of ``shape``; absent ones None.

    ``mean`` shifts the residual stream (or x without a residual) to test a large-mean LayerNorm.
    """
    width = shape[-1]
    x = torch.randn(shape, device=DEVICE)
    res = None
    if residual:
        res = (mean + 0.5 * torch.randn(shape, device=DEVICE)).to(residual_dtype or dtype)
    elif mean:
        x = mean + 0.5 * x
    w = b = g = s = None
    if affine:
        w, b = 1 + 0.2 * torch.randn(width, device=DEVICE), 0.2 * torch.randn(width, device=DEVICE)
    if gamma:
        g = 0.5 + torch.rand(width, device=DEVICE)
    if row_scale:
        # DropPath's scale is 0 or 1 / keep; a random one exercises d(row_scale).
        s = torch.rand(shape[0], device=DEVICE) + 0.5 if scale_grad else (torch.rand(shape[0], device=DEVICE) > 0.3) / 0.7
    x, g, s = (None if t is None else t.to(dtype) for t in (x, g, s))
    w, b = (None if t is None else t.to(param_dtype or dtype) for t in (w, b))
    return x, res, w, b, g, s


def run(fn, inputs, exact=False, residual_dtype=None, scale_grad=True, poisoned=False):
    """Forward and backward of ``fn`` on fresh leaves (float64 copies if ``exact``) of ``inputs``.

    Returns [normed, new_residual, *grads]; the upstream gradients are the same on every call.
    """
    leaves = [None if t is None else (t.detach().double() if exact else t.detach()).requires_grad_()
              for t in inputs]
    if leaves[5] is not None and not scale_grad:
        leaves[5].requires_grad_(False)
    if exact and residual_dtype is not None:
        residual_dtype = torch.float64
    x, res, w, b, g, s = leaves
    with poisoned_allocations() if poisoned else contextlib.nullcontext():
        normed, new_res = fn(x, res, w, b, EPS, g, s, residual_dtype)
        gen = torch.Generator(device=DEVICE).manual_seed(1)
        dy = torch.randn(normed.shape, generator=gen, device=DEVICE).to(normed.dtype)
        dr = torch.randn(new_res.shape, generator=gen, device=DEVICE).to(new_res.dtype)
        # Both outputs feed the loss: normed goes to the next sublayer, new_residual to the next block.
        loss = (normed.double() * dy.double()).sum() + (new_res.double() * dr.double()).sum()
        grads = torch.autograd.grad(loss, [t for t in leaves if t is not None and t.requires_grad])
    return [normed, new_res] + list(grads)


def kernel_fn(*args):
    with vk.use_backend("triton"):
        return vk.ops.add_layer_norm(*args)


def check(*input_sets, residual_dtype=None, scale_grad=True):
    """Kernel vs PyTorch vs float64 on each input set; each output and gradient is judged by the
    rule over all sets pooled (several sets: a width too small for the rule on its own).

    d(row_scale) has one element per sample, fewer than the rule needs at most shapes here: it is
    compared where the sets hold MIN_SAMPLES samples or more (test_variants, the (1000, 1) shapes,
    test_leading_shapes, test_small_widths), and row_scale is a constant elsewhere.
    """
    scale_grad = scale_grad and sum(s[5].numel() for s in input_sets if s[5] is not None) >= MIN_SAMPLES
    names = ["normed", "new_residual"] + [f"d{n}" for n, t in zip(("x", "residual", "weight", "bias", "gamma",
                                                                   "row_scale"), input_sets[0])
                                          if t is not None and (n != "row_scale" or scale_grad)]
    pooled = {name: ([], [], []) for name in names}
    for inputs in input_sets:
        ours = run(kernel_fn, inputs, False, residual_dtype, scale_grad, poisoned=True)
        baseline = run(reference.add_layer_norm, inputs, False, residual_dtype, scale_grad)
        exact = run(reference.add_layer_norm, inputs, True, residual_dtype, scale_grad)
        assert ours[1].dtype == baseline[1].dtype, f"new_residual dtype {ours[1].dtype} != {baseline[1].dtype}"
        for name, a, bl, ex in zip(names, ours, baseline, exact):
            assert a.dtype == bl.dtype, f"{name}: dtype {a.dtype} != PyTorch's {bl.dtype}"
            for results, t in zip(pooled[name], (a, bl, ex)):
                results.append(t.flatten())
    for name, (a, bl, ex) in pooled.items():
        assert_within_pytorch_error(name, torch.cat(a), torch.cat(bl), torch.cat(ex))


# Widths of ViTs: 192 (Ti, 3 x 64 chunks), 384 (S, 3 x 128), 768 (B, 3 x 256), 1280 (H, 5 x 256);
# 1000 is not a multiple of any wide power of two (one 1024-wide chunk, 24 masked lanes).
WIDTHS = [192, 384, 768, 1000, 1280]
DTYPES = [torch.float32, torch.float16]
# (1, 1): one row in a mostly masked row block; (2, 197): ViT tokens, 197 prime, so the last row
# block is partial, and row_scale is broadcast over 197 tokens; every width in both dtypes.
# (1000, 1): many programs, row_scale per row; the interpreter spends ~10 s per case here, so
# only the widths that take the three column paths (3 x 64 chunks, one masked 1024 chunk,
# 5 x 256 chunks), in alternating dtypes.
SHAPE_CASES = ([((1, 1), w, d) for w in WIDTHS for d in DTYPES] + [((2, 197), w, d) for w in WIDTHS for d in DTYPES]
               + [((1000, 1), 192, torch.float16), ((1000, 1), 1000, torch.float32),
                  ((1000, 1), 1280, torch.float16)])


@pytest.mark.parametrize("rows,width,dtype", SHAPE_CASES)
def test_shapes_all_factors(rows, width, dtype):
    check(make_inputs((*rows, width), dtype))


# Every combination of residual / gamma / row_scale / affine, on the chunked column path (384 =
# 3 x 128, fp32) and the masked single-chunk path (1000 in 1024 lanes, fp16), over 37 x 3 tokens
# (a row count no block size divides; 37 samples, enough to judge d(row_scale)). With the shape
# sweep above (every factor on) this covers each variant on both paths in both dtypes without the
# full 16 x 5 x 3 x 2 product, which would take the interpreter well past the 3-minute budget.
@pytest.mark.parametrize("width,dtype", [(384, torch.float32), (1000, torch.float16)])
@pytest.mark.parametrize("residual,gamma,row_scale,affine", list(itertools.product([False, True], repeat=4)))
def test_variants(residual, gamma, row_scale, affine, width, dtype):
    check(make_inputs((37, 3, width), dtype, residual, gamma, row_scale, affine))


# -20 + 0.5 * randn: E[h^2] - mean^2 would cancel catastrophically; the chunked widths merge chunk
# statistics (Chan), the single-chunk width centres directly.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [768, 1000])
@pytest.mark.parametrize("residual", [False, True])
def test_large_mean(residual, width, dtype):
    inputs = make_inputs((2, 197, width), dtype, residual=residual, mean=-20.0)
    check(inputs)
    with vk.use_backend("triton"):
        normed, _ = vk.ops.add_layer_norm(*inputs[:4], EPS, *inputs[4:])
    assert normed.float().std().item() > 0.5, "normalised output lost its variance"


# The fp32 residual stream of mixed-precision training: fp16 residual stored in fp32 on request,
# an fp32 residual with an fp16 branch (promoted, as PyTorch does), no residual stored in fp32.
# The LayerNorm then runs on fp32, so its weight and bias are fp32 (PyTorch's CPU LayerNorm
# refuses fp16 parameters on an fp32 input).
@pytest.mark.parametrize("width", [384, 1000])
@pytest.mark.parametrize("residual_dtype,stream_dtype", [(torch.float32, torch.float16),
                                                          (None, torch.float32),
                                                          (torch.float32, None)])
def test_fp32_residual(residual_dtype, stream_dtype, width):
    inputs = make_inputs((2, 197, width), torch.float16, residual=stream_dtype is not None,
                         residual_dtype=stream_dtype, param_dtype=torch.float32)
    check(inputs, residual_dtype=residual_dtype)
    with vk.use_backend("triton"):
        normed, new_res = vk.ops.add_layer_norm(*inputs[:4], EPS, *inputs[4:], residual_dtype=residual_dtype)
    assert normed.dtype == torch.float16 and new_res.dtype == torch.float32


def test_drop_path_scale_without_grad():
    # DropPath: per-sample 0 or 1/keep, no gradient; dropped samples keep their residual exactly.
    inputs = make_inputs((8, 50, 768), torch.float32, scale_grad=False)
    check(inputs, scale_grad=False)
    x, res, w, b, g, s = inputs
    with vk.use_backend("triton"):
        _, new_res = vk.ops.add_layer_norm(x, res, w, b, EPS, g, s)
    dropped = s == 0
    assert dropped.any() and torch.equal(new_res[dropped], res[dropped])


def test_plain_layer_norm_returns_x():
    # residual=None and no factors: new_residual is x itself (no copy is written), as in the reference.
    x, _, w, b, _, _ = make_inputs((2, 197, 384), torch.float32, residual=False, gamma=False, row_scale=False)
    with vk.use_backend("triton"):
        normed, new_res = vk.ops.add_layer_norm(x, None, w, b)
    assert new_res is x
    torch.testing.assert_close(normed, torch.nn.functional.layer_norm(x, (384,), w, b, EPS))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["last-dim stride 2", "transposed"])
def test_strided_inputs(layout, dtype):
    # Non-contiguous x and residual must be read through their strides (or flattened by an explicit
    # copy, for the transposed one); the upstream gradients of `run` are contiguous, those of
    # test_expanded_grad are not.
    shape = (2, 197, 768)
    inputs = list(make_inputs(shape, dtype))
    for i in (0, 1):
        if layout == "last-dim stride 2":
            # NaN in the skipped lanes: reading them would show.
            inputs[i] = torch.stack([inputs[i], torch.full_like(inputs[i], float("nan"))], -1).flatten(-2)[..., ::2]
        else:
            inputs[i] = inputs[i].transpose(1, 2).contiguous().transpose(1, 2)
        assert not inputs[i].is_contiguous()
    check(inputs)


def test_expanded_grad():
    # normed.sum() hands the backward an expanded gradient: every stride 0.
    x, res, w, b, g, s = make_inputs((2, 197, 384), torch.float32)
    leaves = [t.detach().requires_grad_() for t in (x, res, w, b, g, s)]
    with vk.use_backend("triton"):
        normed, new_res = vk.ops.add_layer_norm(leaves[0], leaves[1], leaves[2], leaves[3], EPS, *leaves[4:])
    ours = torch.autograd.grad(normed.sum(), leaves)
    exact = [t.detach().double().requires_grad_() for t in (x, res, w, b, g, s)]
    n64, _ = reference.add_layer_norm(*exact[:4], EPS, *exact[4:])
    for a, e in zip(ours, torch.autograd.grad(n64.sum(), exact)):
        torch.testing.assert_close(a.double(), e, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", [(394, 384), (2, 7, 7, 1000), (3, 1280)])
def test_leading_shapes(shape):
    # 2-D x (row_scale per row) and 4-D x (row_scale per sample, broadcast over 7 x 7 tokens).
    check(make_inputs(shape, torch.float32))


def test_small_widths():
    # Width 1 (var 0: normed = bias) and 17 (a masked single chunk) still match; the per-feature
    # gradients are judged over enough input sets to hold MIN_SAMPLES features.
    for width in (1, 17):
        check(*(make_inputs((2, 5, width), torch.float32) for _ in range(-(-MIN_SAMPLES // width))))


def test_backward_is_deterministic():
    inputs = make_inputs((2, 97, 768), torch.float32)
    first, second = run(kernel_fn, inputs), run(kernel_fn, inputs)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("width,expected", [(768, (16, 256)), (1000, (4, 1024)), (192, (64, 64)),
                                            (1280, (16, 256)), (384, (32, 128)), (1664, (16, 256))])
def test_config_avoids_padding(width, expected):
    block_m, block_n, _ = add_layer_norm_config(width, rows=10_000)
    assert (block_m, block_n) == expected
    assert -(-width // block_n) * block_n - width <= width / 8


def test_config_rejects_bad_width():
    with pytest.raises(ValueError, match="width"):
        add_layer_norm_config(0, rows=1)


def good_args():
    x, res, w, b, g, s = make_inputs((2, 5, 16), torch.float32)
    return dict(x=x, residual=res, weight=w, bias=b, eps=EPS, gamma=g, row_scale=s)


@pytest.mark.parametrize("change,match", [
    (dict(weight=torch.ones(15)), "weight must have shape"),
    (dict(bias=torch.ones(17)), "bias must have shape"),
    (dict(gamma=torch.ones(2, 16)), "gamma must have shape"),
    (dict(row_scale=torch.ones(10)), "row_scale must have shape"),
    (dict(residual=torch.ones(2, 6, 16)), "residual must have shape"),
    (dict(residual=torch.ones(2, 5, 16, dtype=torch.float16)), "residual has dtype"),
    (dict(gamma=torch.ones(16, dtype=torch.float64)), "gamma has dtype"),
    (dict(weight=torch.ones(16, dtype=torch.int64)), "weight has dtype"),
    (dict(weight=torch.ones(16, device="meta")), "weight is on meta"),
    (dict(eps=0.0), "eps must be > 0"),
    (dict(eps=-1e-5), "eps must be > 0"),
    (dict(x=torch.ones(2, 5, 0), residual=None, weight=None, bias=None, gamma=None), "width >= 1"),
    (dict(residual_dtype=torch.int32), "residual_dtype"),
])
def test_bad_input(change, match):
    args = good_args()
    args.update(change)
    with vk.use_backend("triton"), pytest.raises(ValueError, match=match):
        vk.ops.add_layer_norm(**args)


def test_reference_backend_and_implementation():
    args = good_args()
    with vk.use_backend("torch"):
        normed, new_res = vk.ops.add_layer_norm(**args)
        assert vk.ops.implementation("add_layer_norm", DEVICE)[0] == "torch"
    expected = reference.add_layer_norm(**args)
    assert torch.equal(normed, expected[0]) and torch.equal(new_res, expected[1])
    with vk.use_backend("triton"):
        assert vk.ops.implementation("add_layer_norm", DEVICE)[0] == "triton"


def test_opcheck():
    x, res, w, b, g, s = make_inputs((2, 7, 96), torch.float32)
    for t in (x, res, w, b, g, s):
        t.requires_grad_()
    for args in [(x, res, w, b, g, s, EPS, torch.float32, True),
                 (x, None, None, None, None, None, EPS, torch.float32, False)]:
        torch.library.opcheck(torch.ops.vit_kernels.add_layer_norm_fwd, args)


def test_compile_fullgraph():
    # aot_eager traces the op and its registered backward without graph breaks on any device; the
    # inductor backend needs a GPU for the Triton kernel (test_compile_inductor_cuda).
    inputs = make_inputs((2, 197, 384), torch.float32)
    compiled = torch.compile(kernel_fn, fullgraph=True, backend="aot_eager")
    ours = run(compiled, inputs)
    eager = run(kernel_fn, inputs)
    for a, e in zip(ours, eager):
        torch.testing.assert_close(a, e)


@pytest.mark.cuda
def test_compile_inductor_cuda():
    inputs = make_inputs((2, 197, 768), torch.bfloat16)
    compiled = torch.compile(kernel_fn, fullgraph=True)
    for a, e in zip(run(compiled, inputs), run(kernel_fn, inputs)):
        torch.testing.assert_close(a, e)


@pytest.mark.cuda
@pytest.mark.parametrize("width", WIDTHS + [1024, 1408, 1664])
@pytest.mark.parametrize("residual_dtype", [None, torch.float32])
def test_bf16_cuda(width, residual_dtype):
    check(make_inputs((8, 197, width), torch.bfloat16), residual_dtype)
    check(make_inputs((8, 197, width), torch.bfloat16, mean=-20.0), residual_dtype)


@pytest.mark.cuda
def test_many_rows_cuda():
    # 256 x 197 rows (a ViT-B training batch); 4096 x 197 x 192: 12,608 programs on axis 0 and
    # element offsets past 2^27 in every tensor.
    check(make_inputs((256, 197, 768), torch.float16))
    check(make_inputs((4096, 197, 192), torch.float16, gamma=False))
