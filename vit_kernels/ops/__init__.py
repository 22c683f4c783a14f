"""The fused ops. Each dispatches (see ``vit_kernels.backend``) to its kernel or to the reference."""
from .add_layer_norm import add_layer_norm
from .attention import attention, qkv_attention
from .linear_gelu import linear, linear_gelu
from .patch_embed import patch_embed

__all__ = ["add_layer_norm", "attention", "qkv_attention", "linear", "linear_gelu", "patch_embed"]
