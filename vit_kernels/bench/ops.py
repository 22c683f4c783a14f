"""The op benchmarks: each vk.ops function against what a timm user runs today, over ViT shapes.

``OP_BENCHES`` is the table: one ``OpBench`` per op, with its inputs, its FLOP and byte formulas
(code, and beside it the text of the rows' ``formula`` column), its providers and its baseline.
``python -m vit_kernels bench``, ``python -m vit_kernels info`` and benchmarks/test_ops_benchmark.py
all read it. Providers call only ``vit_kernels.ops.*`` and PyTorch, so a kernel that has not landed
yet is timed as whatever ``vk.ops`` dispatches to (``python -m vit_kernels info`` says which).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import ops as vk_ops
from .. import reference
from .case import Case, as_tuple

OP_MODES = ("fwd", "bwd", "fwd+bwd")
QUICK_OP_MODES = ("fwd", "fwd+bwd")

# ViT widths: (embed dim, heads).
WIDTHS = {"S": (384, 6), "B": (768, 12), "L": (1024, 16), "H": (1280, 16)}
# (width, tokens, batch): every width at 197 tokens, ViT-B at longer sequences with about the same
# token count per batch, and a batch sweep at ViT-B/16.
FULL_SHAPES = ([(w, 197, 256) for w in WIDTHS]
               + [("B", 257, 192), ("B", 577, 88), ("B", 1025, 48)]
               + [("B", 197, b) for b in (1, 32, 512)])
QUICK_SHAPES = {"cuda": [("B", 197, 64)], "cpu": [("S", 197, 2)]}
PATCH = 16


def shapes_for(device: torch.device, quick: bool) -> list:
    if quick or device.type != "cuda":
        return QUICK_SHAPES["cuda" if device.type == "cuda" else "cpu"]
    return FULL_SHAPES


@dataclass(frozen=True)
class Shape:
    """B batch, N tokens, C width, H heads; patch_embed reads the N - 1 patch tokens as a square grid."""
    B: int
    N: int
    C: int
    H: int

    @classmethod
    def of(cls, width, tokens: int, batch: int) -> "Shape":
        """``width`` is a WIDTHS name or (C, H), as in FULL_SHAPES and ``Plan.op_shapes``."""
        C, H = WIDTHS[width] if width in WIDTHS else width
        return cls(batch, tokens, C, H)

    @property
    def M(self) -> int:
        return self.B * self.N

    @property
    def D(self) -> int:
        return self.C // self.H

    @property
    def side(self) -> int:
        return round((self.N - 1) ** 0.5)

    @property
    def L(self) -> int:
        return self.side ** 2

    @property
    def img(self) -> int:
        return self.side * PATCH


@dataclass(frozen=True)
class OpBench:
    """One op's benchmark entry. Providers and the reference are forward functions of the inputs
    (plus ``kwargs(shape)`` as keywords); ``cost`` is the formula, ``formula`` says it in words."""
    op: str
    label: Callable[[Shape], str]                      # the rows' shape column
    inputs: Callable[..., tuple]                       # (shape, dtype, device) -> one random input set
    grad_inputs: tuple                                 # the inputs that bwd differentiates
    cost: Callable[[Shape, int], dict]                 # (shape, bytes per element) -> {"fwd"/"bwd": (flop, bytes)}
    formula: str
    reference: Callable                                # run on float64 copies of the inputs
    baseline: str                                      # what a timm user runs today; speed-ups are against it
    providers: dict
    cuda_providers: dict = field(default_factory=dict)
    compiled: Optional[Callable] = None                # torch.compile'd as "compile" when compile is on
    forward_only: frozenset = frozenset()              # providers without an autograd formula
    provider_reference: dict = field(default_factory=dict)   # a provider that computes another function
    kwargs: Callable[[Shape], dict] = lambda shape: {}

    def provider_names(self, cuda: bool, compile_: bool) -> list[str]:
        compiled = ["compile"] if compile_ and self.compiled is not None else []
        return [*self.providers, *(self.cuda_providers if cuda else ()), *compiled]

    def bind(self, fn: Callable, shape: Shape) -> Callable:
        return functools.partial(fn, **self.kwargs(shape))

    def forward_functions(self, shape: Shape, device: torch.device, compile_: bool) -> dict:
        fns = {**self.providers, **(self.cuda_providers if device.type == "cuda" else {})}
        if compile_ and self.compiled is not None:
            fns["compile"] = torch.compile(self.compiled, dynamic=False)
        return {name: self.bind(fn, shape) for name, fn in fns.items()}

    def cost_per_mode(self, shape: Shape, dtype: torch.dtype) -> dict:
        """mode -> (flop, bytes); fwd+bwd is the sum."""
        cost = self.cost(shape, torch.empty((), dtype=dtype).element_size())
        return {**cost, "fwd+bwd": tuple(f + b for f, b in zip(cost["fwd"], cost["bwd"]))}


def _randn(*shape, device, dtype, scale=1.0):
    return torch.randn(*shape, device=device, dtype=dtype) * scale


# --- attention: the packed qkv (B, N, 3C) -> (B, N, C); timm runs SDPA on its split ---------------

def _timm_attention(qkv, num_heads, backend=None):
    """``backend``: an SDPBackend name; None lets SDPA choose."""
    B, N, C3 = qkv.shape
    q, k, v = qkv.reshape(B, N, 3, num_heads, C3 // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)
    ctx = contextlib.nullcontext() if backend is None else \
        torch.nn.attention.sdpa_kernel(getattr(torch.nn.attention.SDPBackend, backend))
    with ctx:
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(B, N, C3 // 3)


def _attention_cost(x: Shape, s: int) -> dict:
    flop = 4 * x.B * x.H * x.N * x.N * x.D
    return {"fwd": (flop, 4 * x.M * x.C * s), "bwd": (2.5 * flop, 8 * x.M * x.C * s)}


ATTENTION = OpBench(
    op="attention", label=lambda x: f"B={x.B} N={x.N} C={x.C} H={x.H}",
    inputs=lambda x, dtype, device: (_randn(x.B, x.N, 3 * x.C, device=device, dtype=dtype),), grad_inputs=(0,),
    cost=_attention_cost,
    formula="fwd 4*B*H*N^2*D flop, 4*M*C*s bytes (read qkv, write out); bwd 2.5x the flop, 8*M*C*s bytes",
    reference=reference.qkv_attention, baseline="timm",
    providers={"vk": vk_ops.qkv_attention, "timm": _timm_attention},
    cuda_providers={name: functools.partial(_timm_attention, backend=backend) for name, backend in (
        ("sdpa-flash", "FLASH_ATTENTION"), ("sdpa-efficient", "EFFICIENT_ATTENTION"),
        ("sdpa-cudnn", "CUDNN_ATTENTION"), ("sdpa-math", "MATH"))},
    kwargs=lambda x: {"num_heads": x.H})


# --- add_layer_norm: x, residual (B, N, C); weight, bias, gamma (C,) ----------------------------

def _eager_add_layer_norm(x, residual, weight, bias, gamma):
    new_residual = residual + gamma * x
    return F.layer_norm(new_residual, (x.shape[-1],), weight, bias, 1e-6), new_residual


def _add_layer_norm_inputs(x: Shape, dtype, device) -> tuple:
    return (_randn(x.B, x.N, x.C, device=device, dtype=dtype), _randn(x.B, x.N, x.C, device=device, dtype=dtype),
            1 + 0.1 * _randn(x.C, device=device, dtype=dtype), 0.1 * _randn(x.C, device=device, dtype=dtype),
            0.1 + 0.01 * _randn(x.C, device=device, dtype=dtype))


ADD_LAYER_NORM = OpBench(
    op="add_layer_norm", label=lambda x: f"B={x.B} N={x.N} C={x.C}",
    inputs=_add_layer_norm_inputs, grad_inputs=(0, 1, 2, 3, 4),
    cost=lambda x, s: {"fwd": (0, 4 * x.M * x.C * s), "bwd": (0, 5 * x.M * x.C * s)},
    formula="fwd 4*M*C*s bytes (read x, residual; write normed, residual); bwd 5*M*C*s",
    reference=lambda x, r, w, b, g: reference.add_layer_norm(x, r, w, b, 1e-6, g), baseline="eager",
    providers={"vk": lambda x, r, w, b, g: vk_ops.add_layer_norm(x, r, w, b, 1e-6, gamma=g),
               "eager": _eager_add_layer_norm},
    compiled=_eager_add_layer_norm)


# --- linear_gelu: x (B, N, C) @ weight (4C, C)^T + bias (4C,), then GELU ------------------------

def _eager_linear_gelu(x, weight, bias):
    return F.gelu(F.linear(x, weight, bias))


def _addmm_gelu(x, weight, bias):
    # cuBLASLt's bias+GELU epilogue; it is the tanh approximation, so it is checked against that.
    return torch._addmm_activation(bias, x.flatten(0, -2), weight.t(), use_gelu=True).unflatten(0, x.shape[:-1])


def _linear_gelu_cost(x: Shape, s: int) -> dict:
    flop, byte = 2 * x.M * x.C * 4 * x.C, (x.M * x.C + 4 * x.C * x.C + x.M * 4 * x.C) * s
    return {"fwd": (flop, byte), "bwd": (2 * flop, 2 * byte)}


LINEAR_GELU = OpBench(
    op="linear_gelu", label=lambda x: f"M={x.M} K={x.C} N={4 * x.C}",
    inputs=lambda x, dtype, device: (_randn(x.B, x.N, x.C, device=device, dtype=dtype),
                                     _randn(4 * x.C, x.C, device=device, dtype=dtype, scale=x.C ** -0.5),
                                     0.1 * _randn(4 * x.C, device=device, dtype=dtype)),
    grad_inputs=(0, 1, 2),
    cost=_linear_gelu_cost, formula="fwd 2*M*C*4C flop, (M*C + 4C*C + M*4C)*s bytes; bwd 2x the flop",
    reference=reference.linear_gelu, baseline="eager",
    providers={"vk": vk_ops.linear_gelu, "eager": _eager_linear_gelu, "addmm_gelu_tanh": _addmm_gelu},
    compiled=_eager_linear_gelu,
    # torch._addmm_activation has no autograd formula: timed forward only.
    forward_only=frozenset({"addmm_gelu_tanh"}),
    provider_reference={"addmm_gelu_tanh": functools.partial(reference.linear_gelu, activation_name="gelu_tanh")})


# --- linear: h (B, N, 4C) @ weight (C, 4C)^T + bias (C,), fc2 of the MLP: the plain GEMM --------

def _linear_cost(x: Shape, s: int) -> dict:
    flop, byte = 2 * x.M * 4 * x.C * x.C, (x.M * 4 * x.C + 4 * x.C * x.C + x.M * x.C) * s
    return {"fwd": (flop, byte), "bwd": (2 * flop, 2 * byte)}


LINEAR = OpBench(
    op="linear", label=lambda x: f"M={x.M} K={4 * x.C} N={x.C}",
    inputs=lambda x, dtype, device: (_randn(x.B, x.N, 4 * x.C, device=device, dtype=dtype),
                                     _randn(x.C, 4 * x.C, device=device, dtype=dtype, scale=(4 * x.C) ** -0.5),
                                     0.1 * _randn(x.C, device=device, dtype=dtype)),
    grad_inputs=(0, 1, 2),
    cost=_linear_cost, formula="fwd 2*M*4C*C flop, (M*4C + 4C*C + M*C)*s bytes; bwd 2x the flop",
    reference=reference.linear, baseline="eager",
    providers={"vk": vk_ops.linear, "eager": F.linear},
    compiled=F.linear)


# --- mlp: fc2(GELU(fc1(x))), x (B, N, C), fc1 (4C, C), fc2 (C, 4C): timm's Mlp ---------------------

def _eager_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
    return F.linear(F.gelu(F.linear(x, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)


def _mlp_cost(x: Shape, s: int) -> dict:
    flop = 2 * 2 * x.M * x.C * 4 * x.C
    byte = (2 * x.M * x.C + 2 * 4 * x.C * x.C + x.M * 4 * x.C) * s  # x, y, both weights; h once (fc1 -> fc2)
    return {"fwd": (flop, byte), "bwd": (2 * flop, 2 * byte)}


MLP = OpBench(
    op="mlp", label=lambda x: f"M={x.M} C={x.C} H={4 * x.C}",
    inputs=lambda x, dtype, device: (_randn(x.B, x.N, x.C, device=device, dtype=dtype),
                                     _randn(4 * x.C, x.C, device=device, dtype=dtype, scale=x.C ** -0.5),
                                     0.1 * _randn(4 * x.C, device=device, dtype=dtype),
                                     _randn(x.C, 4 * x.C, device=device, dtype=dtype, scale=(4 * x.C) ** -0.5),
                                     0.1 * _randn(x.C, device=device, dtype=dtype)),
    grad_inputs=(0, 1, 2, 3, 4),
    cost=_mlp_cost, formula="fwd 4*M*C*4C flop, (2*M*C + 8C*C + M*4C)*s bytes; bwd 2x the flop",
    reference=reference.mlp, baseline="eager",
    providers={"vk": vk_ops.mlp, "vk_recompute": functools.partial(vk_ops.mlp, recompute=True), "eager": _eager_mlp},
    compiled=_eager_mlp)


# --- patch_embed: uint8 images (B, 3, img, img) -> tokens (B, L + 1, C) -------------------------

def _timm_patch_embed(images, weight, bias, pos_embed, cls_token, mean, std):
    x = images.to(weight.dtype) / 255
    x = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    x = F.conv2d(x, weight, bias, stride=weight.shape[-2:]).flatten(2).transpose(1, 2)
    x = torch.cat([cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    return x + pos_embed


def _patch_embed_inputs(x: Shape, dtype, device) -> tuple:
    return (torch.randint(0, 256, (x.B, 3, x.img, x.img), device=device, dtype=torch.uint8),
            _randn(x.C, 3, PATCH, PATCH, device=device, dtype=dtype, scale=(3 * PATCH * PATCH) ** -0.5),
            0.1 * _randn(x.C, device=device, dtype=dtype), 0.02 * _randn(1, x.L + 1, x.C, device=device, dtype=dtype),
            0.02 * _randn(1, 1, x.C, device=device, dtype=dtype),
            torch.tensor([0.485, 0.456, 0.406], device=device, dtype=dtype),
            torch.tensor([0.229, 0.224, 0.225], device=device, dtype=dtype))


def _patch_embed_cost(x: Shape, s: int) -> dict:
    flop = 2 * x.B * x.L * x.C * 3 * PATCH * PATCH
    byte = 3 * x.img * x.img * x.B + (3 * PATCH * PATCH * x.C + x.B * (x.L + 1) * x.C) * s
    return {"fwd": (flop, byte), "bwd": (2 * flop, 2 * byte)}


PATCH_EMBED = OpBench(
    op="patch_embed", label=lambda x: f"B={x.B} img={x.img} p={PATCH} C={x.C}",
    inputs=_patch_embed_inputs, grad_inputs=(1, 2, 3, 4),
    cost=_patch_embed_cost, formula="fwd 2*B*L*C*3p^2 flop, 3*H*W*B (uint8) + (3p^2*C + B*(L+1)*C)*s bytes",
    reference=reference.patch_embed, baseline="timm",
    providers={"vk": vk_ops.patch_embed, "timm": _timm_patch_embed},
    compiled=_timm_patch_embed)


OP_BENCHES = {b.op: b for b in (ATTENTION, ADD_LAYER_NORM, LINEAR, LINEAR_GELU, MLP, PATCH_EMBED)}
OPS = tuple(OP_BENCHES)
# Every provider name of every op, so that a --providers filter with a typo is refused rather than
# silently keeping only the baselines.
OP_PROVIDERS = tuple(dict.fromkeys(name for cuda in (False, True) for b in OP_BENCHES.values()
                                   for name in b.provider_names(cuda, compile_=True)))


def _make_call(fn: Callable, mode: str, inputs: tuple, leaves: tuple, grads: tuple) -> Callable:
    """A zero-argument call running ``fn`` on ``inputs`` in ``mode``; returns outputs and/or gradients."""
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return as_tuple(fn(*inputs))
        return call
    xs = [t.detach().requires_grad_(i in leaves) for i, t in enumerate(inputs)]
    wrt = [xs[i] for i in leaves]
    if mode == "bwd":
        outs = as_tuple(fn(*xs))
        return lambda: torch.autograd.grad(outs, wrt, grads, retain_graph=True)

    def call():
        outs = as_tuple(fn(*xs))
        return outs + torch.autograd.grad(outs, wrt, grads)
    return call


def _high_precision(fn: Callable, mode: str, leaves: tuple):
    """The reference in float64 on upcast copies of the inputs, run in ``mode``."""
    def run(input_set):
        inputs, grads = input_set
        up = tuple(t.double() if t.is_floating_point() else t for t in inputs)
        return _make_call(fn, mode, up, leaves, tuple(g.double() for g in grads))()
    return run


def op_cases(op: str, device: torch.device, dtype: torch.dtype, modes, quick: bool, compile_: bool,
             shapes: Optional[list] = None) -> list[Case]:
    """One case per shape and mode of ``OP_BENCHES[op]``; ``shapes`` as in FULL_SHAPES."""
    if op not in OP_BENCHES:
        raise ValueError(f"unknown op {op!r}; valid ops: {', '.join(OPS)}")
    entry, leaves = OP_BENCHES[op], OP_BENCHES[op].grad_inputs
    cases = []
    for shape in (Shape.of(*x) for x in shapes or shapes_for(device, quick)):
        provs = entry.forward_functions(shape, device, compile_)
        cost = entry.cost_per_mode(shape, dtype)
        for mode in modes:
            def make_set(shape=shape, baseline_fn=provs[entry.baseline]):
                inputs = entry.inputs(shape, dtype, device)
                with torch.no_grad():
                    outs = as_tuple(baseline_fn(*inputs))
                return inputs, tuple(torch.randn_like(o) for o in outs)

            factories = {name: (lambda s, fn=fn, mode=mode: _make_call(fn, mode, s[0], leaves, s[1]))
                         for name, fn in provs.items() if mode == "fwd" or name not in entry.forward_only}
            references = {k: _high_precision(entry.bind(f, shape), mode, leaves)
                          for k, f in entry.provider_reference.items()}
            cases.append(Case("op", op, mode, entry.label(shape), dtype, device, factories, entry.baseline, make_set,
                              _high_precision(entry.bind(entry.reference, shape), mode, leaves), *cost[mode],
                              entry.formula, provider_reference=references))
    return cases
