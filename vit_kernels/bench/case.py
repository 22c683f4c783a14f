"""One benchmark row set: a case (one op or model at one shape, mode and dtype) and its providers.

A provider is a factory: given one input set it returns a zero-argument call whose result (a
tuple of tensors: outputs, then gradients) is checked against a high-precision reference before
anything is timed. A provider that disagrees is reported, not timed: a wrong fast result is
not a result.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

Result = tuple
Call = Callable[[], Result]

# Relative-error floor per dtype; a provider passes when its error is at most
# max(2 x the baseline provider's error, floor) (the project's 2x rule, with TF32 admitted for fp32).
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-3, torch.float16: 4e-3, torch.bfloat16: 2e-2}


@dataclass
class Case:
    kind: str                                   # "op" or "model"
    bench: str                                  # op or model name
    mode: str                                   # fwd | bwd | fwd+bwd | inference | train
    shape: str
    dtype: torch.dtype
    device: torch.device
    providers: dict[str, Callable[[object], Call]]
    baseline: str                               # what a user runs today; speed-ups are against it
    make_inputs: Callable[[], object]           # one fresh random input set
    reference: Callable[[object], Result]       # high-precision result on an input set
    flops: float = 0.0
    bytes: float = 0.0
    formula: str = ""
    items: int = 0                              # images per call (models), for img/s
    input_sets: int = 2
    # A provider that computes a different function (tanh GELU) names its own reference.
    provider_reference: dict[str, Callable[[object], Result]] = field(default_factory=dict)


def relative_error(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> float:
    """max over outputs of ||actual - expected|| / ||expected||; inf on NaN, a missing or a misshapen output."""
    actual, expected = tuple(actual), tuple(expected)
    if len(actual) != len(expected):
        return float("inf")
    worst = 0.0
    for a, e in zip(actual, expected):
        if a is None or e is None or a.shape != e.shape:
            return float("inf")
        a, e = a.detach().double(), e.detach().to(a.device).double()
        err = (torch.linalg.vector_norm(a - e) / torch.linalg.vector_norm(e).clamp_min(1e-30)).item()
        if err != err:
            return float("inf")
        worst = max(worst, err)
    return worst


def as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)
