"""Numerical checks shared by the tests.

The rule (DESIGN.md, Numerics): a fused result passes when its error against a float64
reference is at most ``factor`` (2) times the error of PyTorch's own implementation in the
same dtype, plus a tiny atol, for outputs and for every gradient.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

# Below this, an error is noise of the float64 reference itself or of an exact result.
TINY_ATOL = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float64: 1e-12}


def error_report(name: str, actual: torch.Tensor, exact: torch.Tensor) -> tuple[float, str]:
    """The max abs error of ``actual`` against ``exact`` and a line with mean error and worst index."""
    err = (actual.detach().double() - exact.detach().double()).abs()
    if err.numel() == 0:
        return 0.0, f"{name}: empty"
    if torch.isnan(err).any():
        worst = tuple(torch.nonzero(torch.isnan(err))[0].tolist())
        return float("inf"), f"{name}: NaN at {worst} (an unwritten or invalid element)"
    worst = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
    return err.max().item(), (f"{name}: max {err.max().item():.3e} mean {err.mean().item():.3e} at {worst} "
                              f"(got {actual.flatten()[err.argmax()].item():.6g}, "
                              f"exact {exact.flatten()[err.argmax()].item():.6g})")


def assert_within_pytorch_error(name: str, actual: torch.Tensor, baseline: torch.Tensor,
                                exact: torch.Tensor, factor: float = 2.0, atol: float | None = None) -> None:
    """Assert |actual - exact| <= factor * |baseline - exact| + atol (max over elements).

    ``baseline`` is PyTorch's own result in the same dtype as ``actual``; ``exact`` is float64.
    """
    assert actual.shape == exact.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    atol = TINY_ATOL[actual.dtype] if atol is None else atol
    ours, ours_line = error_report(name, actual, exact)
    theirs, theirs_line = error_report(name + " (PyTorch)", baseline, exact)
    assert ours <= factor * theirs + atol, f"{ours_line}\n  vs {theirs_line}; allowed {factor}x + {atol:.1e}"


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
