"""A property-based sweep (hypothesis) of every kernel op against float64.

Each example draws shapes (0 and 1 included, odd widths), a dtype, the op's flags and, for
**every** tensor argument, a memory layout: contiguous, transposed, stepped (every other
element), expanded (a stride-0 dim) or offset (a storage offset). The view is made from a
leaf "base" tensor, so the gradients compared are those of the bases: they check that the op
reads and differentiates through the strides it was given. The kernel path runs with poisoned
allocations (unwritten elements show as NaN).

Every output and gradient is held to the project's numerics rule (tests/utils.py) when it has
at least MIN_SAMPLES elements; a smaller one (a bias of width 1, a row scale of one sample)
is too small for the rule to tell rounding from error, so it is checked for shape and
finiteness only, and the fixed-size tests of each op cover its values. Examples are
derandomised: CI runs the same ones every time.
"""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vit_kernels as vk
from vit_kernels import backend, reference

from .utils import MIN_SAMPLES, assert_within_pytorch_error, layer_norm_with, poisoned_allocations

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAYOUTS = ("contiguous", "transposed", "stepped", "expanded", "offset")
# bfloat16 dots are refused in the interpreter (backend.refuse_bfloat16_dots).
DOT_DTYPES = [torch.float32, torch.float16] + ([] if backend.interpreter_enabled() else [torch.bfloat16])
SWEEP = settings(max_examples=25, deadline=None, derandomize=True, database=None, print_blob=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _base_and_view(shape: tuple, layout: str, generator: torch.Generator, scale: float, shift: float,
                   expand_dims: tuple):
    """(base, view): a float32 leaf ``base`` and a function mapping it (or a copy in another dtype)
    to a tensor of ``shape`` laid out as ``layout``; "expanded" repeats the first of ``expand_dims``
    longer than 1 (contiguous if none is)."""
    def randn(*size):
        return shift + scale * torch.randn(*size, generator=generator).to(DEVICE)

    if layout == "transposed" and len(shape) > 1:
        return randn(*reversed(shape)), lambda b: b.permute(*reversed(range(len(shape))))
    if layout == "stepped" and shape:
        return randn(*shape[:-1], 2 * shape[-1]), lambda b: b[..., ::2]
    if layout == "expanded" and any(shape[d] > 1 for d in expand_dims):
        dim = next(d for d in expand_dims if shape[d] > 1)
        return randn(*shape[:dim], 1, *shape[dim + 1:]), lambda b: b.expand(shape)
    if layout == "offset":
        numel = 1
        for n in shape:
            numel *= n
        return randn(numel + 1), lambda b: b[1:].view(shape)
    return randn(*shape), lambda b: b


class Case:
    """The tensor arguments of one example: named bases with their layouts and dtypes."""

    def __init__(self, data, seed: int):
        self.data, self.generator = data, torch.Generator().manual_seed(seed)
        self.bases, self.views, self.dtypes = {}, {}, {}

    def tensor(self, name: str, shape: tuple, dtype: torch.dtype, scale: float = 1.0, shift: float = 0.0,
               expand_dims: tuple | None = None):
        """A tensor argument. ``expand_dims``: the dims it may be expanded along (default all). Not
        along a dim the op is shift-invariant in (a LayerNorm's width, attention's keys): the
        gradient of the repeated base element is then exactly 0, and its error a cancellation's noise."""
        layout = self.data.draw(st.sampled_from(LAYOUTS), label=f"{name} layout")
        expand_dims = tuple(range(len(shape))) if expand_dims is None else expand_dims
        self.bases[name], self.views[name] = _base_and_view(shape, layout, self.generator, scale, shift,
                                                            expand_dims)
        self.dtypes[name] = dtype

    def run(self, fn, precision: str):
        """fn(**views) -> tuple of outputs, and the gradients of the bases for fixed random upstream
        gradients. ``precision``: "exact" (float64), "baseline" (each tensor in its dtype) or "kernel"."""
        leaves = {n: (b.double() if precision == "exact" else b.to(self.dtypes[n])).requires_grad_()
                  for n, b in self.bases.items()}
        outs = fn(**{n: self.views[n](leaf) for n, leaf in leaves.items()})
        grad_outs = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)).to(DEVICE, o.dtype)
                     for i, o in enumerate(outs)]
        grads = torch.autograd.grad(outs, list(leaves.values()), grad_outs, allow_unused=True)
        grads = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves.values())]
        return [*outs, *grads]


def _check(case: Case, names: list, kernel_fn, reference_fn):
    exact = case.run(reference_fn, "exact")
    baseline = case.run(reference_fn, "baseline")
    with vk.use_backend("triton"), poisoned_allocations():
        actual = case.run(kernel_fn, "kernel")
    names = [*names, *(f"d{n}" for n in case.bases)]
    for name, a, b, e in zip(names, actual, baseline, exact):
        assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)}, expected {tuple(e.shape)}"
        if a.numel() >= MIN_SAMPLES:
            assert_within_pytorch_error(name, a, b, e)
        else:
            assert torch.isfinite(a).all(), f"{name}: {a}"


@SWEEP
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_add_layer_norm_sweep(data, seed):
    case = Case(data, seed)
    B, N = data.draw(st.sampled_from([0, 1, 3]), label="B"), data.draw(st.sampled_from([1, 5]), label="N")
    C = data.draw(st.sampled_from([1, 2, 33, 197, 1000]), label="C")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), label="dtype")
    flags = {f: data.draw(st.booleans(), label=f) for f in ("residual", "weight", "bias", "gamma", "row_scale")}
    case.tensor("x", (B, N, C), dtype, expand_dims=(0, 1))
    if flags["residual"]:
        residual_dtype = data.draw(st.sampled_from([dtype, torch.float32]), label="residual dtype")
        case.tensor("residual", (B, N, C), residual_dtype, shift=data.draw(st.sampled_from([0.0, 30.0])),
                    expand_dims=(0, 1))
    for name in ("weight", "bias", "gamma"):
        if flags[name]:
            param_dtype = dtype if name == "gamma" else data.draw(st.sampled_from([dtype, torch.float32]))
            case.tensor(name, (C,), param_dtype, scale=0.3, shift=1.0 if name != "bias" else 0.0)
    if flags["row_scale"]:
        case.tensor("row_scale", (B,), dtype, scale=0.2, shift=1.0)
    eps = data.draw(st.sampled_from([1e-6, 1e-5]), label="eps")

    def op(impl):
        def run(x, residual=None, weight=None, bias=None, gamma=None, row_scale=None):
            return impl(x, residual, weight, bias, eps, gamma, row_scale)
        return run

    _check(case, ["normed", "new_residual"], op(vk.ops.add_layer_norm), op(reference.add_layer_norm))


@SWEEP
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_linear_sweep(data, seed):
    case = Case(data, seed)
    B, M = data.draw(st.sampled_from([0, 1, 3]), label="B"), data.draw(st.sampled_from([1, 7, 40]), label="M")
    K = data.draw(st.sampled_from([0, 1, 16, 33]), label="K")
    N = data.draw(st.sampled_from([1, 24, 65]), label="N")
    dtype = data.draw(st.sampled_from(DOT_DTYPES), label="dtype")
    activation = data.draw(st.sampled_from(("none",) + reference.ACTIVATIONS), label="activation")
    case.tensor("x", (B, M, K), dtype)
    case.tensor("weight", (N, K), dtype, scale=max(K, 1) ** -0.5)
    if data.draw(st.booleans(), label="bias"):
        case.tensor("bias", (N,), dtype)

    def op(linear, linear_gelu):
        def run(x, weight, bias=None):
            return (linear(x, weight, bias),) if activation == "none" else (linear_gelu(x, weight, bias, activation),)
        return run

    _check(case, ["out"], op(vk.ops.linear, vk.ops.linear_gelu), op(reference.linear, reference.linear_gelu))


@SWEEP
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_attention_sweep(data, seed):
    case = Case(data, seed)
    B, H = data.draw(st.sampled_from([0, 1, 2]), label="B"), data.draw(st.sampled_from([1, 2]), label="H")
    N = data.draw(st.sampled_from([1, 17, 70]), label="N")
    D = data.draw(st.sampled_from([16, 32, 80]), label="D")
    dtype = data.draw(st.sampled_from(DOT_DTYPES), label="dtype")
    for name in ("q", "k", "v"):
        case.tensor(name, (B, H, N, D), dtype, expand_dims=(0, 1, 3) if name == "k" else None)
    scale = data.draw(st.sampled_from([None, 0.3]), label="scale")

    def op(impl):
        return lambda q, k, v: (impl(q, k, v, scale),)

    _check(case, ["out"], op(vk.ops.attention), op(reference.attention))


@SWEEP
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_qkv_attention_sweep(data, seed):
    case = Case(data, seed)
    B, N = data.draw(st.sampled_from([0, 1, 2]), label="B"), data.draw(st.sampled_from([1, 17, 70]), label="N")
    H, D = data.draw(st.sampled_from([1, 2]), label="H"), data.draw(st.sampled_from([16, 32, 80]), label="D")
    dtype = data.draw(st.sampled_from(DOT_DTYPES), label="dtype")
    case.tensor("qkv", (B, N, 3 * H * D), dtype, expand_dims=(0,))
    norms = data.draw(st.sampled_from(["none", "q", "k", "both"]), label="qk-norm")
    for which in ("q", "k"):
        if norms in (which, "both"):
            case.tensor(f"{which}_weight", (D,), torch.float32, scale=0.3, shift=1.0)
            case.tensor(f"{which}_bias", (D,), torch.float32, scale=0.3, expand_dims=() if which == "k" else None)

    def op(impl):
        def run(qkv, q_weight=None, q_bias=None, k_weight=None, k_bias=None):
            q_norm = None if q_weight is None else layer_norm_with(q_weight, q_bias, 1e-6)
            k_norm = None if k_weight is None else layer_norm_with(k_weight, k_bias, 1e-5)
            return (impl(qkv, H, q_norm=q_norm, k_norm=k_norm),)
        return run

    _check(case, ["out"], op(vk.ops.qkv_attention), op(reference.qkv_attention))


@SWEEP
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_patch_embed_sweep(data, seed):
    """The extension (the kernel path of patch_embed) against float64; float images (uint8 ones
    cannot carry a gradient: the fixed-size tests cover them)."""
    case = Case(data, seed)
    B, C = data.draw(st.sampled_from([0, 1, 2]), label="B"), data.draw(st.sampled_from([1, 3]), label="C")
    ph, pw = data.draw(st.sampled_from([(4, 4), (2, 3)]), label="patch")
    gh, gw = data.draw(st.sampled_from([(1, 1), (3, 2)]), label="grid")
    D = data.draw(st.sampled_from([8, 40]), label="D")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), label="weight dtype")
    P = data.draw(st.sampled_from([0, 1, 2]), label="prefix tokens")
    case.tensor("images", (B, C, gh * ph, gw * pw), torch.float32)
    case.tensor("weight", (D, C, ph, pw), dtype, scale=(C * ph * pw) ** -0.5)
    if data.draw(st.booleans(), label="bias"):
        case.tensor("bias", (D,), dtype)
    if P:
        case.tensor("prefix_tokens", (1, P, D), dtype)
    if data.draw(st.booleans(), label="pos_embed"):
        # Over every token, or over the patch tokens only (timm's no_embed_class).
        case.tensor("pos_embed", (1, data.draw(st.sampled_from([P, 0])) + gh * gw, D), dtype)
    if data.draw(st.booleans(), label="normalise"):
        case.tensor("mean", (C,), torch.float32, scale=0.1, shift=0.5)
        case.tensor("std", (C,), torch.float32, scale=0.05, shift=0.25)

    def op(impl):
        return lambda **tensors: (impl(**tensors),)

    _check(case, ["tokens"], op(vk.ops.patch_embed), op(reference.patch_embed))
