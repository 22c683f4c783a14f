"""Numerical checks shared by the tests.

The rule (DESIGN.md, Numerics), the same for every output and every gradient of every op:

    rms(actual - exact) <= FACTOR * rms(baseline - exact) + TINY_ATOL[dtype]

``exact`` is the float64 reference, ``baseline`` PyTorch's own result in ``actual``'s dtype, and
rms the root-mean-square over all elements (the norm-wise error ||actual - exact|| / sqrt(n)).

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
rows, channels or samples) where the gradient is a per-sample or per-channel reduction.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

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
    """The project's numerics rule (module docstring): ``actual`` is at most FACTOR times as far
    from ``exact`` as PyTorch's ``baseline``, in RMS over all elements."""
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
