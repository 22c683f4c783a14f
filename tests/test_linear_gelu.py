"""vk.ops.linear / vk.ops.linear_gelu (the Triton GEMM) against float64, with PyTorch's own error as the bar."""

import pytest
import torch

import vit_kernels as vk
from vit_kernels import reference

from .utils import DEVICE, LINEAR, ArgumentSpy, Op, Sample, check, opcheck


ACTIVATIONS = ("none",) + reference.ACTIVATIONS

SHAPES = [  # (leading shape of x, K, N)
    ((3, 197), 100, 300),  # M = 3 * 197 tokens: no tile multiple anywhere; K = 100 ends mid K-step
    ((1,), 64, 64),        # a single row: every tile but one row is masked
    ((2, 65), 33, 129),    # one past a tile multiple in M, K and N
]


def sample(lead, K, N, dtype, activation="none", bias=True, requires_grad=True, **kwargs):
    """x (*lead, K), weight (N, K) and bias (N,) (or None) in ``dtype``; ``kwargs``: the op's other arguments."""
    x = torch.randn(*lead, K, device=DEVICE)
    # nn.Linear's scale keeps the pre-activation O(1), where the activations are non-linear.
    w = torch.randn(N, K, device=DEVICE) * max(K, 1) ** -0.5
    b = torch.randn(N, device=DEVICE) if bias else None
    x, w, b = (t if t is None else t.to(dtype).requires_grad_(requires_grad) for t in (x, w, b))
    return Sample(dict(x=x, weight=w, bias=b), dict(activation=activation, **kwargs))


@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lead,K,N", SHAPES)
def test_forward_backward(lead, K, N, dtype, activation, has_bias):
    check(LINEAR, sample(lead, K, N, dtype, activation, has_bias))


@pytest.mark.cuda  # the interpreter has no bfloat16 arithmetic
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("lead,K,N", SHAPES + [
    ((1000,), 768, 3072),  # ViT-B fc1 at a batch whose M = 1000 is no tile multiple
    ((1000,), 3072, 768),  # and its fc2
    ((2, 257), 1280, 5120),  # ViT-H/14 fc1, 257 tokens
])
def test_bfloat16_and_large_shapes(lead, K, N, activation, recompute):
    if activation == "none" and recompute:
        pytest.skip("recompute only concerns an activation")
    for dtype in (torch.bfloat16, torch.float16):
        check(LINEAR, sample(lead, K, N, dtype, activation, recompute=recompute))


@pytest.mark.parametrize("activation", reference.ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_recompute_pre_activation(dtype, activation):
    # (2, 65) tokens, K = 33, N = 129: the recompute GEMM's epilogue sees every masked edge.
    check(LINEAR, sample((2, 65), 33, 129, dtype, activation, recompute=True))


@pytest.mark.parametrize("activation", reference.ACTIVATIONS)
def test_saturated_activations(activation):
    # Pre-activations of |x| up to ~150: the sigmoid's e^-z overflows float32 below z = -88, where
    # the derivative must come out 0, not NaN (inf * 0), and above z = 2 where 1 - s would cancel.
    case = sample((2, 65), 33, 129, torch.float32, activation)
    case.tensors["weight"] = (case.tensors["weight"].detach() * 40).requires_grad_()
    check(LINEAR, case)


@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_strided_operands(activation):
    # x and W as transposed views, the gradient expanded along a (stride 0) dimension:
    # the kernel reads every stride instead of assuming row-major.
    K, M, N = 48, 70, 96
    x = torch.randn(K, M, device=DEVICE).t().requires_grad_()
    w = (torch.randn(K, N, device=DEVICE) * K ** -0.5).t().requires_grad_()
    b = torch.randn(N, device=DEVICE).requires_grad_()
    grad = torch.randn(1, N, device=DEVICE).expand(M, N)
    assert not x.is_contiguous() and not w.is_contiguous() and grad.stride(0) == 0
    check(LINEAR, Sample(dict(x=x, weight=w, bias=b), dict(activation=activation), cotangents=[grad]))


def test_non_flattenable_leading_dims():
    # x (B, N, K) permuted from (N, B, K): reshape to (B * N, K) must copy; the result keeps x's leading shape.
    x = torch.randn(7, 3, 40, device=DEVICE).permute(1, 0, 2).requires_grad_()
    w = (torch.randn(56, 40, device=DEVICE) * 40 ** -0.5).requires_grad_()
    b = torch.randn(56, device=DEVICE).requires_grad_()
    check(LINEAR, Sample(dict(x=x, weight=w, bias=b), dict(activation="gelu")))


@pytest.mark.parametrize("frozen", ["x", "weight", "weight+bias"])
def test_partial_gradients(frozen):
    # A frozen input gets no gradient and the others still match: the first layer's image
    # tokens, a frozen fc1 with a trained bias (bias tuning), a frozen layer.
    case = sample((2, 33), 40, 72, torch.float32, "gelu")
    for name in frozen.split("+"):
        case.tensors[name].requires_grad_(False)
    [ours] = check(LINEAR, case)
    assert {"dx", "dweight", "dbias"} - set(ours) == {f"d{name}" for name in frozen.split("+")}


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.cuda)])
@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_autocast(activation, dtype):
    # As nn.Linear under autocast: fp32 parameters and input computed in the autocast dtype,
    # gradients back in fp32 (the harness checks each dtype against nn.Linear's). On the CPU fp16
    # autocast runs the kernel in the interpreter.
    case = sample((3, 40), 48, 80, torch.float32, activation)
    case.autocast = dtype
    [ours] = check(LINEAR, case)
    assert ours["out"].dtype == dtype and ours["dx"].dtype == torch.float32


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("compiler,dtype,lead,width,hidden", [
    # backend="eager": Dynamo captures the whole MLP (validation, autocast query, reshape, op call)
    # without a graph break, on any device.
    ("eager", torch.float32, (2, 9), 32, 64),
    # Inductor decomposes the triton_op into its kernels: interpreted ones cannot be traced.
    pytest.param("inductor", torch.float16, (2, 197), 64, 256, marks=pytest.mark.cuda),
])
def test_torch_compile_fullgraph(compiler, dtype, lead, width, hidden, recompute):
    x, w1, b1 = sample(lead, width, hidden, dtype).tensors.values()
    _, w2, b2 = sample((1,), hidden, width, dtype).tensors.values()

    def mlp(x, w1, b1, w2, b2):
        return vk.ops.linear(vk.ops.linear_gelu(x, w1, b1, recompute=recompute), w2, b2)

    with vk.use_backend("triton"):
        y = torch.compile(mlp, fullgraph=True, backend=compiler)(x, w1, b1, w2, b2)
        grads = torch.autograd.grad(y.float().square().sum(), (x, w1, b1, w2, b2))
        y_eager = mlp(x, w1, b1, w2, b2)
        grads_eager = torch.autograd.grad(y_eager.float().square().sum(), (x, w1, b1, w2, b2))
    torch.testing.assert_close(y, y_eager)
    for g, ge in zip(grads, grads_eager):
        torch.testing.assert_close(g, ge)


@pytest.mark.parametrize("M,K,N", [(0, 32, 64), (4, 0, 64), (4, 32, 0)])
def test_empty_dimensions(M, K, N):
    # No tokens, no input features, no output features: shapes and gradients of an empty sum.
    x, w, b = sample((M,), K, N, torch.float32).tensors.values()
    with vk.use_backend("triton"):
        y = vk.ops.linear_gelu(x, w, b)
        dx, dw, db = torch.autograd.grad(y, (x, w, b), torch.randn_like(y))
    assert y.shape == (M, N) and dx.shape == x.shape and dw.shape == w.shape and db.shape == b.shape
    assert torch.equal(dw, torch.zeros_like(dw)) and torch.equal(dx, torch.zeros_like(dx))
    if K == 0:
        torch.testing.assert_close(y, reference.activation(b.detach().expand(M, N), "gelu"))


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("grad_mode", ["train", "no_grad", "frozen"])
def test_pre_activation_kept_only_for_a_backward(grad_mode, recompute):
    # Inference (no_grad, or nothing requiring grad) must not spend an (M, N) buffer on it.
    x, w, b = sample((5,), 32, 64, torch.float32, requires_grad=grad_mode == "train").tensors.values()
    spy = ArgumentSpy(torch.ops.vit_kernels.linear_act_fwd.default, 4)
    with vk.use_backend("triton"), torch.set_grad_enabled(grad_mode != "no_grad"), spy:
        vk.ops.linear_gelu(x, w, b, recompute=recompute)
    assert spy.values == [grad_mode == "train" and not recompute]


def test_saved_pre_activation():
    # The forward op's second output, kept for the backward: x @ W^T + b before the activation.
    op = Op(lambda x, weight, bias, activation: torch.ops.vit_kernels.linear_act_fwd(x, weight, bias, activation, True),
            lambda x, weight, bias, activation: (reference.linear_gelu(x, weight, bias, activation),
                                                 reference.linear(x, weight, bias)),
            outputs=("out", "pre"))
    check(op, sample((5,), 32, 64, torch.float32, "gelu", requires_grad=False))


def test_bad_input():
    x, w, b = sample((4,), 32, 64, torch.float32).tensors.values()
    with pytest.raises(ValueError, match=r"weight must have shape \(N, 32\)"):
        vk.ops.linear_gelu(x, w[:, :16], b)
    with pytest.raises(ValueError, match=r"weight must have shape"):
        vk.ops.linear(x, w[0], b)
    with pytest.raises(ValueError, match=r"bias must have shape \(64,\)"):
        vk.ops.linear_gelu(x, w, b[:10])
    with pytest.raises(ValueError, match=r"weight must have x's dtype torch.float32"):
        vk.ops.linear(x, w.half(), b)
    with pytest.raises(ValueError, match=r"bias must have x's dtype"):
        vk.ops.linear_gelu(x, w, b.half())
    with pytest.raises(ValueError, match=r"weight must be on x's device"):
        vk.ops.linear(x, w.to("meta"), None)
    with pytest.raises(ValueError, match=r"activation must be one of .*'relu'"):
        vk.ops.linear_gelu(x, w, b, "relu")
    with pytest.raises(ValueError, match=r"x must have at least 1 dimension"):
        vk.ops.linear(x[0, 0], w, b)


def test_float64_runs_the_reference():
    x, w, b = sample((4,), 32, 64, torch.float64).tensors.values()
    with vk.use_backend("triton"):
        y = vk.ops.linear_gelu(x, w, b)
    torch.testing.assert_close(y, reference.linear_gelu(x, w, b), rtol=0, atol=0)


OPCHECK_SAMPLES = {
    "gelu, pre-activation saved": dict(activation="gelu"),
    "gelu, pre-activation recomputed": dict(activation="gelu", recompute=True),
    "quick_gelu": dict(activation="quick_gelu"),
    "no activation, no bias, weight gradient only": dict(activation="none", bias=False, frozen="x"),
}


@pytest.mark.parametrize("name", list(OPCHECK_SAMPLES))
def test_opcheck(name):
    kwargs = dict(OPCHECK_SAMPLES[name])
    frozen = kwargs.pop("frozen", None)
    case = sample((20,), 24, 40, torch.float32, **kwargs)
    if frozen:
        case.tensors[frozen].requires_grad_(False)
    checked = opcheck(LINEAR, case)
    assert checked == ["vit_kernels.linear_act_fwd.default", "vit_kernels.linear_act_bwd.default"], checked
