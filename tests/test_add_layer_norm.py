"""add_layer_norm: the Triton kernel (interpreter on CPU) against float64, with the 2x-PyTorch-error rule."""
import itertools

import pytest
import torch

import vit_kernels as vk
from vit_kernels import reference
from vit_kernels.kernels.add_layer_norm import add_layer_norm_config

from .utils import ADD_LAYER_NORM, DEVICE, MIN_SAMPLES, Sample, check, opcheck, poisoned_allocations, run

EPS = 1e-6


def sample(shape, dtype, residual=True, gamma=True, row_scale=True, affine=True, mean=0.0,
           stream_dtype=None, scale_grad=True, param_dtype=None, residual_dtype=None):
    """x, residual, weight, bias, gamma, row_scale for x of ``shape`` (absent ones None), each
    requiring grad; ``residual_dtype`` is the op's argument, ``stream_dtype`` the residual's dtype.

    ``mean`` shifts the residual stream (or x without a residual) to test a large-mean LayerNorm.
    """
    width = shape[-1]
    x = torch.randn(shape, device=DEVICE)
    res = None
    if residual:
        res = (mean + 0.5 * torch.randn(shape, device=DEVICE)).to(stream_dtype or dtype)
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
    tensors = dict(x=x, residual=res, weight=w, bias=b, gamma=g, row_scale=s)
    for name, t in tensors.items():
        if t is not None:
            t.requires_grad_(name != "row_scale" or scale_grad)
    return Sample(tensors, dict(eps=EPS, residual_dtype=residual_dtype))


def check_pooled(*samples):
    """check() of every output and gradient, judged over the samples pooled (several samples: a
    width too small for the rule on its own). Both outputs feed the loss: normed goes to the next
    sublayer, new_residual to the next block.

    d(row_scale) has one element per sample, fewer than the rule needs at most shapes here: it is
    compared where the samples hold MIN_SAMPLES samples or more (test_variants, the (1000, 1) shapes,
    test_leading_shapes, test_small_widths), and row_scale is a constant elsewhere.
    """
    scales = [s.tensors["row_scale"] for s in samples if s.tensors["row_scale"] is not None]
    if sum(t.numel() for t in scales) < MIN_SAMPLES:
        for t in scales:
            t.requires_grad_(False)
    return check(ADD_LAYER_NORM, *samples)


def kernel_fn(**args):
    with vk.use_backend("triton"):
        return vk.ops.add_layer_norm(**args)


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
    check_pooled(sample((*rows, width), dtype))


# Every combination of residual / gamma / row_scale / affine, on the chunked column path (384 =
# 3 x 128, fp32) and the masked single-chunk path (1000 in 1024 lanes, fp16), over 37 x 3 tokens
# (a row count no block size divides; 37 samples, enough to judge d(row_scale)). With the shape
# sweep above (every factor on) this covers each variant on both paths in both dtypes without the
# full 16 x 5 x 3 x 2 product, which would take the interpreter well past the 3-minute budget.
@pytest.mark.parametrize("width,dtype", [(384, torch.float32), (1000, torch.float16)])
@pytest.mark.parametrize("residual,gamma,row_scale,affine", list(itertools.product([False, True], repeat=4)))
def test_variants(residual, gamma, row_scale, affine, width, dtype):
    check_pooled(sample((37, 3, width), dtype, residual, gamma, row_scale, affine))


# -20 + 0.5 * randn: E[h^2] - mean^2 would cancel catastrophically; the chunked widths merge chunk
# statistics (Chan), the single-chunk width centres directly.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [768, 1000])
@pytest.mark.parametrize("residual", [False, True])
def test_large_mean(residual, width, dtype):
    [ours] = check_pooled(sample((2, 197, width), dtype, residual=residual, mean=-20.0))
    assert ours["normed"].float().std().item() > 0.5, "normalised output lost its variance"


# The fp32 residual stream of mixed-precision training: fp16 residual stored in fp32 on request,
# an fp32 residual with an fp16 branch (promoted, as PyTorch does), no residual stored in fp32.
# The LayerNorm then runs on fp32, so its weight and bias are fp32 (PyTorch's CPU LayerNorm
# refuses fp16 parameters on an fp32 input).
@pytest.mark.parametrize("width", [384, 1000])
@pytest.mark.parametrize("residual_dtype,stream_dtype", [(torch.float32, torch.float16),
                                                          (None, torch.float32),
                                                          (torch.float32, None)])
def test_fp32_residual(residual_dtype, stream_dtype, width):
    [ours] = check_pooled(sample((2, 197, width), torch.float16, residual=stream_dtype is not None,
                                 stream_dtype=stream_dtype, param_dtype=torch.float32, residual_dtype=residual_dtype))
    assert ours["normed"].dtype == torch.float16 and ours["new_residual"].dtype == torch.float32


def test_drop_path_scale_without_grad():
    # DropPath: per-sample 0 or 1/keep, no gradient; dropped samples keep their residual exactly.
    case = sample((8, 50, 768), torch.float32, scale_grad=False)
    [ours] = check_pooled(case)
    dropped = case.tensors["row_scale"] == 0
    residual = case.tensors["residual"].detach()
    assert dropped.any() and torch.equal(ours["new_residual"][dropped], residual[dropped])


def test_plain_layer_norm_returns_x():
    # residual=None and no factors: new_residual is x itself (no copy is written), as in the reference.
    case = sample((2, 197, 384), torch.float32, residual=False, gamma=False, row_scale=False)
    x, _, w, b, _, _ = case.tensors.values()
    with vk.use_backend("triton"):
        normed, new_res = vk.ops.add_layer_norm(x, None, w, b)
    assert new_res is x
    torch.testing.assert_close(normed, torch.nn.functional.layer_norm(x, (384,), w, b, EPS))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["last-dim stride 2", "transposed"])
def test_strided_inputs(layout, dtype):
    # Non-contiguous x and residual must be read through their strides (or flattened by an explicit
    # copy, for the transposed one); the upstream gradients here are contiguous, those of
    # test_expanded_grad are not.
    case = sample((2, 197, 768), dtype)
    for name in ("x", "residual"):
        t = case.tensors[name].detach()
        if layout == "last-dim stride 2":
            # NaN in the skipped lanes: reading them would show.
            t = torch.stack([t, torch.full_like(t, float("nan"))], -1).flatten(-2)[..., ::2]
        else:
            t = t.transpose(1, 2).contiguous().transpose(1, 2)
        assert not t.is_contiguous()
        case.tensors[name] = t.requires_grad_()
    check_pooled(case)


def test_expanded_grad():
    # normed.sum() hands the backward an expanded gradient: every stride 0.
    # d(row_scale) has 2 elements, too few for the numerics rule: every gradient is compared
    # within a tolerance instead.
    shape = (2, 197, 384)
    case = sample(shape, torch.float32)
    case.cotangents = [torch.ones(()).expand(shape), torch.zeros(()).expand(shape)]
    with vk.use_backend("triton"), poisoned_allocations():
        ours = run(vk.ops.add_layer_norm, case)
    exact = run(reference.add_layer_norm, case, oracle=True)
    for a, e in zip(ours[2:], exact[2:]):
        torch.testing.assert_close(a.double(), e, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", [(394, 384), (2, 7, 7, 1000), (3, 1280)])
def test_leading_shapes(shape):
    # 2-D x (row_scale per row) and 4-D x (row_scale per sample, broadcast over 7 x 7 tokens).
    check_pooled(sample(shape, torch.float32))


def test_small_widths():
    # Width 1 (var 0: normed = bias) and 17 (a masked single chunk) still match; the per-feature
    # gradients are judged over enough input sets to hold MIN_SAMPLES features.
    for width in (1, 17):
        check_pooled(*(sample((2, 5, width), torch.float32) for _ in range(-(-MIN_SAMPLES // width))))


def test_backward_is_deterministic():
    case = sample((2, 97, 768), torch.float32)
    first, second = run(kernel_fn, case), run(kernel_fn, case)
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
    tensors = sample((2, 5, 16), torch.float32).tensors
    return dict({name: None if t is None else t.detach() for name, t in tensors.items()}, eps=EPS)


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


def test_reference_backend_runs_the_reference():
    args = good_args()
    with vk.use_backend("torch"):
        normed, new_res = vk.ops.add_layer_norm(**args)
    expected = reference.add_layer_norm(**args)
    assert torch.equal(normed, expected[0]) and torch.equal(new_res, expected[1])


@pytest.mark.parametrize("factors", [True, False])
def test_opcheck(factors):
    # Every factor with every gradient (the forward and backward ops); a plain LayerNorm in inference.
    case = sample((2, 7, 96), torch.float32, residual=factors, gamma=factors, row_scale=factors, affine=factors)
    if not factors:
        case.tensors["x"].requires_grad_(False)
    checked = opcheck(ADD_LAYER_NORM, case)
    assert checked == ["vit_kernels.add_layer_norm_fwd.default"] + (
        ["vit_kernels.add_layer_norm_bwd.default"] if factors else []), checked


def test_compile_fullgraph():
    # aot_eager traces the op and its registered backward without graph breaks on any device; the
    # inductor backend needs a GPU for the Triton kernel (test_compile_inductor_cuda).
    case = sample((2, 197, 384), torch.float32)
    compiled = torch.compile(kernel_fn, fullgraph=True, backend="aot_eager")
    ours = run(compiled, case)
    eager = run(kernel_fn, case)
    for a, e in zip(ours, eager):
        torch.testing.assert_close(a, e)


@pytest.mark.cuda
def test_compile_inductor_cuda():
    case = sample((2, 197, 768), torch.bfloat16)
    compiled = torch.compile(kernel_fn, fullgraph=True)
    for a, e in zip(run(compiled, case), run(kernel_fn, case)):
        torch.testing.assert_close(a, e)


@pytest.mark.cuda
@pytest.mark.parametrize("width", WIDTHS + [1024, 1408, 1664])
@pytest.mark.parametrize("residual_dtype", [None, torch.float32])
def test_bf16_cuda(width, residual_dtype):
    check_pooled(sample((8, 197, width), torch.bfloat16, residual_dtype=residual_dtype))
    check_pooled(sample((8, 197, width), torch.bfloat16, mean=-20.0, residual_dtype=residual_dtype))


@pytest.mark.cuda
def test_many_rows_cuda():
    # 256 x 197 rows (a ViT-B training batch); 4096 x 197 x 192: 12,608 programs on axis 0 and
    # element offsets past 2^27 in every tensor.
    check_pooled(sample((256, 197, 768), torch.float16))
    check_pooled(sample((4096, 197, 192), torch.float16, gamma=False))
