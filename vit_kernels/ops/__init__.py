"""The fused ops. Each dispatches (``backend.runs_kernels``) to its kernel or to the reference.

One private module per op (``_attention``, ``_add_layer_norm``, ...): validation, the public
function, and its forward and backward ops registered with ``backend.kernel_op``. The modules
are private so that ``vit_kernels.ops.attention`` is only ever the function.
"""
from __future__ import annotations

import torch

from .. import backend
from ._add_layer_norm import add_layer_norm
from ._attention import attention, qkv_attention
from ._linear_gelu import linear, linear_gelu
from ._mlp import mlp
from ._patch_embed import extension_choice, patch_embed

__all__ = ["add_layer_norm", "attention", "qkv_attention", "linear", "linear_gelu", "mlp", "patch_embed",
           "implementation"]

# What each op's kernel path runs, as ``implementation`` reports it.
_KERNELS = {
    "attention": "Triton flash attention (float32 on a GPU runs the reference)",
    "qkv_attention": "Triton flash attention on the packed projection (float32 on a GPU runs the reference)",
    "add_layer_norm": "Triton add + LayerNorm kernel",
    "linear": "Triton persistent GEMM with the bias in its epilogue (float32 on a GPU runs cuBLAS through "
              "PyTorch)",
    "linear_gelu": "Triton persistent GEMM with bias + activation in its epilogue (float32 on a GPU runs cuBLAS "
                   "through PyTorch)",
    "mlp": "Triton persistent GEMMs: fc1 + bias + activation, fc2 + bias; act' in one backward epilogue "
           "(float32 on a GPU runs cuBLAS through PyTorch)",
}


def implementation(op: str, device: torch.device | str) -> tuple[str, str]:
    """Which implementation runs the op ``op`` (a name in ``__all__``) on ``device``, and why:
    "triton", "extension" (patch_embed's C++/CUDA), "torch" (the reference) or "unavailable".
    float64 inputs run the reference in every op. Loads the patch-embed extension if needed."""
    if op == "patch_embed":
        return extension_choice(device)
    if op not in _KERNELS:
        raise ValueError(f"op must be one of {[*_KERNELS, 'patch_embed']}; got {op!r}")
    return backend.implementation(_KERNELS[op], device)
