"""vk.ops.mlp (fc2(act(fc1(x))) on the persistent GEMM) against float64, with PyTorch's own error as
the bar; and vk.layers.Mlp, which runs it, against timm's Mlp."""
import contextlib
import copy
from functools import partial

import pytest
import torch
from torch import nn

import vit_kernels as vk
from vit_kernels import backend, layers, reference

from .utils import (DEVICE, MLP, ArgumentSpy, CustomOpCalls, Op, Sample, assert_within_pytorch_error, check,
                    opcheck, poisoned_allocations, run)

SHAPES = [  # (leading shape of x, C, H, C_out)
    ((3, 197), 100, 300, 100),  # 591 tokens: no tile multiple anywhere; C = 100 ends mid K-step
    ((1,), 64, 128, 64),        # a single row: every row tile but one row is masked
    ((65,), 33, 129, 65),       # one past the interpreter's 64 x 64 x 32 tile in every GEMM dimension
]
SHAPE_IDS = ["3x197-100-300-100", "1-64-128-64", "65-33-129-65"]


def sample(lead, C, H, C_out, dtype, activation="gelu", fc1_bias=True, fc2_bias=True, requires_grad=True,
           **kwargs):
    """x (*lead, C), fc1 (H, C) + (H,), fc2 (C_out, H) + (C_out,) in ``dtype`` (a bias None when
    False); ``kwargs``: the op's other arguments (recompute)."""
    x = torch.randn(*lead, C, device=DEVICE)
    # nn.Linear's scale keeps the pre-activations O(1), where the activations are non-linear.
    w1 = torch.randn(H, C, device=DEVICE) * max(C, 1) ** -0.5
    b1 = torch.randn(H, device=DEVICE) if fc1_bias else None
    w2 = torch.randn(C_out, H, device=DEVICE) * max(H, 1) ** -0.5
    b2 = torch.randn(C_out, device=DEVICE) if fc2_bias else None
    tensors = dict(x=x, fc1_weight=w1, fc1_bias=b1, fc2_weight=w2, fc2_bias=b2)
    tensors = {n: t if t is None else t.to(dtype).requires_grad_(requires_grad) for n, t in tensors.items()}
    return Sample(tensors, dict(activation=activation, **kwargs))


def _value(flag):
    """A launch flag's value (the EPILOGUE_* constants are tl.constexpr objects)."""
    return getattr(flag, "value", flag)


def _spy_launches(monkeypatch) -> list:
    """Records the keyword arguments (flags) of every kernel launch, which still runs."""
    launches, real = [], backend.launcher

    def launcher(kernel):
        launch = real(kernel)

        class Spy:
            def __getitem__(self, grid):
                def call(*args, **kwargs):
                    launches.append(kwargs)
                    return launch[grid](*args, **kwargs)
                return call
        return Spy()
    monkeypatch.setattr(backend, "launcher", launcher)
    return launches


# --- outputs and gradients against float64 ---------------------------------------------------------

@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recomputed"])
@pytest.mark.parametrize("activation", reference.ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lead,C,H,C_out", SHAPES, ids=SHAPE_IDS)
def test_forward_backward(lead, C, H, C_out, dtype, activation, recompute):
    # y, dx, d fc1_weight, d fc1_bias (the dPre epilogue's column sums), d fc2_weight, d fc2_bias.
    [ours] = check(MLP, sample(lead, C, H, C_out, dtype, activation, recompute=recompute))
    assert set(ours) == {"out", "dx", "dfc1_weight", "dfc1_bias", "dfc2_weight", "dfc2_bias"}


@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recomputed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("missing", ["fc1_bias", "fc2_bias", "fc1_bias+fc2_bias"])
def test_without_biases(missing, dtype, recompute):
    absent = dict.fromkeys(missing.split("+"), False)
    [ours] = check(MLP, sample((65,), 33, 129, 65, dtype, "gelu", recompute=recompute, **absent))
    assert not {f"d{name}" for name in absent} & set(ours)


@pytest.mark.cuda  # the interpreter has no bfloat16 arithmetic
@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recomputed"])
@pytest.mark.parametrize("activation", reference.ACTIVATIONS)
@pytest.mark.parametrize("lead,C,H,C_out", SHAPES + [
    ((1000,), 768, 3072, 768),    # ViT-B at a batch whose M = 1000 is no tile multiple
    ((2, 257), 1280, 5120, 1280),  # ViT-H/14, 257 tokens
])
def test_bfloat16_and_large_shapes(lead, C, H, C_out, activation, recompute):
    for dtype in (torch.bfloat16, torch.float16):
        check(MLP, sample(lead, C, H, C_out, dtype, activation, recompute=recompute))


@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recomputed"])
@pytest.mark.parametrize("activation", reference.ACTIVATIONS)
def test_saturated_activations(activation, recompute):
    # Pre-activations of |x| up to ~150: act' in the dPre epilogue must be 0 (not NaN) where the
    # sigmoid's e^-z overflows, and keep its bits where 1 - s would cancel; db1 sums them.
    case = sample((65,), 33, 129, 65, torch.float32, activation, recompute=recompute)
    case.tensors["fc1_weight"] = (case.tensors["fc1_weight"].detach() * 40).requires_grad_()
    check(MLP, case)


@pytest.mark.parametrize("aligned", [True, False], ids=["tma-transposed", "pointers"])
def test_strided_operands(monkeypatch, aligned):
    # x, fc1_weight and fc2_weight as transposed views, the gradient expanded along the tokens
    # (stride 0): the kernel reads every stride instead of assuming row-major. With rows of 16-byte
    # multiples the transposed views go through TMA descriptors of the other orientation; with
    # 70 tokens, H = 98 and C_out = 50 (float16 rows of 140, 196 and 100 bytes) through pointers.
    M, C, H, C_out = (72, 48, 96, 56) if aligned else (70, 48, 98, 50)
    half = dict(device=DEVICE, dtype=torch.float16)
    x = torch.randn(C, M, **half).t().requires_grad_()
    w1 = (torch.randn(C, H, **half) * C ** -0.5).t().requires_grad_()
    b1 = torch.randn(H, **half).requires_grad_()
    w2 = (torch.randn(H, C_out, **half) * H ** -0.5).t().requires_grad_()
    b2 = torch.randn(C_out, **half).requires_grad_()
    grad = torch.randn(1, C_out, **half).expand(M, C_out)
    assert not x.is_contiguous() and not w1.is_contiguous() and not w2.is_contiguous() and grad.stride(0) == 0
    launches = _spy_launches(monkeypatch)
    check(MLP, Sample(dict(x=x, fc1_weight=w1, fc1_bias=b1, fc2_weight=w2, fc2_bias=b2), dict(activation="gelu"),
                      cotangents=[grad]))
    fc1, fc2, dw2, dpre, dx, dw1 = launches
    if aligned:
        # x^T and W1^T stored row-major: A read transposed, B as stored.
        assert fc1["TMA"] and fc1["A_T"] and not fc1["B_T"], fc1
        assert fc2["TMA"] and not fc2["A_T"] and not fc2["B_T"], fc2
    else:
        assert not fc1["TMA"] and not fc2["TMA"] and not dx["TMA"] and not dw1["TMA"]
    # The expanded gradient has no layout a descriptor can read.
    assert not dw2["TMA"] and not dpre["TMA"]
    assert _value(dpre["EPILOGUE"]) == 2 and dpre["COL_SUM"] is True


@pytest.mark.parametrize("view", ["stepped", "expanded", "offset"])
def test_strided_biases(view):
    # The epilogues index a bias as contiguous: a strided view is copied, its gradient goes back through it.
    H, C_out = 72, 40

    def as_view(width):
        return {"stepped": lambda b: b[: 2 * width: 2], "expanded": lambda b: b[:1].expand(width),
                "offset": lambda b: b[1: width + 1]}[view]
    case = sample((3, 33), 32, H, C_out, torch.float32)
    case.tensors["fc1_bias"] = torch.randn(2 * H + 1, device=DEVICE).requires_grad_()
    case.tensors["fc2_bias"] = torch.randn(2 * C_out + 1, device=DEVICE).requires_grad_()
    case.views.update(fc1_bias=as_view(H), fc2_bias=as_view(C_out))
    check(MLP, case)


def test_non_flattenable_leading_dims():
    # x (B, N, C) permuted from (N, B, C): reshape to (B * N, C) must copy; the result keeps x's leading shape.
    case = sample((1,), 40, 96, 40, torch.float32)
    case.tensors["x"] = torch.randn(7, 3, 40, device=DEVICE).permute(1, 0, 2).requires_grad_()
    [ours] = check(MLP, case)
    assert ours["out"].shape == (3, 7, 40)


@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recomputed"])
@pytest.mark.parametrize("frozen", ["x", "fc1_bias", "fc1_weight+fc1_bias", "fc2_weight+fc2_bias",
                                    "x+fc1_weight+fc1_bias"])
def test_partial_gradients(frozen, recompute):
    # A frozen input gets no gradient and the others still match: the first layer's tokens, bias
    # tuning, a frozen fc1 or fc2, only fc2 trained (no dPre GEMM needed at all).
    case = sample((2, 33), 40, 72, 40, torch.float32, recompute=recompute)
    for name in frozen.split("+"):
        case.tensors[name].requires_grad_(False)
    [ours] = check(MLP, case)
    trained = {"dx", "dfc1_weight", "dfc1_bias", "dfc2_weight", "dfc2_bias"}
    assert trained - set(ours) == {f"d{name}" for name in frozen.split("+")}


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.cuda)])
def test_autocast(dtype):
    # As timm's Mlp under autocast: fp32 parameters and input computed in the autocast dtype,
    # gradients back in fp32. On the CPU fp16 autocast runs the kernels in the interpreter.
    case = sample((3, 40), 48, 96, 48, torch.float32)
    case.autocast = dtype
    [ours] = check(MLP, case)
    assert ours["out"].dtype == dtype and ours["dx"].dtype == torch.float32
    assert ours["dfc1_bias"].dtype == ours["dfc2_weight"].dtype == torch.float32


# --- split-K weight gradients --------------------------------------------------------------------------

@pytest.mark.skipif(DEVICE == "cuda", reason="the split counts of the interpreter's 3 programs")
def test_split_k_weight_gradients_are_deterministic(monkeypatch):
    # 2048 tokens, C = 64, H = 128: the dW GEMMs have 1 or 2 output tiles of 64 x 64 and 64 K
    # steps, so on the interpreter's 3 programs they split the tokens into float32 slices (poisoned
    # until written) that the host sums in a fixed order: bitwise the same gradients every run.
    from vit_kernels.kernels import gemm as kernels

    M, C, H = 2048, 64, 128
    programs = kernels.num_programs(torch.device(DEVICE))
    assert programs == 3
    splits = dict(fc2=kernels.split_k(C, H, M, programs), fc1=kernels.split_k(H, C, M, programs))
    assert all(s > 1 for s in splits.values()), splits
    case = sample((M,), C, H, C, torch.float16)
    launches = _spy_launches(monkeypatch)
    [first] = check(MLP, case)
    fc1, fc2, dw2, dpre, dx, dw1 = (launch["SPLIT_K"] for launch in launches)
    assert (dw2, dw1) == (splits["fc2"], splits["fc1"]) and fc1 == fc2 == dpre == dx == 1
    with vk.use_backend("triton"), poisoned_allocations():
        second = dict(zip(["out", *case.gradient_names()], run(MLP.kernel, case)))
    for name in ("dfc1_weight", "dfc2_weight", "dfc1_bias", "dfc2_bias", "dx", "out"):
        assert torch.equal(first[name], second[name]), name


# --- what the op launches and keeps ----------------------------------------------------------------------

def _true_flags(launch) -> set:
    """The epilogue flags set on a launch (the layout flags A_T, B_T, TMA aside)."""
    return {k for k, v in launch.kwargs.items() if v is True} & {"HAS_BIAS", "STORE_PRE", "COL_SUM"}


def test_records_the_launches_of_forward_and_backward():
    # The six GEMMs of kernels/gemm.py's docstring, recorded on meta tensors (no kernel runs).
    meta = dict(device="meta", dtype=torch.float16, requires_grad=True)
    x, w1, b1 = torch.empty(197, 64, **meta), torch.empty(256, 64, **meta), torch.empty(256, **meta)
    w2, b2 = torch.empty(64, 256, **meta), torch.empty(64, **meta)
    for recompute in (False, True):
        with vk.use_backend("triton"), backend.record_launches() as launches:
            y = vk.ops.mlp(x, w1, b1, w2, b2, recompute=recompute)
            y.backward(torch.empty_like(y))  # a row-major gradient (sum()'s would be expanded)
        flags = [_true_flags(launch) for launch in launches]
        fc1 = {"HAS_BIAS"} if recompute else {"HAS_BIAS", "STORE_PRE"}
        # recompute: fc1's forward again (storing pre) before the backward GEMMs.
        expected = [fc1, {"HAS_BIAS"}] + ([{"HAS_BIAS", "STORE_PRE"}] if recompute else [])
        assert flags[:len(expected)] == expected, flags
        dw2, dpre, dx, dw1 = launches[len(expected):]
        assert launches[0].kwargs["ACT"] == 1 and launches[1].kwargs["ACT"] == 0
        assert _value(dpre.kwargs["EPILOGUE"]) == 2 and dpre.kwargs["ACT"] == 1 and _true_flags(dpre) == {"COL_SUM"}
        for plain in (dw2, dx, dw1):
            assert plain.kwargs["ACT"] == 0 and _value(plain.kwargs["EPILOGUE"]) == 0, plain.kwargs
            assert _true_flags(plain) == set(), plain.kwargs
        # dW2 = dY^T h and dW1 = dPre^T x: (C_out, H) and (H, C) outputs with K = 197 tokens.
        assert dw2.args[6:9] == (64, 256, 197) and dw1.args[6:9] == (256, 64, 197)
        assert dx.args[6:9] == (197, 64, 256) and dpre.args[6:9] == (197, 256, 64)
        assert all(launch.kwargs["TMA"] for launch in launches)  # every operand a row-major view


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("grad_mode", ["train", "no_grad", "frozen"])
def test_activations_kept_only_for_a_backward(grad_mode, recompute):
    # Inference (no_grad, or nothing requiring grad) must not spend two (M, H) buffers on them.
    # float16: float32 runs cuBLAS, not the op, on a GPU.
    x, w1, b1, w2, b2 = sample((5,), 32, 64, 32, torch.float16, requires_grad=grad_mode == "train").tensors.values()
    spy = ArgumentSpy(torch.ops.vit_kernels.mlp_fwd.default, 6)
    with vk.use_backend("triton"), torch.set_grad_enabled(grad_mode != "no_grad"), spy:
        vk.ops.mlp(x, w1, b1, w2, b2, recompute=recompute)
    assert spy.values == [grad_mode == "train" and not recompute]


def test_saved_activations():
    # The forward op's second and third outputs, kept for the backward: pre = fc1(x) and h = act(pre).
    case = sample((5,), 32, 64, 40, torch.float32, "gelu_tanh", requires_grad=False)
    op = Op(
        lambda x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation: torch.ops.vit_kernels.mlp_fwd(
            x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, True),
        lambda x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation: (
            reference.mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation),
            reference.linear(x, fc1_weight, fc1_bias), reference.linear_gelu(x, fc1_weight, fc1_bias, activation)),
        outputs=("out", "pre", "h"))
    check(op, case)


@pytest.mark.parametrize("C,H,C_out", [(0, 64, 32), (32, 0, 32), (32, 64, 0)], ids=["C0", "H0", "C_out0"])
@pytest.mark.parametrize("M", [0, 4])
def test_empty_dimensions(M, C, H, C_out):
    # No tokens, no input features, no hidden features, no outputs: shapes and gradients of empty sums.
    params = tuple(sample((M,), C, H, C_out, torch.float32).tensors.values())
    cotangent = torch.randn(M, C_out, device=DEVICE)
    results = []
    for backend_name in ("triton", "torch"):
        with vk.use_backend(backend_name), poisoned_allocations():
            y = vk.ops.mlp(*params)
            results.append([y, *torch.autograd.grad(y, params, cotangent)])
    ours, expected = results
    assert ours[0].shape == (M, C_out)
    for name, a, e in zip(["out", "dx", "dfc1_weight", "dfc1_bias", "dfc2_weight", "dfc2_bias"], ours, expected):
        # Without hidden features y is fc2_bias on every row; the rest are empty sums (0) or empty.
        torch.testing.assert_close(a, e, msg=lambda m: f"{name}: {m}")


def test_float64_runs_the_reference():
    x, w1, b1, w2, b2 = sample((4,), 32, 64, 32, torch.float64).tensors.values()
    with vk.use_backend("triton"):
        y = vk.ops.mlp(x, w1, b1, w2, b2, "quick_gelu")
    torch.testing.assert_close(y, reference.mlp(x, w1, b1, w2, b2, "quick_gelu"), rtol=0, atol=0)


# --- custom-op contract and torch.compile -------------------------------------------------------------------

OPCHECK_SAMPLES = {
    "gelu, activations saved": dict(activation="gelu"),
    "gelu_tanh, pre-activation recomputed": dict(activation="gelu_tanh", recompute=True),
    "quick_gelu, no biases": dict(activation="quick_gelu", fc1_bias=False, fc2_bias=False),
    "weight gradients only": dict(activation="gelu", frozen="x"),
}


@pytest.mark.parametrize("name", list(OPCHECK_SAMPLES))
def test_opcheck(name):
    kwargs = dict(OPCHECK_SAMPLES[name])
    frozen = kwargs.pop("frozen", None)
    case = sample((20,), 24, 40, 24, torch.float32, **kwargs)
    if frozen:
        case.tensors[frozen].requires_grad_(False)
    checked = opcheck(MLP, case)
    assert checked == ["vit_kernels.mlp_fwd.default", "vit_kernels.mlp_bwd.default"], checked


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("compiler,dtype,lead,C,H", [
    # backend="eager": Dynamo captures the whole op (validation, autocast query, reshape, op
    # call) without a graph break, on any device.
    ("eager", torch.float32, (2, 9), 32, 64),
    # Inductor decomposes the triton_op into its kernels: interpreted ones cannot be traced.
    pytest.param("inductor", torch.float16, (2, 197), 64, 256, marks=pytest.mark.cuda),
])
def test_torch_compile_fullgraph(compiler, dtype, lead, C, H, recompute):
    params = sample(lead, C, H, C, dtype).tensors.values()

    def mlp(x, w1, b1, w2, b2):
        return vk.ops.mlp(x, w1, b1, w2, b2, "gelu", recompute=recompute)

    with vk.use_backend("triton"):
        y = torch.compile(mlp, fullgraph=True, backend=compiler)(*params)
        grads = torch.autograd.grad(y.float().square().sum(), tuple(params))
        y_eager = mlp(*params)
        grads_eager = torch.autograd.grad(y_eager.float().square().sum(), tuple(params))
    torch._dynamo.reset()
    torch.testing.assert_close(y, y_eager)
    for g, ge in zip(grads, grads_eager):
        torch.testing.assert_close(g, ge)


# --- validation ---------------------------------------------------------------------------------------------

def test_bad_input():
    x, w1, b1, w2, b2 = sample((4,), 32, 64, 48, torch.float32).tensors.values()
    with pytest.raises(ValueError, match=r"fc1_weight must have shape \(N, 32\)"):
        vk.ops.mlp(x, w1[:, :16], b1, w2, b2)
    with pytest.raises(ValueError, match=r"fc2_weight must have shape \(N, 64\) .*got \(48, 32\)"):
        vk.ops.mlp(x, w1, b1, w2[:, :32], b2)
    with pytest.raises(ValueError, match=r"fc2_weight must have shape"):
        vk.ops.mlp(x, w1, b1, w2[0], b2)
    with pytest.raises(ValueError, match=r"fc1_bias must have shape \(64,\)"):
        vk.ops.mlp(x, w1, b1[:10], w2, b2)
    with pytest.raises(ValueError, match=r"fc2_bias must have shape \(48,\)"):
        vk.ops.mlp(x, w1, b1, w2, b1)
    for name in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"):
        args = dict(x=x, fc1_weight=w1, fc1_bias=b1, fc2_weight=w2, fc2_bias=b2)
        args[name] = args[name].half()
        with pytest.raises(ValueError, match=rf"{name} must have x's dtype torch.float32; got torch.float16"):
            vk.ops.mlp(**args)
    with pytest.raises(ValueError, match=r"fc2_weight must be on x's device"):
        vk.ops.mlp(x, w1, b1, w2.to("meta"), b2)
    for activation in ("relu", "none"):
        with pytest.raises(ValueError, match=rf"activation must be one of .*'quick_gelu'.*got '{activation}'"):
            vk.ops.mlp(x, w1, b1, w2, b2, activation)
    with pytest.raises(ValueError, match=r"x must have at least 1 dimension"):
        vk.ops.mlp(x[0, 0], w1, b1, w2, b2)


# --- vk.layers.Mlp: timm's Mlp, run as one op when nothing sits between fc1 and fc2 --------------------------

def _pair(act="gelu", **kwargs):
    """(vk Mlp, timm Mlp) of 48 -> 96 -> 40 features with the same weights."""
    timm = pytest.importorskip("timm")
    acts = {"gelu": (nn.GELU, nn.GELU), "gelu_tanh": (partial(nn.GELU, approximate="tanh"),) * 2,
            "quick_gelu": (layers.QuickGELU, timm.layers.QuickGELU), "relu": (nn.ReLU, nn.ReLU)}
    ours_act, theirs_act = acts[act]
    ref = timm.layers.Mlp(48, 96, 40, act_layer=theirs_act, **kwargs)
    mlp = layers.Mlp(48, 96, 40, act_layer=ours_act, **kwargs)
    mlp.load_state_dict(ref.state_dict())
    return mlp, ref


MLP_CASES = {  # name: (Mlp arguments, training, whether vk.ops.mlp runs it)
    "gelu": (dict(), False, True),
    "gelu, training": (dict(), True, True),
    "gelu_tanh": (dict(act="gelu_tanh"), True, True),
    "quick_gelu": (dict(act="quick_gelu"), True, True),
    "no biases": (dict(bias=False), True, True),
    "fc1 bias only": (dict(bias=(True, False)), True, True),
    "dropout, eval": (dict(drop=0.25), False, True),
    "fc2 dropout only, training": (dict(drop=(0.0, 0.25)), True, True),
    "dropout, training": (dict(drop=0.25), True, False),
    "norm layer": (dict(norm_layer=nn.LayerNorm), True, False),
    "relu": (dict(act="relu"), True, False),
}


def _same_draws(module, x, seed=1):
    torch.manual_seed(seed)
    return module(x)


@pytest.mark.parametrize("case", list(MLP_CASES))
def test_mlp_layer_matches_timm(case):
    kwargs, train, fuses = MLP_CASES[case]
    mlp, ref = _pair(**kwargs)
    mlp.train(train), ref.train(train)
    x = torch.randn(2, 37, 48, device=DEVICE)
    assert mlp._fuses_whole() == fuses
    # The reference backend: the same function as timm's Mlp, dropout masks included.
    with vk.use_backend("torch"):
        out, expected = _same_draws(mlp, x), _same_draws(ref, x)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        out.square().sum().backward(), expected.square().sum().backward()
    theirs = dict(ref.named_parameters())
    for name, p in mlp.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, msg=lambda m: f"{name}: {m}")
    # The kernel path (float16: float32 runs cuBLAS on a GPU): which ops run it.
    with vk.use_backend("triton"), CustomOpCalls() as calls:
        _same_draws(mlp.half(), x.half()).square().sum().backward()
    if fuses:
        assert calls.names == ["mlp_fwd", "mlp_bwd"], calls.names
    else:
        assert "mlp_fwd" not in calls.names and "linear_act_fwd" in calls.names, calls.names


@pytest.mark.parametrize("case", [c for c, (_, train, fuses) in MLP_CASES.items()
                                  if fuses and not (train and "dropout" in c)])
def test_fused_mlp_layer_within_the_numerics_rule_of_timm(case):
    # The fused kernels (allocations poisoned) against timm's Mlp in float32 and in float64.
    kwargs, train, _ = MLP_CASES[case]
    mlp, ref = _pair(**kwargs)
    exact = copy.deepcopy(ref).double()
    x = torch.randn(2, 37, 48, device=DEVICE)
    cotangent = torch.randn(2, 37, 40, device=DEVICE)
    results = []
    for module, backend_name, dtype in ((mlp, "triton", torch.float32), (ref, "torch", torch.float32),
                                        (exact, "torch", torch.float64)):
        module.train(train)
        leaf = x.to(dtype).requires_grad_()
        poison = poisoned_allocations() if module is mlp else contextlib.nullcontext()
        with vk.use_backend(backend_name), poison:
            y = module(leaf)
            grads = torch.autograd.grad(y, [leaf, *module.parameters()], cotangent.to(dtype))
        results.append([y.detach(), *grads])
    names = ["out", "dx"] + [f"d{n}" for n, _ in mlp.named_parameters()]
    assert len(names) == len(results[0])
    for name, ours, theirs, exact_value in zip(names, *results):
        assert_within_pytorch_error(name, ours, theirs, exact_value)


def test_hook_on_fc1_fires_and_the_mlp_does_not_fuse():
    mlp, ref = _pair()
    mlp.eval(), ref.eval()
    seen = []
    mlp.fc1.register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape)))
    assert not mlp._fuses_whole()
    x = torch.randn(2, 37, 48, device=DEVICE)
    # float16 (float32 runs cuBLAS on a GPU), on a copy, which keeps the hook.
    with vk.use_backend("triton"), CustomOpCalls() as calls:
        copy.deepcopy(mlp).half()(x.half())
    assert seen == [(2, 37, 96)]
    # fc1 runs as itself (its hook sees its output), act as itself, fc2 as vk.ops.linear.
    assert calls.names == ["linear_act_fwd"], calls.names
    with vk.use_backend("torch"), torch.no_grad():
        torch.testing.assert_close(mlp(x), ref(x), rtol=0, atol=0)
    with vk.use_backend("triton"), torch.no_grad():
        out = mlp(x)
        assert_within_pytorch_error("out", out, ref(x), copy.deepcopy(ref).double()(x.double()))
    assert len(seen) == 3
