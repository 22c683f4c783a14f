"""The numerics rule of tests/utils.py judges results, so it is tested too: it passes a result
as accurate as PyTorch's whatever the rounding luck, and fails one that is really worse; and
the harness built on it, check(), fails an op wrong in any output, gradient or dtype."""
import pytest
import torch

from .utils import FACTOR, MIN_SAMPLES, Op, Sample, assert_within_pytorch_error, check, opcheck


def _gemm(M, K, N, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    a, b = (torch.randn(shape, generator=gen).to(dtype) for shape in ((M, K), (K, N)))
    return a, b, a.double() @ b.double()


def _fp16_accumulated(a, b, chunk=16):
    """a @ b with a running sum rounded to fp16 after every ``chunk`` terms: the classic worse kernel."""
    acc = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float16)
    for k in range(0, a.shape[1], chunk):
        acc = (acc.float() + a[:, k:k + chunk].float() @ b[k:k + chunk].float()).half()
    return acc


def test_equal_accuracy_passes_whatever_the_rounding_luck():
    # Column sums (a bias gradient) taken in another order are as accurate as PyTorch's, and the
    # rule must say so on every draw at the smallest output it accepts. The largest-element rule
    # it replaced failed 3 of these 300 draws (and 49 of 300 with 3 columns).
    for seed in range(300):
        x = 100 * torch.randn(1000, MIN_SAMPLES, generator=torch.Generator().manual_seed(seed))
        assert_within_pytorch_error(f"seed {seed}", x.flip(0).sum(0), x.sum(0), x.double().sum(0))


def test_fp16_accumulation_fails():
    a, b, exact = _gemm(64, 512, 48, torch.float16, seed=0)
    baseline = (a.float() @ b.float()).half()  # fp32 accumulation, as PyTorch's and our kernels'
    assert_within_pytorch_error("fp32 accumulation", baseline, baseline, exact)
    with pytest.raises(AssertionError, match="fp16 accumulation"):
        assert_within_pytorch_error("fp16 accumulation", _fp16_accumulated(a, b), baseline, exact)


@pytest.mark.parametrize("scale,passes", [(0.5 * FACTOR, True), (1.5 * FACTOR, False)])
def test_error_scaled_past_the_factor_fails(scale, passes):
    # PyTorch's own error pattern, scaled: the bar sits at FACTOR times it.
    a, b, exact = _gemm(64, 300, 40, torch.float32, seed=1)
    baseline = a @ b
    scaled = (exact + scale * (baseline.double() - exact)).float()
    if passes:
        assert_within_pytorch_error("scaled", scaled, baseline, exact)
    else:
        with pytest.raises(AssertionError, match="scaled"):
            assert_within_pytorch_error("scaled", scaled, baseline, exact)


def test_one_wrong_element_in_a_large_output_fails():
    # A dropped term (the last K column missing for one output element), the size of a tile-edge bug.
    a, b, exact = _gemm(197, 1000, 768, torch.float32, seed=2)
    baseline = a @ b
    wrong = baseline.clone()
    wrong[196, 767] -= a[196, -1] * b[-1, 767]
    with pytest.raises(AssertionError, match=r"at \(196, 767\)"):
        assert_within_pytorch_error("dropped term", wrong, baseline, exact)


def test_unwritten_element_fails():
    a, b, exact = _gemm(40, 64, 40, torch.float32, seed=3)
    poisoned = a @ b
    poisoned[3, 5] = float("nan")
    with pytest.raises(AssertionError, match="unwritten"):
        assert_within_pytorch_error("poisoned", poisoned, a @ b, exact)


def test_too_few_elements_is_an_error():
    x = torch.randn(100, 3)
    with pytest.raises(ValueError, match="too few"):
        assert_within_pytorch_error("3 sums", x.sum(0), x.sum(0), x.double().sum(0))


# --- the harness built on the rule: check() fails an op that is wrong anywhere ------------------

class _ScaledGrad(torch.autograd.Function):
    """x * w with d(w) off by ``scale``: a wrong gradient behind a right forward."""

    @staticmethod
    def forward(ctx, x, w, scale):
        ctx.save_for_backward(x, w)
        ctx.scale = scale
        return x * w

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return grad * w, ((grad * x).sum(0) * ctx.scale), None


def _mul(scale=1.0, unwritten=False):
    def call(x, w):
        out = _ScaledGrad.apply(x, w, scale)
        if unwritten:  # a kernel that skips its last row, in a poisoned allocation
            partial = torch.empty_like(out)
            partial[:-1] = out[:-1]
            return partial
        return out
    return call


def _sample():
    return Sample(dict(x=torch.randn(40, 33, requires_grad=True), w=torch.randn(33, requires_grad=True)),
                  views={"x": lambda t: t.t().contiguous().t()})


def test_check_passes_a_right_op():
    [ours] = check(Op(_mul(), lambda x, w: x * w, backend="torch"), _sample())
    assert list(ours) == ["out", "dx", "dw"]


@pytest.mark.parametrize("op,match", [
    (_mul(scale=1.01), "dw: rms"),
    (_mul(unwritten=True), "out: nan .* unwritten"),
    (lambda x, w: (x * w).double(), "out: dtype torch.float64, PyTorch's torch.float32"),
])
def test_check_fails_a_wrong_op(op, match):
    with pytest.raises(AssertionError, match=match):
        check(Op(op, lambda x, w: x * w, backend="torch"), _sample())


def test_opcheck_needs_a_custom_op():
    with pytest.raises(AssertionError, match="called no vit_kernels op"):
        opcheck(Op(_mul(), _mul(), backend="torch"), _sample())
