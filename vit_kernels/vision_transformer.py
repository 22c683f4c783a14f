"""timm's VisionTransformer on vit_kernels' ops, with timm's constructor, methods and parameter names.

``forward`` and ``forward_features`` run the fused residual stream (``layers.Block``) from the
embedding into the final norm; ``embed_tokens`` and ``run_blocks`` take a model's parts by
timm's names, so ``optimize`` runs the same code on a timm VisionTransformer.
"""
from __future__ import annotations

import math
import numbers
from functools import partial
from typing import Callable, Dict, List, Literal, Optional, Set, Tuple, Type, Union

import torch
import torch.nn as nn
from torch.jit import Final
from torch.utils.checkpoint import checkpoint

from . import ops
from .layers import (Attention, AttentionPoolLatent, Block, LayerNorm, LayerType, Mlp, PatchDropout,
                     PatchEmbed, Pending, add_norm, add_pending, get_act_layer, get_norm_layer, has_hooks,
                     refuse_torchscript, resample_abs_pos_embed, to_2tuple)

GLOBAL_POOLS = ("", "token", "avg", "max", "avgmax", "map")
POS_EMBEDS = ("", "none", "learn")
WEIGHT_INITS = ("", "jax", "jax_nlhb", "moco", "skip")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")


def _check_int(name: str, value, minimum: int) -> None:
    # numbers.Integral, not int: a numpy integer read from a config file is a fine depth.
    if not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")


def _check_rate(name: str, value, one_allowed: bool = False) -> None:
    """A probability in [0, 1), or [0, 1] where a rate of 1 still trains (drop_path_rate)."""
    inside = isinstance(value, numbers.Real) and 0 <= value and (value <= 1 if one_allowed else value < 1)
    if not inside:  # NaN fails every comparison, so it lands here too
        raise ValueError(f"{name} must be in [0, 1{']' if one_allowed else ')'}; got {value!r}")


def _check_size(name: str, value) -> Tuple[int, int]:
    size = to_2tuple(value)
    if len(size) != 2 or not all(isinstance(s, numbers.Integral) and s > 0 for s in size):
        raise ValueError(f"{name} must be a positive int or an (H, W) pair of them; got {value!r}")
    return size


def take_indices(num_blocks: int, indices: Optional[Union[int, List[int]]]) -> Tuple[List[int], int]:
    """Block indices to return (the last ``n`` for an int, all for None; negatives count from the end)."""
    if indices is None:
        indices = num_blocks
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"indices must be in [1, {num_blocks}] when an int; got {indices}")
        taken = list(range(num_blocks - indices, num_blocks))
    else:
        taken = [num_blocks + i if i < 0 else i for i in indices]
        bad = [i for i in taken if not 0 <= i < num_blocks]
        if bad:
            raise ValueError(f"indices {list(indices)} out of range for {num_blocks} blocks")
    return taken, max(taken)


def global_pool_nlc(x: torch.Tensor, pool_type: str = "token", num_prefix_tokens: int = 1,
                    reduce_include_prefix: bool = False) -> torch.Tensor:
    """Pool (B, N, C) tokens to (B, C): the class token, or avg / max / avgmax over the patch tokens."""
    if not pool_type:
        return x
    if pool_type == "token":
        return x[:, 0]
    x = x if reduce_include_prefix else x[:, num_prefix_tokens:]
    if pool_type == "avg":
        return x.mean(dim=1)
    if pool_type == "max":
        return x.amax(dim=1)
    if pool_type == "avgmax":
        return 0.5 * (x.amax(dim=1) + x.mean(dim=1))
    raise ValueError(f"pool_type must be one of {GLOBAL_POOLS}; got {pool_type!r}")


class VisionTransformer(nn.Module):
    """Vision Transformer (Dosovitskiy et al., 2020) as in timm, its hot paths on vit_kernels' ops."""
    dynamic_img_size: Final[bool]
    __prepare_scriptable__ = refuse_torchscript

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: Union[int, Tuple[int, int]] = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: Literal["", "avg", "avgmax", "max", "token", "map"] = "token",
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            qk_norm: bool = False,
            scale_attn_norm: bool = False,
            scale_mlp_norm: bool = False,
            proj_bias: bool = True,
            init_values: Optional[float] = None,
            class_token: bool = True,
            pos_embed: str = "learn",
            no_embed_class: bool = False,
            reg_tokens: int = 0,
            pre_norm: bool = False,
            final_norm: bool = True,
            fc_norm: Optional[bool] = None,
            pool_include_prefix: bool = False,
            dynamic_img_size: bool = False,
            dynamic_img_pad: bool = False,
            drop_rate: float = 0.0,
            pos_drop_rate: float = 0.0,
            patch_drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            weight_init: Literal["skip", "jax", "jax_nlhb", "moco", ""] = "",
            fix_init: bool = False,
            embed_layer: Callable = PatchEmbed,
            embed_norm_layer: Optional[LayerType] = None,
            norm_layer: Optional[LayerType] = None,
            act_layer: Optional[LayerType] = None,
            block_fn: Type[nn.Module] = Block,
            mlp_layer: Type[nn.Module] = Mlp,
            attn_layer: Type[nn.Module] = Attention,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        _check_choice("global_pool", global_pool, GLOBAL_POOLS)
        _check_choice("pos_embed", pos_embed, POS_EMBEDS)
        _check_choice("weight_init", weight_init, WEIGHT_INITS)
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        _check_int("in_chans", in_chans, 1)
        _check_int("num_classes", num_classes, 0)
        _check_int("embed_dim", embed_dim, 1)
        _check_int("depth", depth, 0)
        _check_int("num_heads", num_heads, 1)
        _check_int("reg_tokens", reg_tokens, 0)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if not (isinstance(mlp_ratio, numbers.Real) and mlp_ratio > 0):
            raise ValueError(f"mlp_ratio must be a number > 0; got {mlp_ratio!r}")
        grid = [s // p for s, p in zip(_check_size("img_size", img_size), _check_size("patch_size", patch_size))]
        if 0 in grid:
            raise ValueError(f"img_size {img_size} is smaller than patch_size {patch_size}: no whole patch fits")
        for name, rate in (("drop_rate", drop_rate), ("pos_drop_rate", pos_drop_rate),
                           ("patch_drop_rate", patch_drop_rate), ("proj_drop_rate", proj_drop_rate),
                           ("attn_drop_rate", attn_drop_rate)):
            _check_rate(name, rate)
        _check_rate("drop_path_rate", drop_path_rate, one_allowed=True)
        use_fc_norm = global_pool in ("avg", "avgmax", "max") if fc_norm is None else fc_norm
        norm_layer = get_norm_layer(norm_layer) or LayerNorm
        embed_norm_layer = get_norm_layer(embed_norm_layer)
        act_layer = get_act_layer(act_layer) or nn.GELU

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = (1 if class_token else 0) + reg_tokens
        self.num_reg_tokens = reg_tokens
        self.has_class_token = class_token
        self.no_embed_class = no_embed_class
        self.pool_include_prefix = pool_include_prefix
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False

        embed_args = {}
        if dynamic_img_size:
            # Tokens stay NHWC until the position embedding is resampled to their grid.
            embed_args.update(strict_img_size=False, output_fmt="NHWC")
        if embed_norm_layer is not None:
            embed_args["norm_layer"] = embed_norm_layer
        self.patch_embed = embed_layer(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                       embed_dim=embed_dim, bias=not pre_norm,
                                       dynamic_img_pad=dynamic_img_pad, **embed_args, **dd)
        num_patches = self.patch_embed.num_patches
        reduction = self.patch_embed.feat_ratio() if hasattr(self.patch_embed, "feat_ratio") else patch_size

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim, **dd)) if reg_tokens else None
        embed_len = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        if pos_embed in ("", "none"):
            self.pos_embed = None
        else:
            self.pos_embed = nn.Parameter(torch.randn(1, embed_len, embed_dim, **dd) * 0.02)
        self.pos_drop = nn.Dropout(p=pos_drop_rate)
        if patch_drop_rate > 0:
            self.patch_drop = PatchDropout(patch_drop_rate, num_prefix_tokens=self.num_prefix_tokens)
        else:
            self.patch_drop = nn.Identity()
        self.norm_pre = norm_layer(embed_dim, **dd) if pre_norm else nn.Identity()

        drop_path_rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.Sequential(*[
            block_fn(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                     qk_norm=qk_norm, scale_attn_norm=scale_attn_norm, scale_mlp_norm=scale_mlp_norm,
                     proj_bias=proj_bias, init_values=init_values, proj_drop=proj_drop_rate,
                     attn_drop=attn_drop_rate, drop_path=drop_path_rates[i], norm_layer=norm_layer,
                     act_layer=act_layer, mlp_layer=mlp_layer, attn_layer=attn_layer, **dd)
            for i in range(depth)])
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=reduction)
                             for i in range(depth)]
        self.norm = norm_layer(embed_dim, **dd) if final_norm and not use_fc_norm else nn.Identity()

        if global_pool == "map":
            self.attn_pool = AttentionPoolLatent(embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio,
                                                 norm_layer=norm_layer, act_layer=act_layer, **dd)
        else:
            self.attn_pool = None
        self.fc_norm = norm_layer(embed_dim, **dd) if final_norm and use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

        self.fix_init = fix_init
        if weight_init != "skip":
            self.init_weights(weight_init)

    # --- initialisation -------------------------------------------------------------------

    def fix_init_weight(self) -> None:
        """Scale each block's output projections by 1 / sqrt(2 * (layer + 1))."""
        with torch.no_grad():
            for layer_id, block in enumerate(self.blocks):
                scale = math.sqrt(2.0 * (layer_id + 1))
                block.attn.proj.weight.div_(scale)
                block.mlp.fc2.weight.div_(scale)

    def init_weights(self, mode: str = "") -> None:
        """Initialise every weight: '' (timm's trunc-normal), 'jax', 'jax_nlhb' or 'moco'."""
        _check_choice("mode", mode, ("", "jax", "jax_nlhb", "moco"))
        head_bias = -math.log(self.num_classes) if "nlhb" in mode and self.num_classes > 0 else 0.0
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for token in (self.cls_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)
        for name, module in self.named_modules():
            if module is not self:
                _init_module(module, name, mode, head_bias)
        if self.fix_init:
            self.fix_init_weight()

    def load_pretrained(self, checkpoint_path: str, prefix: str = "") -> None:
        """Load a JAX/Flax .npz checkpoint (original ViT or big_vision layout)."""
        from .checkpoint import load_npz_weights
        load_npz_weights(self, checkpoint_path, prefix)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``; a strict mismatch also names the model configs that would fit."""
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as error:
            from .checkpoint import configs_that_fit
            fits = configs_that_fit(state_dict)
            hint = f"the state dict fits {fits}" if fits else "no known model config fits the state dict"
            raise RuntimeError(f"{error}\n({hint})") from None

    # --- timm's model interface ----------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {"pos_embed", "cls_token", "reg_token", "dist_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(stem=r"^cls_token|reg_token|pos_embed|patch_embed|norm_pre",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the head with a fresh one for ``num_classes`` (0: no head), optionally a new pool."""
        if global_pool is not None:
            _check_choice("global_pool", global_pool, GLOBAL_POOLS)
            if global_pool == "token" and not self.has_class_token:
                raise ValueError("global_pool='token' needs a class token")
            if global_pool == "map" and self.attn_pool is None:
                raise ValueError("global_pool='map' can only be kept, not added, by reset_classifier")
            if global_pool != "map":
                self.attn_pool = None
            self.global_pool = global_pool
        weight = self.patch_embed.proj.weight
        self.head = (nn.Linear(self.embed_dim, num_classes, device=weight.device, dtype=weight.dtype)
                     if num_classes > 0 else nn.Identity())
        self.head.train(self.training)
        self.num_classes = num_classes

    # --- forward --------------------------------------------------------------------------

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Add position embeddings to patch tokens and put the prefix tokens in front."""
        B = x.shape[0]
        if self.dynamic_img_size:
            H, W = x.shape[1:3]
            x = x.flatten(1, 2)
        prefix = _prefix_tokens(self)
        to_cat = [] if prefix is None else [prefix.expand(B, -1, -1)]
        if self.pos_embed is None:
            return torch.cat(to_cat + [x], dim=1)
        pos_embed = self.pos_embed
        if self.dynamic_img_size:
            pos_embed = resample_abs_pos_embed(
                pos_embed, (H, W), self.patch_embed.grid_size,
                num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens)
        if self.no_embed_class:
            x = torch.cat(to_cat + [x + pos_embed], dim=1)
        else:
            x = torch.cat(to_cat + [x], dim=1) + pos_embed
        return self.pos_drop(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens (B, prefix + L, D) ready for the blocks."""
        return embed_tokens(self, x)

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                         is_causal: bool = False) -> torch.Tensor:
        return fused_forward_features(self, x, attn_mask=attn_mask, is_causal=is_causal)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
            output_dict: bool = False,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ):
        """Features and the outputs of the chosen blocks (as timm's ``forward_intermediates``)."""
        return fused_forward_intermediates(self, x, indices, return_prefix_tokens, norm, stop_early, output_fmt,
                                           intermediates_only, output_dict, attn_mask, is_causal)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the blocks after the last one ``indices`` needs (and the norm/head if asked)."""
        taken, max_index = take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return taken

    def get_intermediate_layers(self, x: torch.Tensor, n: Union[int, List[int], Tuple[int]] = 1,
                                reshape: bool = False, return_prefix_tokens: bool = False,
                                norm: bool = False, attn_mask: Optional[torch.Tensor] = None):
        """DINO's interface to ``forward_intermediates``."""
        return self.forward_intermediates(x, n, return_prefix_tokens=return_prefix_tokens, norm=norm,
                                          output_fmt="NCHW" if reshape else "NLC",
                                          intermediates_only=True, attn_mask=attn_mask)

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        if self.attn_pool is not None:
            if not self.pool_include_prefix:
                x = x[:, self.num_prefix_tokens:]
            return self.attn_pool(x)
        pool_type = self.global_pool if pool_type is None else pool_type
        return global_pool_nlc(x, pool_type, self.num_prefix_tokens, self.pool_include_prefix)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        return fused_forward(self, x, attn_mask=attn_mask, is_causal=is_causal)


# --- the forward of a timm or vit_kernels VisionTransformer, from its parts -------------------

def _prefix_tokens(model: nn.Module) -> Optional[torch.Tensor]:
    tokens = [t for t in (model.cls_token, model.reg_token) if t is not None]
    return torch.cat(tokens, dim=1) if tokens else None


def embed_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Images -> tokens ready for the blocks of ``model`` (vit_kernels' or timm's VisionTransformer).

    With vk's PatchEmbed (flattened, no norm), a fixed image size and no active pos-dropout,
    patch projection, prefix tokens and position embedding run as one ``patch_embed`` op;
    otherwise (also when a hook is on a module the op would skip) the model's own
    ``patch_embed`` and ``_pos_embed``.
    """
    pe = model.patch_embed
    if (type(pe) is PatchEmbed and pe.flatten and isinstance(pe.norm, nn.Identity)
            and not any(has_hooks(m) for m in (pe, pe.proj, pe.norm, model.pos_drop))
            and not model.dynamic_img_size and (model.pos_drop.p == 0.0 or not model.training)):
        pe.check_input(x)
        x = ops.patch_embed(pe.pad(x), pe.proj.weight, pe.proj.bias, pos_embed=model.pos_embed,
                            prefix_tokens=_prefix_tokens(model))
    else:
        x = model._pos_embed(pe(x))
    return model.norm_pre(model.patch_drop(x))


def class_token_only(model: nn.Module) -> bool:
    """Whether ``model``'s head reads token 0 only (eval mode, class-token pooling, no attention pool),
    so its last block's MLP may run on that token alone: not when a hook is on a module that would
    then see one token instead of all (the last block's and the final norm)."""
    if (model.training or model.global_pool != "token" or getattr(model, "attn_pool", None) is not None
            or len(model.blocks) == 0):
        return False
    return not any(has_hooks(m) for m in (model.blocks, *model.blocks[-1].modules(), model.norm))


def _run_block(block: nn.Module, x: torch.Tensor, pending: Pending, grad_checkpointing: bool,
               cls_only: bool = False, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
               ) -> Tuple[torch.Tensor, Pending]:
    """(stream, pending add) after ``block``. A ``layers.Block`` without hooks runs fused and leaves its
    MLP's add pending; any other block (or one with hooks: they fire) runs as itself on the stream
    with the pending add done. ``cls_only``: see ``Block.forward_fused``."""
    masks = {} if attn_mask is None and not is_causal else dict(attn_mask=attn_mask, is_causal=is_causal)
    if type(block) is Block and not has_hooks(block):
        args = (x, pending, cls_only, attn_mask, is_causal)
        return checkpoint(block.forward_fused, *args, use_reentrant=False) if grad_checkpointing \
            else block.forward_fused(*args)
    x = add_pending(x, pending)
    return (checkpoint(block, x, **masks, use_reentrant=False) if grad_checkpointing else block(x, **masks)), None


def run_blocks(blocks, x: torch.Tensor, final_norm: nn.Module, grad_checkpointing: bool = False,
               cls_only: bool = False, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
               ) -> torch.Tensor:
    """final_norm(blocks(x)), every residual add of a ``layers.Block`` done by the LayerNorm after it.

    ``cls_only`` applies when the last block is a ``Block``: the result is then (B, 1, C). With
    hooks on the container itself it is called, as timm's forward calls it (unmasked, without
    checkpointing), so they fire.
    """
    grad_checkpointing = grad_checkpointing and torch.is_grad_enabled()
    if has_hooks(blocks) and attn_mask is None and not is_causal and not grad_checkpointing:
        return final_norm(blocks(x))
    blocks = list(blocks)
    pending = None
    for i, block in enumerate(blocks):
        x, pending = _run_block(block, x, pending, grad_checkpointing, cls_only and i == len(blocks) - 1,
                                attn_mask, is_causal)
    return add_norm(x, pending, final_norm)[0]


# The forward methods of a vk VisionTransformer, and of a timm one after ``optimize`` (bound to the
# instance): timm's computation, on the fused residual stream.

def fused_forward_features(model: nn.Module, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                           is_causal: bool = False) -> torch.Tensor:
    return run_blocks(model.blocks, embed_tokens(model, x), model.norm, model.grad_checkpointing,
                      attn_mask=attn_mask, is_causal=is_causal)


def fused_forward(model: nn.Module, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                  is_causal: bool = False) -> torch.Tensor:
    x = run_blocks(model.blocks, embed_tokens(model, x), model.norm, model.grad_checkpointing,
                   class_token_only(model), attn_mask, is_causal)
    return model.forward_head(x)


def fused_forward_intermediates(model: nn.Module, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                                return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                                output_fmt: str = "NCHW", intermediates_only: bool = False,
                                output_dict: bool = False, attn_mask: Optional[torch.Tensor] = None,
                                is_causal: bool = False):
    """timm's ``forward_intermediates``. The stream runs exactly as in ``fused_forward_features`` (a
    taken block's output is read beside it, its pending add left to the next LayerNorm), so the
    features equal forward_features' bit for bit."""
    _check_choice("output_fmt", output_fmt, ("NCHW", "NLC"))
    taken, max_index = take_indices(len(model.blocks), indices)
    height, width = x.shape[-2:]
    x = embed_tokens(model, x)
    blocks = model.blocks[:max_index + 1] if stop_early else model.blocks
    grad_checkpointing = model.grad_checkpointing and torch.is_grad_enabled()
    pending, intermediates = None, []
    for i, block in enumerate(blocks):
        x, pending = _run_block(block, x, pending, grad_checkpointing, attn_mask=attn_mask, is_causal=is_causal)
        if i in taken:
            intermediates.append(add_norm(x, pending, model.norm)[0] if norm else add_pending(x, pending))

    prefix_tokens = None
    if model.num_prefix_tokens:
        prefix_tokens = [y[:, :model.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, model.num_prefix_tokens:] for y in intermediates]
    if output_fmt == "NCHW":
        H, W = model.patch_embed.dynamic_feat_size((height, width))
        intermediates = [y.unflatten(1, (H, W)).permute(0, 3, 1, 2).contiguous() for y in intermediates]

    if output_dict:
        result = {"image_intermediates": intermediates}
        if prefix_tokens is not None and return_prefix_tokens:
            result["image_intermediates_prefix"] = prefix_tokens
        if not intermediates_only:
            result["image_features"] = add_norm(x, pending, model.norm)[0]
        return result
    if return_prefix_tokens and prefix_tokens is not None:
        intermediates = list(zip(intermediates, prefix_tokens))
    if intermediates_only:
        return intermediates
    return add_norm(x, pending, model.norm)[0], intermediates


def _lecun_normal_(tensor: torch.Tensor) -> None:
    """Truncated normal with variance 1 / fan_in (JAX's lecun_normal)."""
    fan_in = tensor[0].numel()
    # The std of a unit normal truncated to [-2, 2]; dividing by it restores the variance.
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)


def _init_module(module: nn.Module, name: str, mode: str, head_bias: float) -> None:
    """One module's share of ``VisionTransformer.init_weights``."""
    if isinstance(module, nn.Linear):
        if mode.startswith("jax") and name.startswith("head"):
            nn.init.zeros_(module.weight)
            nn.init.constant_(module.bias, head_bias)
            return
        if mode.startswith("jax"):
            nn.init.xavier_uniform_(module.weight)
        elif mode == "moco" and "qkv" in name:
            # q, k and v are three separate projections: xavier-uniform each.
            bound = math.sqrt(6.0 / float(module.weight.shape[0] // 3 + module.weight.shape[1]))
            nn.init.uniform_(module.weight, -bound, bound)
        elif mode == "moco":
            nn.init.xavier_uniform_(module.weight)
        else:
            nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            if mode.startswith("jax") and "mlp" in name:
                nn.init.normal_(module.bias, std=1e-6)
            else:
                nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d) and mode.startswith("jax"):
        _lecun_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif hasattr(module, "init_weights"):
        module.init_weights()


# timm's architecture arguments plus the defaults its default pretrained tag implies
# (num_classes, img_size), so create_model(name) builds what timm.create_model(name) builds.
MODEL_CONFIGS: Dict[str, dict] = {
    "vit_tiny_patch16_224": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_base_patch32_224": dict(patch_size=32, embed_dim=768, depth=12, num_heads=12),
    "vit_huge_patch14_224": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, num_classes=0),
    "vit_small_patch14_dinov2": dict(patch_size=14, embed_dim=384, depth=12, num_heads=6, init_values=1e-5,
                                     img_size=518, num_classes=0),
    "vit_base_patch14_dinov2": dict(patch_size=14, embed_dim=768, depth=12, num_heads=12, init_values=1e-5,
                                    img_size=518, num_classes=0),
    "vit_base_patch14_reg4_dinov2": dict(patch_size=14, embed_dim=768, depth=12, num_heads=12,
                                         init_values=1e-5, reg_tokens=4, no_embed_class=True,
                                         img_size=518, num_classes=0),
    "vit_base_patch16_clip_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, pre_norm=True,
                                      norm_layer=partial(LayerNorm, eps=1e-5)),
    "vit_base_patch16_siglip_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12,
                                        class_token=False, global_pool="map", num_classes=0),
    "vit_medium_patch16_reg4_gap_256": dict(patch_size=16, embed_dim=512, depth=12, num_heads=8,
                                            init_values=1e-5, class_token=False, no_embed_class=True,
                                            reg_tokens=4, global_pool="avg", img_size=256),
}


# The default pretrained tag of each config (what timm.create_model(name) describes in its
# ``pretrained_cfg``): the tag, the normalisation its weights expect, and the eval crop.
_INCEPTION = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
_IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
_OPENAI_CLIP = dict(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
DEFAULT_TAGS: Dict[str, dict] = {
    "vit_tiny_patch16_224": dict(tag="augreg_in21k_ft_in1k", crop_pct=0.9, **_INCEPTION),
    "vit_small_patch16_224": dict(tag="augreg_in21k_ft_in1k", crop_pct=0.9, **_INCEPTION),
    "vit_base_patch16_224": dict(tag="augreg2_in21k_ft_in1k", crop_pct=0.9, **_INCEPTION),
    "vit_large_patch16_224": dict(tag="augreg_in21k_ft_in1k", crop_pct=0.9, **_INCEPTION),
    "vit_base_patch32_224": dict(tag="augreg_in21k_ft_in1k", crop_pct=0.9, **_INCEPTION),
    "vit_huge_patch14_224": dict(tag="orig_in21k", crop_pct=0.9, **_INCEPTION),
    "vit_small_patch14_dinov2": dict(tag="lvd142m", crop_pct=1.0, **_IMAGENET),
    "vit_base_patch14_dinov2": dict(tag="lvd142m", crop_pct=1.0, **_IMAGENET),
    "vit_base_patch14_reg4_dinov2": dict(tag="lvd142m", crop_pct=1.0, **_IMAGENET),
    "vit_base_patch16_clip_224": dict(tag="laion2b_ft_in12k_in1k", crop_pct=0.95, **_OPENAI_CLIP),
    "vit_base_patch16_siglip_224": dict(tag="v2_webli", crop_pct=0.9, **_INCEPTION),
    "vit_medium_patch16_reg4_gap_256": dict(tag="sbb_in12k_ft_in1k", crop_pct=0.95, **_INCEPTION),
}
# The keys of timm's pretrained_cfg that describe the model and its input (no download URLs).
PRETRAINED_CFG_KEYS = ("architecture", "tag", "num_classes", "input_size", "fixed_input_size", "interpolation",
                       "crop_pct", "crop_mode", "mean", "std", "pool_size", "first_conv", "classifier")


def list_models() -> List[str]:
    return sorted(MODEL_CONFIGS)


def pretrained_cfg(model_name: str) -> dict:
    """timm's ``pretrained_cfg`` (``PRETRAINED_CFG_KEYS``) for ``"arch"`` or ``"arch.tag"``.

    The default tag of every config is known here; another tag is read from timm's registry,
    so it needs timm installed."""
    arch, _, tag = model_name.partition(".")
    if arch not in MODEL_CONFIGS:
        import difflib
        close = difflib.get_close_matches(arch, MODEL_CONFIGS, n=3, cutoff=0.5)
        hint = f"; did you mean {close}?" if close else f"; known models: {list_models()}"
        raise KeyError(f"unknown model_name {model_name!r}{hint}")
    default = DEFAULT_TAGS[arch]
    if tag and tag != default["tag"]:
        try:
            import timm
        except ImportError:
            raise KeyError(f"model_name {model_name!r}: the tag {tag!r} is not {arch}'s default "
                           f"({default['tag']!r}); other tags are read from timm's registry: install timm") from None
        try:
            found = timm.models.get_pretrained_cfg(model_name)
        except RuntimeError:  # timm's "Invalid pretrained tag"
            found = None
        if found is None or found.architecture != arch:
            raise KeyError(f"model_name {model_name!r}: timm knows no pretrained tag {tag!r} for {arch} "
                           f"(its tags: {timm.list_pretrained(arch + '.*')})")
        found = found.to_dict()
        return {key: found.get(key) for key in PRETRAINED_CFG_KEYS}
    config = MODEL_CONFIGS[arch]
    return dict(architecture=arch, tag=default["tag"], num_classes=config.get("num_classes", 1000),
                input_size=(3, *to_2tuple(config.get("img_size", 224))), fixed_input_size=True,
                interpolation="bicubic", crop_pct=default["crop_pct"], crop_mode="center", mean=default["mean"],
                std=default["std"], pool_size=None, first_conv="patch_embed.proj", classifier="head")


def create_model(model_name: str, pretrained: bool = False, checkpoint_path: Optional[str] = None,
                 features_only: bool = False, out_indices: Union[int, List[int]] = 3,
                 feature_cfg: Optional[dict] = None, **overrides) -> nn.Module:
    """Build a timm-named ViT (``"arch"`` or timm's ``"arch.tag"``); ``checkpoint_path`` loads a
    safetensors, torch.save or JAX/Flax .npz file, the format read from its content (not its name).

    As timm's: the tag's ``num_classes``, image size and channels are the defaults (``overrides``
    win), ``model.pretrained_cfg`` (also ``default_cfg``) describes it, and a checkpoint whose head
    does not fit an explicit ``num_classes`` loads without its head. ``features_only`` returns a
    ``features.Features`` (the outputs of blocks ``out_indices``; ``feature_cfg``: ``output_fmt``,
    ``norm``). Nothing is ever downloaded: ``pretrained=True`` needs a ``checkpoint_path``.
    """
    cfg = pretrained_cfg(model_name)
    arch = cfg["architecture"]
    if pretrained and checkpoint_path is None:
        raise ValueError(f"pretrained=True needs checkpoint_path: vit_kernels never downloads weights "
                         f"(save timm.create_model({model_name!r}, pretrained=True).state_dict() and pass it)")
    tag_defaults = dict(num_classes=cfg["num_classes"], img_size=tuple(cfg["input_size"][1:]),
                        in_chans=cfg["input_size"][0])
    model = VisionTransformer(**{**MODEL_CONFIGS[arch], **tag_defaults, **overrides})
    model.pretrained_cfg = model.default_cfg = cfg
    if checkpoint_path is not None:
        from .checkpoint import load_checkpoint
        load_checkpoint(model, checkpoint_path, without_head="num_classes" in overrides)
    if features_only:
        from .features import Features
        return Features(model, out_indices, **(feature_cfg or {}))
    return model
