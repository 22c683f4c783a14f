"""The building blocks of timm's VisionTransformer, with timm's names, arguments and defaults.

Module and parameter names equal timm's (``timm/layers/``), so a timm state_dict loads strictly.
The hot paths call ``vit_kernels.ops``, which dispatches to the kernels or the PyTorch reference.

``Block`` runs the fused residual stream: a residual add ``x + drop_path(ls(branch))`` is left
*pending* (a ``Pending`` tuple) and done by the next LayerNorm in one ``ops.add_layer_norm``
call (norm2, the next block's norm1, or the model's final norm), so the stream is read and
written once per add.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.jit import Final

from . import backend, ops
from .reference import residual_branch

LayerType = Union[str, Callable, Type[nn.Module]]


def to_2tuple(x) -> Tuple[int, int]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


def refuse_torchscript(module: nn.Module) -> nn.Module:
    """``__prepare_scriptable__`` of the modules that call vit_kernels' ops: torch.jit.script calls
    it first, and it says what to do instead of failing on an annotation deep in the class."""
    raise TypeError(
        f"torch.jit.script: {type(module).__name__} is a vit_kernels module, which TorchScript cannot "
        "compile (its ops dispatch in Python to Triton kernels and a C++/CUDA extension). Use "
        "torch.compile, torch.export or torch.onnx.export instead; torch.jit.trace records the ops. For "
        "a timm model passed through vk.optimize, vk.restore(model) gives back timm's modules, which script.")


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False,
              scale_by_keep: bool = True) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability ``drop_prob``."""
    return residual_branch(x, row_scale=drop_path_scale(x, drop_prob, training, scale_by_keep))


def drop_path_scale(x: torch.Tensor, drop_prob: float, training: bool,
                    scale_by_keep: bool = True) -> Optional[torch.Tensor]:
    """DropPath's per-sample factor (0 or 1 / keep_prob, shape (B,)), or None when it is the identity."""
    if drop_prob == 0.0 or not training:
        return None
    keep_prob = 1.0 - drop_prob
    scale = x.new_empty(x.shape[0]).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        scale.div_(keep_prob)
    return scale


class DropPath(nn.Module):
    """Drop paths (stochastic depth) per sample, applied in the main path of residual blocks."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def row_scale(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """This call's per-sample factor, for ops that fold it into a fused residual add."""
        return drop_path_scale(x, self.drop_prob, self.training, self.scale_by_keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dim (eps 1e-6 as timm's), running on the add+LayerNorm op."""

    __prepare_scriptable__ = refuse_torchscript

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True, **kwargs):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.add_layer_norm(x, None, self.weight, self.bias, self.eps)[0]


class LayerNorm2d(LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (timm's ``LayerNorm2d``, eps 1e-6)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class QuickGELU(nn.Module):
    """CLIP's x * sigmoid(1.702 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


_ACT_LAYERS = {
    "gelu": nn.GELU,
    "gelu_tanh": partial(nn.GELU, approximate="tanh"),
    "quick_gelu": QuickGELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}
_NORM_LAYERS = {"layernorm": LayerNorm, "layernorm2d": LayerNorm2d}


def get_act_layer(act_layer: Optional[LayerType]) -> Optional[Callable]:
    if act_layer is None or not isinstance(act_layer, str):
        return act_layer
    if act_layer not in _ACT_LAYERS:
        raise ValueError(f"act_layer must be one of {sorted(_ACT_LAYERS)} or a module class; got {act_layer!r}")
    return _ACT_LAYERS[act_layer]


def get_norm_layer(norm_layer: Optional[LayerType]) -> Optional[Callable]:
    if norm_layer is None or not isinstance(norm_layer, str):
        return norm_layer
    if norm_layer.lower() not in _NORM_LAYERS:
        raise ValueError(f"norm_layer must be one of {sorted(_NORM_LAYERS)} or a module class; got {norm_layer!r}")
    return _NORM_LAYERS[norm_layer.lower()]


def fused_activation_name(act: nn.Module) -> Optional[str]:
    """The ``linear_gelu`` activation equal to ``act``, or None if the op has none."""
    if type(act) is nn.GELU:
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    if type(act) is QuickGELU:
        return "quick_gelu"
    return None


# Hook dictionaries of nn.Module (read, never written): a module with any hook runs as itself.
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")
# The hooks torch.nn.modules.module.register_module_forward_hook & co. put on every module.
_GLOBAL_HOOK_DICTS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                      "_global_backward_pre_hooks")


def has_hooks(module: nn.Module) -> bool:
    """Whether hooks are registered on ``module`` itself, or on every module (fusing it away would
    skip them)."""
    return (any(getattr(module, name, None) for name in _HOOK_DICTS)
            or any(getattr(torch.nn.modules.module, name, None) for name in _GLOBAL_HOOK_DICTS))


def is_last_dim_layer_norm(norm: nn.Module) -> bool:
    """Whether ``norm`` is a LayerNorm over the last dim (its forward is nn.LayerNorm's or vk's) and
    has no hooks, so the add+LayerNorm op can run in its place."""
    return (isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1
            and type(norm).forward in (nn.LayerNorm.forward, LayerNorm.forward) and not has_hooks(norm))


class Attention(nn.Module):
    """Multi-head self-attention on the packed qkv projection.

    ``fused_attn=True`` runs ``vk.ops.qkv_attention`` (the flash kernel on CUDA); with an
    ``attn_mask`` or ``is_causal`` it runs ``F.scaled_dot_product_attention`` with SDPA's mask
    semantics. ``fused_attn=False`` computes the softmax explicitly, so ``attn_drop`` hooks see
    the attention map, as in timm.
    """
    fused_attn: Final[bool]
    __prepare_scriptable__ = refuse_torchscript

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_norm: bool = False,
                 scale_norm: bool = False, proj_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, norm_layer: Optional[Type[nn.Module]] = None,
                 attn_head_dim: Optional[int] = None, dim_out: Optional[int] = None,
                 fused_attn: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if attn_head_dim is None and dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("norm_layer must be given when qk_norm or scale_norm is True")
        self.num_heads = num_heads
        self.head_dim = attn_head_dim or dim // num_heads
        self.attn_dim = num_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.proj = nn.Linear(self.attn_dim, dim_out or dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x)
        dropout_p = self.attn_drop.p if self.training else 0.0
        if self.fused_attn and attn_mask is None and not is_causal and self._norms_fuse(qkv):
            x = ops.qkv_attention(qkv, self.num_heads, scale=self.scale, dropout_p=dropout_p,
                                  q_norm=None if isinstance(self.q_norm, nn.Identity) else self.q_norm,
                                  k_norm=None if isinstance(self.k_norm, nn.Identity) else self.k_norm)
        else:
            q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            q, k = self.q_norm(q), self.k_norm(k)
            if self.fused_attn and attn_mask is None and not is_causal:
                x = ops.attention(q, k, v, scale=self.scale, dropout_p=dropout_p)
            elif self.fused_attn:
                x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                   is_causal=is_causal, scale=self.scale)
            else:
                attn = (q * self.scale) @ k.transpose(-2, -1)
                attn = attn + _attention_bias(N, attn, attn_mask, is_causal)
                attn = self.attn_drop(attn.softmax(dim=-1))
                x = attn @ v
            x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        return self.proj_drop(self.proj(x))

    def _norms_fuse(self, qkv) -> bool:
        """Whether q_norm and k_norm can run inside ``qkv_attention``: not with hooks on them (they
        would not fire), nor while FX traces a qk-norm (an FX node's arguments are tensors, not modules)."""
        if has_hooks(self.q_norm) or has_hooks(self.k_norm):
            return False
        no_norms = isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity)
        return no_norms or not isinstance(qkv, torch.fx.Proxy)


def _attention_bias(n: int, scores: torch.Tensor, attn_mask: Optional[torch.Tensor],
                    is_causal: bool) -> torch.Tensor | float:
    """An additive bias with SDPA's semantics: True/nonzero-bool keeps, float masks are added."""
    if is_causal:
        return scores.new_full((n, n), float("-inf")).triu_(1)
    if attn_mask is None:
        return 0.0
    if attn_mask.dtype == torch.bool:
        return torch.zeros_like(attn_mask, dtype=scores.dtype).masked_fill_(~attn_mask, float("-inf"))
    return attn_mask


class LayerScale(nn.Module):
    """Per-channel learnable scale (CaiT's LayerScale), ``gamma`` initialised to ``init_values``."""

    def __init__(self, dim: int, init_values: float = 1e-5, inplace: bool = False, device=None, dtype=None):
        super().__init__()
        self.init_values = init_values
        self.inplace = inplace
        self.gamma = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(self.gamma) if self.inplace else x * self.gamma


class Mlp(nn.Module):
    """fc1 -> act -> drop -> norm -> fc2 -> drop, as timm's Mlp.

    With a GELU-family activation and nothing active between fc1 and fc2 the three run as one
    ``vk.ops.mlp``; otherwise fc1 + activation run as ``linear_gelu`` and fc2 as ``linear``."""
    __prepare_scriptable__ = refuse_torchscript

    def __init__(self, in_features: int, hidden_features: Optional[int] = None,
                 out_features: Optional[int] = None, act_layer: LayerType = nn.GELU,
                 norm_layer: Optional[LayerType] = None, bias: Union[bool, Tuple[bool, bool]] = True,
                 drop: Union[float, Tuple[float, float]] = 0.0, use_conv: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        bias, drop = to_2tuple(bias), to_2tuple(drop)
        linear_layer = partial(nn.Conv2d, kernel_size=1) if use_conv else nn.Linear
        norm_layer = get_norm_layer(norm_layer)

        self.fc1 = linear_layer(in_features, hidden_features, bias=bias[0], **dd)
        self.act = get_act_layer(act_layer)()
        self.drop1 = nn.Dropout(drop[0])
        self.norm = norm_layer(hidden_features, **dd) if norm_layer is not None else nn.Identity()
        self.fc2 = linear_layer(hidden_features, out_features, bias=bias[1], **dd)
        self.drop2 = nn.Dropout(drop[1])
        # The fused GEMMs serve token-major (..., C) inputs; 1x1 convs keep the PyTorch path.
        self.fused_activation = None if use_conv else fused_activation_name(self.act)

    def _fuses_whole(self) -> bool:
        """Whether fc1 -> act -> fc2 runs as one ``vk.ops.mlp``: nothing between them (no norm, no
        active dropout) and no hooks on the modules it would skip."""
        return (self.fused_activation is not None and isinstance(self.norm, nn.Identity)
                and not (self.training and self.drop1.p > 0)
                and not any(has_hooks(m) for m in (self.fc1, self.act, self.drop1, self.norm, self.fc2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fuses_whole():
            x = ops.mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, self.fused_activation)
            return self.drop2(x)
        if self.fused_activation is not None and not has_hooks(self.fc1) and not has_hooks(self.act):
            x = ops.linear_gelu(x, self.fc1.weight, self.fc1.bias, self.fused_activation)
        else:
            x = self.act(self.fc1(x))
        x = self.norm(self.drop1(x))
        if isinstance(self.fc2, nn.Linear) and not has_hooks(self.fc2):
            x = ops.linear(x, self.fc2.weight, self.fc2.bias)
        else:
            x = self.fc2(x)
        return self.drop2(x)


class Block(nn.Module):
    """Pre-norm transformer block: x + drop_path(ls(attn(norm1(x)))), then the same with the MLP.

    ``forward_fused`` runs it on the fused residual stream (see the module docstring);
    ``forward`` is timm's ``Block.forward`` (it completes its own last add). ``attn`` and ``mlp``
    can be any modules with timm's call signature. Each LayerNorm that ``is_last_dim_layer_norm``
    does the add before it; LayerScale and DropPath (vk's, without hooks) are folded into that
    op; any other norm, ls or drop_path module runs as itself.
    """
    __prepare_scriptable__ = refuse_torchscript

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_norm: bool = False, scale_attn_norm: bool = False, scale_mlp_norm: bool = False,
                 proj_bias: bool = True, proj_drop: float = 0.0, attn_drop: float = 0.0,
                 init_values: Optional[float] = None, drop_path: float = 0.0,
                 act_layer: LayerType = nn.GELU, norm_layer: LayerType = LayerNorm,
                 mlp_layer: Type[nn.Module] = Mlp, attn_layer: Type[nn.Module] = Attention,
                 device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        norm_layer = get_norm_layer(norm_layer)
        self.norm1 = norm_layer(dim, **dd)
        self.attn = attn_layer(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm,
                               scale_norm=scale_attn_norm, proj_bias=proj_bias, attn_drop=attn_drop,
                               proj_drop=proj_drop, norm_layer=norm_layer, **dd)
        self.ls1 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

        self.norm2 = norm_layer(dim, **dd)
        self.mlp = mlp_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer,
                             norm_layer=norm_layer if scale_mlp_norm else None, bias=proj_bias,
                             drop=proj_drop, **dd)
        self.ls2 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward_fused(self, x: torch.Tensor, pending: Pending = None, cls_only: bool = False,
                      attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
                      ) -> Tuple[torch.Tensor, Pending]:
        """(residual stream, this block's pending MLP add) from the stream and the previous pending add.

        ``cls_only``: after attention keep token 0 only, so norm2 and the MLP run on one token per
        image (class-token pooling in eval mode); the stream returned is then (B, 1, C).
        """
        normed, x = add_norm(x, pending, self.norm1)
        branch = self.attn(normed, attn_mask=attn_mask, is_causal=is_causal)
        if cls_only:
            branch, x = branch[:, :1], x[:, :1]
        normed, x = add_norm(x, _pending(branch, self.ls1, self.drop_path1), self.norm2)
        return x, _pending(self.mlp(normed), self.ls2, self.drop_path2)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        return add_pending(*self.forward_fused(x, attn_mask=attn_mask, is_causal=is_causal))


# A residual add not done yet: (branch, LayerScale gamma or None, DropPath per-sample factor or None).
Pending = Optional[Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]]


def _pending(branch: torch.Tensor, ls: nn.Module, drop_path: nn.Module) -> Pending:
    """The add of ``drop_path(ls(branch))``, vk's LayerScale and DropPath left to the fused op."""
    if not _folds(drop_path, DropPath):
        return drop_path(ls(branch)), None, None
    if not _folds(ls, LayerScale):
        branch, ls = ls(branch), nn.Identity()
    return (branch, None if isinstance(ls, nn.Identity) else ls.gamma,
            None if isinstance(drop_path, nn.Identity) else drop_path.row_scale(branch))


def _folds(module: nn.Module, kind: type) -> bool:
    return type(module) in (kind, nn.Identity) and not has_hooks(module)


def add_pending(x: torch.Tensor, pending: Pending) -> torch.Tensor:
    """The residual stream with the pending add done."""
    return x if pending is None else x + residual_branch(*pending)


def add_norm(x: torch.Tensor, pending: Pending, norm: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + pending), x + pending): one add+LayerNorm op when ``norm`` is a last-dim LayerNorm."""
    if pending is None or not is_last_dim_layer_norm(norm):
        x = add_pending(x, pending)
        return norm(x), x
    branch, gamma, row_scale = pending
    return ops.add_layer_norm(branch, x, norm.weight, norm.bias, norm.eps, gamma=gamma, row_scale=row_scale)


@backend.traceable
def check_images(x: torch.Tensor, in_chans: int, img_size: Optional[Tuple[int, int]], strict_img_size: bool,
                 dynamic_img_pad: bool, patch_size: Tuple[int, int]) -> None:
    """Raise a ValueError naming what is wrong with an image batch for a PatchEmbed."""
    if x.dim() != 4:
        raise ValueError(f"input must have shape (B, C, H, W); got {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(f"input has {x.shape[1]} channels; expected in_chans = {in_chans}")
    H, W = x.shape[-2:]
    if img_size is not None and strict_img_size and (H, W) != img_size:
        raise ValueError(f"input size ({H}, {W}) does not match img_size {img_size} "
                         "(create the model with dynamic_img_size=True for other sizes)")
    if not dynamic_img_pad and (H % patch_size[0] or W % patch_size[1]):
        raise ValueError(f"input size ({H}, {W}) is not divisible by patch_size {patch_size} "
                         "(set dynamic_img_pad=True to pad)")


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> patch tokens (B, L, D) (or NCHW/NHWC with ``output_fmt``)."""
    dynamic_img_pad: Final[bool]
    __prepare_scriptable__ = refuse_torchscript

    def __init__(self, img_size: Optional[Union[int, Tuple[int, int]]] = 224, patch_size: int = 16,
                 in_chans: int = 3, embed_dim: int = 768, norm_layer: Optional[LayerType] = None,
                 flatten: bool = True, output_fmt: Optional[str] = None, bias: bool = True,
                 strict_img_size: bool = True, dynamic_img_pad: bool = False, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if output_fmt not in (None, "NCHW", "NHWC", "NLC", "NCL"):
            raise ValueError(f"output_fmt must be one of NCHW, NHWC, NLC, NCL or None; got {output_fmt!r}")
        self.patch_size = to_2tuple(patch_size)
        self.in_chans = in_chans
        self.img_size, self.grid_size, self.num_patches = self._grid(img_size)
        self.flatten = flatten if output_fmt is None else False
        self.output_fmt = output_fmt or "NCHW"
        self.strict_img_size = strict_img_size
        self.dynamic_img_pad = dynamic_img_pad
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias, **dd)
        norm_layer = get_norm_layer(norm_layer)
        self.norm = norm_layer(embed_dim, **dd) if norm_layer else nn.Identity()

    def _grid(self, img_size):
        if img_size is None:
            return None, None, None
        img_size = to_2tuple(img_size)
        grid_size = tuple(s // p for s, p in zip(img_size, self.patch_size))
        return img_size, grid_size, grid_size[0] * grid_size[1]

    def feat_ratio(self, as_scalar: bool = True):
        return max(self.patch_size) if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        if self.dynamic_img_pad:
            return math.ceil(img_size[0] / self.patch_size[0]), math.ceil(img_size[1] / self.patch_size[1])
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError naming what is wrong with an input image batch."""
        check_images(x, self.in_chans, self.img_size, self.strict_img_size, self.dynamic_img_pad, self.patch_size)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Pad right/bottom to a multiple of the patch when ``dynamic_img_pad``."""
        if not self.dynamic_img_pad:
            return x
        pad_h = -x.shape[-2] % self.patch_size[0]
        pad_w = -x.shape[-1] % self.patch_size[1]
        return F.pad(x, (0, pad_w, 0, pad_h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = self.pad(x)
        if self.flatten and not has_hooks(self.proj):
            x = ops.patch_embed(x, self.proj.weight, self.proj.bias)
        elif self.flatten:
            x = self.proj(x).flatten(2).transpose(1, 2)
        else:
            x = self.proj(x)
            if self.output_fmt == "NHWC":
                x = x.permute(0, 2, 3, 1)
            elif self.output_fmt == "NLC":
                x = x.flatten(2).transpose(1, 2)
            elif self.output_fmt == "NCL":
                x = x.flatten(2)
        return self.norm(x)


class PatchDropout(nn.Module):
    """Keep a random subset of (1 - prob) of the patch tokens per sample in training; prefix tokens stay."""

    def __init__(self, prob: float = 0.5, num_prefix_tokens: int = 1, ordered: bool = False):
        super().__init__()
        if not 0.0 <= prob < 1.0:
            raise ValueError(f"prob must be in [0, 1); got {prob}")
        self.prob = prob
        self.num_prefix_tokens = num_prefix_tokens
        self.ordered = ordered

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.prob == 0.0:
            return x
        prefix, patches = x[:, :self.num_prefix_tokens], x[:, self.num_prefix_tokens:]
        B, L = patches.shape[:2]
        num_keep = max(1, int(L * (1.0 - self.prob)))
        keep = torch.argsort(torch.randn(B, L, device=x.device), dim=-1)[:, :num_keep]
        if self.ordered:
            keep = keep.sort(dim=-1).values
        patches = patches.gather(1, keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        return torch.cat([prefix, patches], dim=1)


class AttentionPoolLatent(nn.Module):
    """Attention pooling with a learned latent query (SigLIP's MAP head)."""

    def __init__(self, in_features: int, out_features: Optional[int] = None, embed_dim: Optional[int] = None,
                 num_heads: int = 8, mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_norm: bool = False,
                 latent_len: int = 1, pool_type: str = "token", norm_layer: Optional[LayerType] = None,
                 act_layer: LayerType = nn.GELU, drop: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        embed_dim = embed_dim or in_features
        out_features = out_features or in_features
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        norm_layer = get_norm_layer(norm_layer)
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.pool = pool_type
        self.latent_len = latent_len
        self.latent_dim = embed_dim
        self.latent = nn.Parameter(torch.zeros(1, latent_len, embed_dim, **dd))
        self.q = nn.Linear(embed_dim, embed_dim, bias=qkv_bias, **dd)
        self.kv = nn.Linear(embed_dim, embed_dim * 2, bias=qkv_bias, **dd)
        qk_norm_layer = norm_layer or nn.LayerNorm
        self.q_norm = qk_norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = qk_norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.proj = nn.Linear(embed_dim, out_features, **dd)
        self.proj_drop = nn.Dropout(drop)
        self.norm = norm_layer(out_features, **dd) if norm_layer is not None else nn.Identity()
        self.mlp = Mlp(out_features, int(out_features * mlp_ratio), act_layer=act_layer, **dd)
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.latent, std=self.latent_dim ** -0.5, a=-2 * self.latent_dim ** -0.5,
                              b=2 * self.latent_dim ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q(self.latent.expand(B, -1, -1))
        q = q.reshape(B, self.latent_len, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        # One query per image: SDPA's cost is negligible here, no fused kernel needed.
        x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        x = self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, self.latent_len, C)))
        x = x + self.mlp(self.norm(x))
        if self.pool == "token":
            return x[:, 0]
        if self.pool == "avg":
            return x.mean(1)
        return x


def resample_abs_pos_embed(posemb: torch.Tensor, new_size: Tuple[int, int],
                           old_size: Optional[Tuple[int, int]] = None, num_prefix_tokens: int = 1,
                           interpolation: str = "bicubic", antialias: bool = True) -> torch.Tensor:
    """Resize a (1, prefix + H*W, D) position embedding to a new grid, prefix rows untouched."""
    new_size = tuple(new_size)
    num_new = new_size[0] * new_size[1] + num_prefix_tokens
    if old_size is None:
        side = int(math.sqrt(posemb.shape[1] - num_prefix_tokens))
        old_size = (side, side)
    if num_new == posemb.shape[1] and tuple(old_size) == new_size:
        return posemb
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    grid = grid.float().reshape(1, old_size[0], old_size[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_size, mode=interpolation, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(posemb.dtype)
    return torch.cat([prefix, grid], dim=1)
