"""The test harness shared by every op test: samples, the float64 oracle, the numerics rule,
poisoned outputs and torch.library.opcheck.

The numerics rule, the one accuracy criterion of the project, the same for every output and every
gradient of every op:

    rms(actual - exact) <= FACTOR * rms(baseline - exact) + TINY_ATOL[dtype]

``exact`` is the op's PyTorch reference computed in float64 (the oracle), ``baseline`` the same
reference run in ``actual``'s dtype (PyTorch's own error at that precision), and rms the
root-mean-square over all elements (the norm-wise error ||actual - exact|| / sqrt(n)). In words:
an op may be at most FACTOR = 2 times as far from the float64 result as PyTorch itself is at the
same precision, plus a tiny absolute tolerance that stands for the noise of the float64 reference
(or of an exactly representable result).

Why the RMS and not the largest element: which way each rounding goes is luck, so the error of
one element is a random draw whose scale is what the implementation determines. The RMS over n
elements estimates that scale to about 1 / sqrt(2n); the largest element is one extreme draw, and
PyTorch's can be lucky. Comparing two maxima failed kernels that are as accurate as PyTorch
whenever a thread count or a library version changed PyTorch's summation order (a bias gradient
of 129 sums, the 3 channel-mean gradients of patch_embed). Bugs still fail: a wrong index, a
missing term or an unwritten element is off by the size of the values, orders of magnitude above
rounding in any tensor a test uses; NaN or inf anywhere fails (poisoned outputs show up so).

How many elements: with n >= MIN_SAMPLES (32), two implementations of equal accuracy exceed
FACTOR = 2 by chance with probability below 1e-4 (a variance ratio of Gaussian errors, F(n, n) > 4);
with 3 elements it is 14%. A smaller output is a ValueError: measure it on more elements (more
rows, channels or samples) where the gradient is a per-sample or per-channel reduction, or pool
several samples (``check(op, *samples)``).

The harness, after pytorch/extension-cpp's ``sample_inputs(device, requires_grad)``: each op test
file declares an ``Op`` (kernel and reference) and its cases as ``Sample``s; ``check`` runs a
case's forward and every gradient on the kernel path (allocations poisoned), on the reference in
the same dtypes and on the reference in float64, and judges each by the rule; ``opcheck`` runs
torch.library.opcheck on every custom op the kernel path calls for a sample, forward and backward.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vit_kernels as vk
from vit_kernels import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

FACTOR = 2.0
MIN_SAMPLES = 32
# Below this RMS, an error is noise of the float64 reference itself or of an exact result.
TINY_ATOL = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float64: 1e-12}


def rms_error(actual: torch.Tensor, exact: torch.Tensor) -> float:
    """Root-mean-square of ``actual - exact`` in float64; inf if any element is NaN or infinite."""
    err = actual.detach().double() - exact.detach().double()
    if not torch.isfinite(err).all():
        return float("inf")
    return torch.linalg.vector_norm(err).item() / err.numel() ** 0.5


def _describe(name: str, actual: torch.Tensor, exact: torch.Tensor) -> str:
    """RMS and worst element of ``actual`` against ``exact``, for the failure message."""
    err = (actual.detach().double() - exact.detach().double()).abs()
    bad = ~torch.isfinite(err)
    if bad.any():
        where = tuple(torch.nonzero(bad)[0].tolist())
        return f"{name}: {actual.flatten()[bad.flatten()][0].item()} at {where} (an unwritten or invalid element)"
    worst = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
    return (f"{name}: rms {rms_error(actual, exact):.3e}, max {err.max().item():.3e} at {worst} "
            f"(got {actual.flatten()[err.argmax()].item():.6g}, exact {exact.flatten()[err.argmax()].item():.6g})")


def assert_within_pytorch_error(name: str, actual: torch.Tensor, baseline: torch.Tensor,
                                exact: torch.Tensor) -> None:
    """The numerics rule (module docstring): ``actual`` is at most FACTOR times as far from the
    float64 ``exact`` as PyTorch's ``baseline`` in the same dtype, in RMS over all elements."""
    assert actual.shape == exact.shape == baseline.shape, \
        f"{name}: shapes {tuple(actual.shape)}, PyTorch {tuple(baseline.shape)}, exact {tuple(exact.shape)}"
    if actual.numel() < MIN_SAMPLES:
        raise ValueError(f"{name}: {actual.numel()} elements are too few to compare errors (need {MIN_SAMPLES}); "
                         "test this output at a larger size")
    atol = TINY_ATOL[actual.dtype]
    ours, theirs = rms_error(actual, exact), rms_error(baseline, exact)
    assert ours <= FACTOR * theirs + atol, (f"{_describe(name, actual, exact)}\n  vs "
                                            f"{_describe(name + ' (PyTorch)', baseline, exact)}; "
                                            f"allowed {FACTOR}x + {atol:.1e} in rms")


def _poisoned(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.is_floating_point():
        return tensor.fill_(float("nan"))
    if tensor.dtype == torch.bool:
        return tensor.fill_(True)
    return tensor.fill_(torch.iinfo(tensor.dtype).max)


@contextlib.contextmanager
def poisoned_allocations() -> Iterator[None]:
    """Fill every tensor made by torch.empty / empty_like / Tensor.new_empty with NaN (or int max).

    An op whose kernel leaves an element of its output unwritten then returns NaN there.
    """
    originals = torch.empty, torch.empty_like, torch.Tensor.new_empty
    empty, empty_like, new_empty = originals

    torch.empty = lambda *a, **k: _poisoned(empty(*a, **k))
    torch.empty_like = lambda *a, **k: _poisoned(empty_like(*a, **k))
    torch.Tensor.new_empty = lambda self, *a, **k: _poisoned(new_empty(self, *a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.Tensor.new_empty = originals


def layer_norm_with(weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.nn.LayerNorm:
    """nn.LayerNorm over weight's width whose weight and bias are the given tensors: views of any
    layout, or float64 copies, with their gradients tracked by the caller's leaves."""
    norm = torch.nn.LayerNorm(weight.shape[0], eps=eps, device="meta")
    del norm.weight, norm.bias
    norm.weight, norm.bias = weight, bias
    return norm


# --- the op-test harness ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Op:
    """An op under test: ``kernel`` and ``reference`` are called alike, fn(**arguments, **kwargs),
    and return a tensor or a tuple of tensors named ``outputs``. ``kernel`` runs under
    vk.use_backend(``backend``) (its kernel path: "triton", or "auto" for the C++ extension),
    ``reference`` under vk.use_backend("torch")."""
    kernel: Callable
    reference: Callable
    outputs: tuple = ("out",)
    backend: str = "triton"


@dataclasses.dataclass
class Sample:
    """One call of an op (one element of extension-cpp's ``sample_inputs``).

    ``tensors``: the tensor arguments by name, as leaves; None for an absent one. Every floating
    leaf that requires grad has its gradient, named "d<name>", compared; integer leaves (uint8
    images) are passed as they are. ``views``: name -> function making the argument from its leaf
    (a transposed, stepped, expanded or offset layout of a base tensor); the gradient compared is
    the leaf's, so it checks that the op reads and differentiates through the strides it was given.
    ``kwargs``: the other arguments; a floating dtype among them (residual_dtype) is float64 in the
    oracle. ``cotangents``: the upstream gradient of each output, in any layout (an expanded one);
    by default fixed random ones, rounded to the kernel output's dtype and the same in all three
    runs. ``autocast``: run kernel and baseline under torch.autocast to this dtype (the oracle then
    starts from the inputs rounded to it).
    """
    tensors: dict
    kwargs: dict = dataclasses.field(default_factory=dict)
    views: dict = dataclasses.field(default_factory=dict)
    cotangents: Optional[list] = None
    autocast: Optional[torch.dtype] = None

    def leaves(self, oracle: bool = False) -> dict:
        """Fresh leaves of ``tensors`` (detached, same requires_grad): in their dtype and layout, or
        for the oracle contiguous float64 copies (the same values; float64 convolutions on
        channels-last images are very slow)."""
        def leaf(t):
            if t is None or not t.is_floating_point():
                return t if t is None else t.detach()
            if not oracle:
                return t.detach().requires_grad_(t.requires_grad)
            if self.autocast is not None:
                t = t.to(self.autocast)
            return t.detach().to(torch.float64, memory_format=torch.contiguous_format).requires_grad_(t.requires_grad)
        return {name: leaf(t) for name, t in self.tensors.items()}

    def arguments(self, leaves: dict, oracle: bool = False) -> dict:
        """The keyword arguments of the call on ``leaves``."""
        args = {n: t if t is None or n not in self.views else self.views[n](t) for n, t in leaves.items()}
        for name, value in self.kwargs.items():
            args[name] = torch.float64 if oracle and isinstance(value, torch.dtype) and value.is_floating_point \
                else value
        return args

    def gradient_names(self) -> list:
        return [f"d{n}" for n, t in self.tensors.items()
                if t is not None and t.is_floating_point() and t.requires_grad]


def _as_tuple(outs) -> tuple:
    return outs if isinstance(outs, tuple) else (outs,)


def _run(fn, sample: Sample, oracle: bool, cotangents: Optional[list], before_backward=None) -> tuple[list, list]:
    leaves = sample.leaves(oracle)
    outs = _as_tuple(fn(**sample.arguments(leaves, oracle)))
    if before_backward is not None:
        before_backward()
    if cotangents is None:
        cotangents = sample.cotangents
    if cotangents is None:
        gen = torch.Generator(device=outs[0].device).manual_seed(1)
        cotangents = [torch.randn(o.shape, generator=gen, device=o.device, dtype=torch.float64).to(o.dtype)
                      for o in outs]
    wrt = [t for t in leaves.values() if t is not None and t.is_floating_point() and t.requires_grad]
    tracked = [(o, c.to(o.dtype)) for o, c in zip(outs, cotangents) if o.requires_grad]
    grads = []
    if wrt and tracked:
        grads = torch.autograd.grad([o for o, _ in tracked], wrt, [c for _, c in tracked], allow_unused=True)
        # An argument the outputs do not depend on (an empty product) has a zero gradient.
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wrt)]
    return [o.detach() for o in outs] + list(grads), cotangents


def run(fn, sample: Sample, *, oracle: bool = False, cotangents: Optional[list] = None) -> list:
    """[*outputs, *gradients of the leaves that require grad] of fn(**arguments, **kwargs) on
    fresh leaves of ``sample`` (float64 ones for the ``oracle``), under no backend of its own."""
    return _run(fn, sample, oracle, cotangents)[0]


def _autocast(sample: Sample):
    return torch.autocast(DEVICE, dtype=sample.autocast) if sample.autocast is not None else contextlib.nullcontext()


def check(op: Op, *samples: Sample, small: str = "error") -> list:
    """Forward and every gradient of ``op`` on each sample: the kernel (allocations poisoned)
    against the reference in the same dtypes and in float64, judged by the numerics rule.

    Every result must have the baseline's shape and dtype. With several samples each result is
    judged over all of them pooled (a width too small for the rule on its own). ``small="finite"``
    checks a result below MIN_SAMPLES elements for finiteness only (a sweep's bias of width 1).
    Returns the kernel's results of each sample, a dict by name.
    """
    pooled, results = {}, []
    for sample in samples:
        with vk.use_backend(op.backend), poisoned_allocations(), _autocast(sample):
            actual, cotangents = _run(op.kernel, sample, False, None)
        with vk.use_backend("torch"):
            with _autocast(sample):
                baseline = run(op.reference, sample, cotangents=cotangents)
            exact = run(op.reference, sample, oracle=True, cotangents=cotangents)
        names = [*op.outputs, *sample.gradient_names()]
        assert len(actual) == len(baseline) == len(exact) == len(names), \
            f"{len(actual)} results, PyTorch {len(baseline)}, float64 {len(exact)}: expected {names}"
        for name, a, b, e in zip(names, actual, baseline, exact):
            assert a.shape == b.shape == e.shape, \
                f"{name}: shape {tuple(a.shape)}, PyTorch {tuple(b.shape)}, float64 {tuple(e.shape)}"
            assert a.dtype == b.dtype, f"{name}: dtype {a.dtype}, PyTorch's {b.dtype}"
            pooled.setdefault(name, []).append((a, b, e))
        results.append(dict(zip(names, actual)))
    for name, triples in pooled.items():
        a, b, e = triples[0] if len(triples) == 1 else [torch.cat([t[i].flatten() for t in triples]) for i in range(3)]
        if small == "finite" and a.numel() < MIN_SAMPLES:
            assert torch.isfinite(a).all(), f"{name}: {a}"
        else:
            assert_within_pytorch_error(name, a, b, e)
    return results


class CustomOpCalls(TorchDispatchMode):
    """Records every call of a vit_kernels custom op with its arguments (below autograd: what the op
    itself receives). A call in the backward (once ``in_backward`` is set) gets its tensors
    detached, as autograd hands them to it: the backward ops have no derivatives of their own."""

    def __init__(self):
        super().__init__()
        self.calls, self.in_backward = [], False

    @property
    def names(self) -> list[str]:
        """The ops called, in order, by name (``mlp_fwd``)."""
        return [func.__name__.split(".")[0] for func, _, _ in self.calls]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "vit_kernels":
            if not self.in_backward:
                self.calls.append((func, args, kwargs))
            else:
                def plain(a):
                    return a.detach() if isinstance(a, torch.Tensor) else a
                self.calls.append((func, tuple(map(plain, args)), {k: plain(v) for k, v in kwargs.items()}))
        return func(*args, **kwargs)


def opcheck(op: Op, sample: Sample) -> list:
    """torch.library.opcheck on every vit_kernels custom op that ``op``'s kernel path calls for
    ``sample``, in its forward and its backward, with the arguments it called it with. Returns the
    names of the ops checked (at least one)."""
    with vk.use_backend(op.backend), _autocast(sample):
        with CustomOpCalls() as spy:
            _run(op.kernel, sample, False, None, before_backward=lambda: setattr(spy, "in_backward", True))
        assert spy.calls, "the kernel path called no vit_kernels op"
        for func, args, kwargs in spy.calls:
            torch.library.opcheck(func, args, kwargs)
    return [str(func) for func, _, _ in spy.calls]


# --- the ops under test, declared once for their test files, the sweep and the regression tests -----

def _linear_kernel(x, weight, bias=None, activation="none", recompute=False):
    if activation == "none":
        return vk.ops.linear(x, weight, bias)
    return vk.ops.linear_gelu(x, weight, bias, activation, recompute=recompute)


def _linear_reference(x, weight, bias=None, activation="none", recompute=False):
    """recompute is a kernel flag (keep or recompute the pre-activation): the same function either way."""
    if activation == "none":
        return reference.linear(x, weight, bias)
    return reference.linear_gelu(x, weight, bias, activation)


def _mlp_kernel(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias=None, activation="gelu", recompute=False):
    return vk.ops.mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, recompute=recompute)


def _mlp_reference(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias=None, activation="gelu", recompute=False):
    """recompute is a kernel flag (keep or recompute the pre-activation): the same function either way."""
    return reference.mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation)


class RMSNorm(torch.nn.Module):
    """A norm the attention kernel does not fuse (not an nn.LayerNorm): applied in PyTorch."""

    def __init__(self, weight: torch.Tensor, eps: float = 1e-6):
        super().__init__()
        self.normalized_shape, self.eps, self.weight = weight.shape, eps, weight

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _qkv_attention(impl):
    """impl(qkv, num_heads, q_norm=, k_norm=, ...) with each norm made of tensor arguments: an
    nn.LayerNorm of the given weight and bias (of any layout, eps ``q_eps``/``k_eps``), or with
    ``rms=True`` an unfused RMSNorm of the given weight; a norm without parameters is passed as a
    module (``q_norm=``)."""
    def call(qkv, num_heads, q_weight=None, q_bias=None, k_weight=None, k_bias=None, q_norm=None, k_norm=None,
             rms=False, q_eps=1e-5, k_eps=1e-5, **kwargs):
        def norm(weight, bias, eps, module):
            if weight is None:
                return module
            return RMSNorm(weight) if rms else layer_norm_with(weight, bias, eps)
        return impl(qkv, num_heads, q_norm=norm(q_weight, q_bias, q_eps, q_norm),
                    k_norm=norm(k_weight, k_bias, k_eps, k_norm), **kwargs)
    return call


ADD_LAYER_NORM = Op(vk.ops.add_layer_norm, reference.add_layer_norm, outputs=("normed", "new_residual"))
# x, weight, bias; activation "none" is vk.ops.linear, any other vk.ops.linear_gelu.
LINEAR = Op(_linear_kernel, _linear_reference)
# fc2(act(fc1(x))): x, fc1_weight, fc1_bias, fc2_weight, fc2_bias; activation and recompute as kwargs.
MLP = Op(_mlp_kernel, _mlp_reference)
ATTENTION = Op(vk.ops.attention, reference.attention)
QKV_ATTENTION = Op(_qkv_attention(vk.ops.qkv_attention), _qkv_attention(reference.qkv_attention))
# The kernel path is the default dispatch ("auto": the C++ op on the CPU), the reference the same
# function under backend "torch" (it pads and checks as the op does).
PATCH_EMBED = Op(vk.ops.patch_embed, vk.ops.patch_embed, backend="auto")


class ArgumentSpy(TorchDispatchMode):
    """Records argument ``index`` of every call of the custom op ``op`` (an OpOverload) made inside."""

    def __init__(self, op, index: int):
        super().__init__()
        self.op, self.index, self.values = op, index, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is self.op:
            self.values.append(args[self.index])
        return func(*args, **(kwargs or {}))
