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

from vit_kernels import backend, reference

from .utils import ADD_LAYER_NORM, ATTENTION, DEVICE, LINEAR, MLP, PATCH_EMBED, QKV_ATTENTION, Op, Sample, check

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
    """One example: its tensor arguments drawn as bases of named layouts, gathered in a Sample."""

    def __init__(self, data, seed: int, **absent):
        self.data, self.generator = data, torch.Generator().manual_seed(seed)
        self.sample = Sample(dict(absent))

    def tensor(self, name: str, shape: tuple, dtype: torch.dtype, scale: float = 1.0, shift: float = 0.0,
               expand_dims: tuple | None = None):
        """A tensor argument. ``expand_dims``: the dims it may be expanded along (default all). Not
        along a dim the op is shift-invariant in (a LayerNorm's width, attention's keys): the
        gradient of the repeated base element is then exactly 0, and its error a cancellation's noise."""
        layout = self.data.draw(st.sampled_from(LAYOUTS), label=f"{name} layout")
        expand_dims = tuple(range(len(shape))) if expand_dims is None else expand_dims
        base, view = _base_and_view(shape, layout, self.generator, scale, shift, expand_dims)
        self.sample.tensors[name] = base.to(dtype).requires_grad_()
        self.sample.views[name] = view

    def check(self, op: Op, **kwargs):
        """The numerics rule on every output and the gradient of every base, where it has
        MIN_SAMPLES elements (finiteness below)."""
        self.sample.kwargs.update(kwargs)
        check(op, self.sample, small="finite")


@SWEEP
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_add_layer_norm_sweep(data, seed):
    case = Case(data, seed, residual=None, weight=None, bias=None, gamma=None, row_scale=None)
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
    case.check(ADD_LAYER_NORM, eps=data.draw(st.sampled_from([1e-6, 1e-5]), label="eps"))


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
    case.check(LINEAR, activation=activation)


@SWEEP
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_mlp_sweep(data, seed):
    # Every layout of every operand: row-major ones go through TMA descriptors (either
    # orientation), the others (stepped, expanded, offset, unaligned rows) through pointers.
    case = Case(data, seed, fc1_bias=None, fc2_bias=None)
    # Empty sizes last: hypothesis favours the first choices, and an empty x runs the reference.
    B, M = data.draw(st.sampled_from([3, 1, 0]), label="B"), data.draw(st.sampled_from([40, 7, 1]), label="M")
    C = data.draw(st.sampled_from([33, 16, 1, 0]), label="C")
    H = data.draw(st.sampled_from([1, 24, 65]), label="H")
    C_out = data.draw(st.sampled_from([1, 24, 65]), label="C_out")
    dtype = data.draw(st.sampled_from(DOT_DTYPES), label="dtype")
    activation = data.draw(st.sampled_from(reference.ACTIVATIONS), label="activation")
    case.tensor("x", (B, M, C), dtype)
    case.tensor("fc1_weight", (H, C), dtype, scale=max(C, 1) ** -0.5)
    if data.draw(st.booleans(), label="fc1_bias"):
        case.tensor("fc1_bias", (H,), dtype)
    case.tensor("fc2_weight", (C_out, H), dtype, scale=H ** -0.5)
    if data.draw(st.booleans(), label="fc2_bias"):
        case.tensor("fc2_bias", (C_out,), dtype)
    case.check(MLP, activation=activation, recompute=data.draw(st.booleans(), label="recompute"))


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
    case.check(ATTENTION, scale=data.draw(st.sampled_from([None, 0.3]), label="scale"))


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
    case.check(QKV_ATTENTION, num_heads=H, q_eps=1e-6, k_eps=1e-5)


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
    case.check(PATCH_EMBED)
