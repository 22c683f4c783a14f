"""The op benchmarks: each vk.ops function against what a timm user runs today, over ViT shapes.

Providers call only ``vit_kernels.ops.*`` and PyTorch, so a kernel that has not landed yet is
timed as whatever ``vk.ops`` dispatches to (``python -m vit_kernels info`` says which).
Formulas (s = bytes per element; B batch, N tokens, C width, H heads, D = C / H, M = B * N):
  attention       fwd 4*B*H*N^2*D flop, 4*M*C*s bytes (read qkv, write out); bwd 2.5x the flop, 8*M*C*s bytes
  add_layer_norm  fwd 4*M*C*s bytes (read x, residual; write normed, residual); bwd 5*M*C*s
  linear_gelu     fwd 2*M*C*4C flop, (M*C + 4C*C + M*4C)*s bytes; bwd 2x the flop
  patch_embed     fwd 2*B*L*C*3p^2 flop, 3*H*W*B (uint8) + (3p^2*C + B*(L+1)*C)*s bytes
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import ops as vk_ops
from .. import reference
from .case import Case, as_tuple

OPS = ("attention", "add_layer_norm", "linear_gelu", "patch_embed")
OP_MODES = ("fwd", "bwd", "fwd+bwd")
# Every name ``_providers`` gives a provider (sdpa-* on CUDA, compile with torch.compile on), so that
# a --providers filter with a typo is refused rather than silently keeping only the baselines.
OP_PROVIDERS = ("vk", "timm", "eager", "compile", "addmm_gelu_tanh",
                "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math")

# ViT widths: (embed dim, heads).
WIDTHS = {"S": (384, 6), "B": (768, 12), "L": (1024, 16), "H": (1280, 16)}
# (width, tokens, batch): every width at 197 tokens, ViT-B at longer sequences with about the same
# token count per batch, and a batch sweep at ViT-B/16.
FULL_SHAPES = ([(w, 197, 256) for w in WIDTHS]
               + [("B", 257, 192), ("B", 577, 88), ("B", 1025, 48)]
               + [("B", 197, b) for b in (1, 32, 512)])
# torch._addmm_activation has no autograd formula: timed forward only.
FORWARD_ONLY = {"addmm_gelu_tanh"}
QUICK_SHAPES = {"cuda": [("B", 197, 64)], "cpu": [("S", 197, 2)]}


def shapes_for(device: torch.device, quick: bool) -> list:
    if quick or device.type != "cuda":
        return QUICK_SHAPES["cuda" if device.type == "cuda" else "cpu"]
    return FULL_SHAPES


def _randn(*shape, device, dtype, scale=1.0):
    return torch.randn(*shape, device=device, dtype=dtype) * scale


# --- the timm paths (what the user pays today) -------------------------------------------------

def _timm_attention(qkv, num_heads, backend=None):
    B, N, C3 = qkv.shape
    q, k, v = qkv.reshape(B, N, 3, num_heads, C3 // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)
    ctx = contextlib.nullcontext() if backend is None else torch.nn.attention.sdpa_kernel(backend)
    with ctx:
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(B, N, C3 // 3)


def _eager_add_layer_norm(x, residual, weight, bias, gamma):
    new_residual = residual + gamma * x
    return F.layer_norm(new_residual, (x.shape[-1],), weight, bias, 1e-6), new_residual


def _eager_linear_gelu(x, weight, bias):
    return F.gelu(F.linear(x, weight, bias))


def _addmm_gelu(x, weight, bias):
    # cuBLASLt's bias+GELU epilogue; it is the tanh approximation, so it is checked against that.
    return torch._addmm_activation(bias, x.flatten(0, -2), weight.t(), use_gelu=True).unflatten(0, x.shape[:-1])


def _timm_patch_embed(images, weight, bias, pos_embed, cls_token, mean, std):
    x = images.to(weight.dtype) / 255
    x = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    x = F.conv2d(x, weight, bias, stride=weight.shape[-2:]).flatten(2).transpose(1, 2)
    x = torch.cat([cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    return x + pos_embed


# --- one case per (op, shape, mode, dtype) ------------------------------------------------------

def _inputs_and_formula(op: str, width: str, n: int, batch: int, dtype, device):
    """(make_inputs, grad indices, flop/byte per mode, formula, shape label)."""
    C, H = WIDTHS[width] if width in WIDTHS else width
    s = torch.empty((), dtype=dtype).element_size()
    M = batch * n
    if op == "attention":
        D = C // H
        make = lambda: (_randn(batch, n, 3 * C, device=device, dtype=dtype),)
        flops = {"fwd": 4 * batch * H * n * n * D}
        flops.update(bwd=2.5 * flops["fwd"], **{"fwd+bwd": 3.5 * flops["fwd"]})
        byts = {"fwd": 4 * M * C * s, "bwd": 8 * M * C * s, "fwd+bwd": 12 * M * C * s}
        return make, (0,), flops, byts, f"B={batch} N={n} C={C} H={H}", {"num_heads": H}
    if op == "add_layer_norm":
        make = lambda: (_randn(batch, n, C, device=device, dtype=dtype), _randn(batch, n, C, device=device, dtype=dtype),
                        1 + 0.1 * _randn(C, device=device, dtype=dtype), 0.1 * _randn(C, device=device, dtype=dtype),
                        0.1 + 0.01 * _randn(C, device=device, dtype=dtype))
        byts = {"fwd": 4 * M * C * s, "bwd": 5 * M * C * s, "fwd+bwd": 9 * M * C * s}
        return make, (0, 1, 2, 3, 4), {m: 0 for m in byts}, byts, f"B={batch} N={n} C={C}", {}
    if op == "linear_gelu":
        make = lambda: (_randn(batch, n, C, device=device, dtype=dtype), _randn(4 * C, C, device=device, dtype=dtype, scale=C ** -0.5),
                        0.1 * _randn(4 * C, device=device, dtype=dtype))
        f = 2 * M * C * 4 * C
        b = (M * C + 4 * C * C + M * 4 * C) * s
        return make, (0, 1, 2), {"fwd": f, "bwd": 2 * f, "fwd+bwd": 3 * f}, \
            {"fwd": b, "bwd": 2 * b, "fwd+bwd": 3 * b}, f"M={M} K={C} N={4 * C}", {}
    if op == "patch_embed":
        p = 16
        side = round((n - 1) ** 0.5)
        L = side * side
        img = side * p
        make = lambda: (torch.randint(0, 256, (batch, 3, img, img), device=device, dtype=torch.uint8),
                        _randn(C, 3, p, p, device=device, dtype=dtype, scale=(3 * p * p) ** -0.5),
                        0.1 * _randn(C, device=device, dtype=dtype), 0.02 * _randn(1, L + 1, C, device=device, dtype=dtype),
                        0.02 * _randn(1, 1, C, device=device, dtype=dtype),
                        torch.tensor([0.485, 0.456, 0.406], device=device, dtype=dtype),
                        torch.tensor([0.229, 0.224, 0.225], device=device, dtype=dtype))
        f = 2 * batch * L * C * 3 * p * p
        b = 3 * img * img * batch + (3 * p * p * C + batch * (L + 1) * C) * s
        return make, (1, 2, 3, 4), {"fwd": f, "bwd": 2 * f, "fwd+bwd": 3 * f}, \
            {"fwd": b, "bwd": 2 * b, "fwd+bwd": 3 * b}, f"B={batch} img={img} p={p} C={C}", {}
    raise ValueError(f"unknown op {op!r}; valid ops: {', '.join(OPS)}")


def _providers(op: str, device: torch.device, compile_: bool, extra: dict):
    """name -> forward function, the baseline's name, and per-provider references."""
    refs = {}
    if op == "attention":
        H = extra["num_heads"]
        provs = {"vk": lambda qkv: vk_ops.qkv_attention(qkv, H), "timm": lambda qkv: _timm_attention(qkv, H)}
        if device.type == "cuda":
            from torch.nn.attention import SDPBackend
            for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                             ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)):
                provs[f"sdpa-{name}"] = lambda qkv, be=be: _timm_attention(qkv, H, be)
        return provs, "timm", (lambda qkv: reference.qkv_attention(qkv, H)), refs
    if op == "add_layer_norm":
        provs = {"vk": lambda x, r, w, b, g: vk_ops.add_layer_norm(x, r, w, b, 1e-6, gamma=g),
                 "eager": _eager_add_layer_norm}
        if compile_:
            provs["compile"] = torch.compile(_eager_add_layer_norm, dynamic=False)
        return provs, "eager", (lambda x, r, w, b, g: reference.add_layer_norm(x, r, w, b, 1e-6, g)), refs
    if op == "linear_gelu":
        provs = {"vk": vk_ops.linear_gelu, "eager": _eager_linear_gelu, "addmm_gelu_tanh": _addmm_gelu}
        refs["addmm_gelu_tanh"] = lambda x, w, b: reference.linear_gelu(x, w, b, "gelu_tanh")
        if compile_:
            provs["compile"] = torch.compile(_eager_linear_gelu, dynamic=False)
        return provs, "eager", reference.linear_gelu, refs
    if op == "patch_embed":
        provs = {"vk": lambda im, w, b, pos, cls, mean, std: vk_ops.patch_embed(im, w, b, pos, cls, mean, std),
                 "timm": _timm_patch_embed}
        if compile_:
            provs["compile"] = torch.compile(_timm_patch_embed, dynamic=False)
        return provs, "timm", (lambda im, w, b, pos, cls, mean, std: reference.patch_embed(im, w, b, pos, cls, mean, std)), refs
    raise ValueError(f"unknown op {op!r}; valid ops: {', '.join(OPS)}")


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
    cases = []
    for width, n, batch in shapes or shapes_for(device, quick):
        make, leaves, flops, byts, label, extra = _inputs_and_formula(op, width, n, batch, dtype, device)
        provs, baseline, ref_fn, refs = _providers(op, device, compile_, extra)
        for mode in modes:
            def make_set(make=make, baseline_fn=provs[baseline]):
                inputs = make()
                with torch.no_grad():
                    outs = as_tuple(baseline_fn(*inputs))
                return inputs, tuple(torch.randn_like(o) for o in outs)

            factories = {name: (lambda s, fn=fn, mode=mode, leaves=leaves: _make_call(fn, mode, s[0], leaves, s[1]))
                         for name, fn in provs.items() if mode == "fwd" or name not in FORWARD_ONLY}
            formula = __doc__.split(f"  {op}")[1].split("\n")[0].strip()
            cases.append(Case("op", op, mode, label, dtype, device, factories, baseline, make_set,
                              _high_precision(ref_fn, mode, leaves), flops[mode], byts[mode], formula,
                              provider_reference={k: _high_precision(f, mode, leaves) for k, f in refs.items()}))
    return cases
