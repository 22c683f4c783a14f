"""``optimize(model)``: vit_kernels' fused modules swapped into a timm (or vit_kernels) ViT, in place.

Each replacement adopts the original module's children, Parameters and buffers (the same
objects), so state_dict keys and values, an optimizer made before the call, and module names
are unchanged. Nothing is mutated but the containers that hold the swapped modules and two
instance attributes (``forward``, ``forward_features``) that run the fused residual stream;
the original modules are kept, and ``restore(model)`` puts them back. Classes are never patched.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from types import MethodType
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import backend, layers, ops
from .fused_block import FusedBlock, run_blocks
from .vision_transformer import VisionTransformer

log = logging.getLogger(__name__)

_ORIGINALS = "_vit_kernels_originals"
REPORT_ATTR = "vit_kernels_report"

_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
               "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


@dataclass
class OptimizeReport:
    """What ``optimize`` swapped (name -> new type) and what it left as it was (name -> why)."""
    swapped: Dict[str, str] = field(default_factory=dict)
    unsupported: Dict[str, str] = field(default_factory=dict)
    fused_stream: bool = False

    def __str__(self) -> str:
        lines = [f"vit_kernels.optimize: {len(self.swapped)} modules swapped, residual stream "
                 f"{'fused' if self.fused_stream else 'not fused'}"]
        lines += [f"  left as is: {name}: {why}" for name, why in self.unsupported.items()]
        return "\n".join(lines)


class _Types:
    """The module classes optimize understands: vit_kernels' own and (if installed) timm's."""

    def __init__(self) -> None:
        self.models = [VisionTransformer]
        self.blocks = [layers.Block]
        self.attentions = [layers.Attention]
        self.mlps = [layers.Mlp]
        self.patch_embeds = [layers.PatchEmbed]
        self.layer_scales = [layers.LayerScale]
        self.drop_paths = [layers.DropPath]
        self.layer_norm_forwards = {nn.LayerNorm.forward, layers.LayerNorm.forward}
        self.activations = {layers.QuickGELU: "quick_gelu"}
        try:
            import timm.layers as tl
            from timm.models import vision_transformer as tv
        except ImportError:
            return
        self.models.append(tv.VisionTransformer)
        self.blocks.append(tv.Block)
        self.attentions.append(tl.Attention)
        self.mlps.append(tl.Mlp)
        self.patch_embeds.append(tl.PatchEmbed)
        self.layer_scales.append(tl.LayerScale)
        self.drop_paths.append(tl.DropPath)
        self.layer_norm_forwards.add(tl.LayerNorm.forward)
        from timm.layers import activations
        self.activations.update({activations.GELU: "gelu", activations.GELUTanh: "gelu_tanh",
                                 activations.QuickGELU: "quick_gelu"})

    def is_layer_norm(self, m) -> bool:
        """A LayerNorm over the last dim whose forward is F.layer_norm (not a subclass redefining it)."""
        return (isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1
                and type(m).forward in self.layer_norm_forwards)

    def activation(self, act: nn.Module) -> Optional[str]:
        return layers.fused_activation_name(act) or self.activations.get(type(act))


def optimize(model: nn.Module, *, attention: bool = True, mlp: bool = True, norm: bool = True,
             patch_embed: bool = True) -> nn.Module:
    """Swap the fused vit_kernels modules into ``model`` in place and return it.

    ``attention`` / ``mlp`` / ``patch_embed``: timm's Attention, Mlp and PatchEmbed become vk's
    (which run ``qkv_attention``, ``linear_gelu``/``linear`` and ``patch_embed``). ``norm``:
    LayerNorms become vk's and pre-norm blocks become ``FusedBlock``s, whose residual adds
    (LayerScale and DropPath folded in) run inside the next LayerNorm; for a timm or vk
    ``VisionTransformer`` the model's forward then carries that stream from block to block into
    the final norm, and with class-token pooling in eval mode the last block's MLP runs on the
    class token only. What cannot be fused is left as it is and named in
    ``model.vit_kernels_report`` (also logged). A second call does nothing; ``restore`` undoes it.
    """
    blocks = getattr(model, "blocks", None) if isinstance(model, nn.Module) else None
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        raise TypeError("optimize expects a Vision Transformer: an nn.Module with a `blocks` nn.Sequential "
                        "or nn.ModuleList of transformer blocks (a timm or vit_kernels VisionTransformer); "
                        f"got {type(model).__name__}")
    if getattr(model, _ORIGINALS, None) is not None:
        log.info("vit_kernels.optimize: %s is already optimized; nothing to do", type(model).__name__)
        return model
    _check_servable(model)

    types = _Types()
    flags = dict(attention=attention, mlp=mlp, norm=norm)
    report = OptimizeReport()
    plan: Dict[str, nn.Module] = {}
    for i, block in enumerate(blocks):
        new = _convert_block(block, f"blocks.{i}", types, flags, report)
        if new is not block:
            plan[f"blocks.{i}"] = new

    known_model = type(model) in types.models
    if not known_model:
        report.unsupported["(model)"] = (f"{type(model).__name__} is not a timm or vit_kernels VisionTransformer: "
                                         "its forward is kept (fused blocks run one at a time)")
    else:
        for name in ("norm_pre", "norm", "fc_norm"):
            module = getattr(model, name)
            if norm and types.is_layer_norm(module):
                plan[name] = _vk_layer_norm(module)
            elif not isinstance(module, (nn.Identity, layers.LayerNorm)):
                report.unsupported[name] = f"{type(module).__name__} is not a LayerNorm"
        if patch_embed:
            new_embed = _convert_patch_embed(model.patch_embed, types, report)
            if new_embed is not model.patch_embed:
                plan["patch_embed"] = new_embed
        if getattr(model, "attn_pool", None) is not None:
            report.unsupported["attn_pool"] = "the attention-pool head runs unfused"
    override_forward = known_model and norm and not ({"forward", "forward_features"} & model.__dict__.keys())
    if known_model and norm and not override_forward:
        report.unsupported["(model)"] = "an instance-level forward override is in place: kept"

    # Nothing above touched the model; from here on every step is a plain attribute assignment.
    originals = OrderedDict()
    for name, new in plan.items():
        originals[name] = model.get_submodule(name)
        _set_submodule(model, name, new)
        report.swapped[name] = type(new).__name__
    if override_forward:
        model.forward = MethodType(_fused_forward, model)
        model.forward_features = MethodType(_fused_forward_features, model)
        report.fused_stream = True
    setattr(model, _ORIGINALS, originals)
    setattr(model, REPORT_ATTR, report)
    log.info("%s", report)
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undo ``optimize``: the original modules back in place (Parameters were always shared)."""
    originals = model.__dict__.pop(_ORIGINALS, None)
    if originals is None:
        return model
    for name, original in reversed(originals.items()):
        original.train(model.get_submodule(name).training)
        _set_submodule(model, name, original)
    for attr in ("forward", "forward_features", REPORT_ATTR):
        model.__dict__.pop(attr, None)
    return model


# --- checks -----------------------------------------------------------------------------------

def _check_servable(model: nn.Module) -> None:
    """Raise (before anything is swapped) if the ops cannot run on the model's device and dtype."""
    tensors = list(model.parameters()) + list(model.buffers())
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise RuntimeError(f"vit_kernels.optimize: the model's tensors are on several devices {sorted(map(str, devices))}; "
                           "move it to one device first. The model was left unchanged.")
    device = devices.pop() if devices else torch.device("cpu")
    try:
        impl, why = backend.kernel_choice(device)
    except RuntimeError as error:
        raise RuntimeError(f"vit_kernels.optimize: the kernels cannot serve a model on {device}: {error}. "
                           "The model was left unchanged.") from None
    dtypes = {t.dtype for t in tensors if t.is_floating_point()}
    if impl == "triton" and not dtypes <= set(backend.KERNEL_DTYPES):
        bad = sorted(map(str, dtypes - set(backend.KERNEL_DTYPES)))
        raise RuntimeError(f"vit_kernels.optimize: the Triton kernels ({why}) serve {[str(d) for d in backend.KERNEL_DTYPES]} "
                           f"parameters; this model has {bad}. Cast it (or use vk.use_backend('torch')) first. "
                           "The model was left unchanged.")


# --- building the replacements (none of these mutates the module it is given) -------------------

def _adopt(new: nn.Module, old: nn.Module, **children: nn.Module) -> nn.Module:
    """``new`` takes over ``old``'s Parameters, buffers, children (some replaced) and hooks."""
    new._parameters = OrderedDict(old._parameters)
    new._buffers = OrderedDict(old._buffers)
    new._non_persistent_buffers_set = set(old._non_persistent_buffers_set)
    new._modules = OrderedDict((name, children.get(name, child)) for name, child in old._modules.items())
    for name in _HOOK_DICTS:
        if hasattr(old, name):
            setattr(new, name, getattr(old, name))
    new.train(old.training)
    return new


def _vk_layer_norm(norm: nn.LayerNorm) -> layers.LayerNorm:
    if type(norm) is layers.LayerNorm:
        return norm
    new = layers.LayerNorm(norm.normalized_shape[0], eps=norm.eps, affine=norm.elementwise_affine,
                           bias=norm.bias is not None, device="meta")
    return _adopt(new, norm)


def _convert_attention(attn: nn.Module, name: str, types: _Types, report: OptimizeReport) -> nn.Module:
    if type(attn) is layers.Attention:
        return attn
    if type(attn) not in types.attentions:
        report.unsupported[name] = f"{type(attn).__name__} is not timm's Attention"
        return attn
    if getattr(attn, "gate", None) is not None:
        report.unsupported[name] = "gated attention"
        return attn
    new = layers.Attention(attn.qkv.in_features, num_heads=attn.num_heads, attn_head_dim=attn.head_dim,
                           device="meta")
    new.scale = attn.scale
    return _adopt(new, attn)


def _convert_mlp(mlp: nn.Module, name: str, types: _Types, report: OptimizeReport) -> nn.Module:
    if type(mlp) is layers.Mlp:
        return mlp
    if type(mlp) not in types.mlps:
        report.unsupported[name] = f"{type(mlp).__name__} is not timm's Mlp"
        return mlp
    if not (isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.fc2, nn.Linear)):
        report.unsupported[name] = "1x1-conv Mlp"
        return mlp
    new = _adopt(layers.Mlp(mlp.fc1.in_features, mlp.fc1.out_features, mlp.fc2.out_features, device="meta"), mlp)
    new.fused_activation = types.activation(new.act)
    if new.fused_activation is None:
        report.unsupported[f"{name}.act"] = f"{type(new.act).__name__} has no fused GEMM epilogue: runs after fc1"
    return new


def _convert_patch_embed(pe: nn.Module, types: _Types, report: OptimizeReport) -> nn.Module:
    if type(pe) is layers.PatchEmbed:
        return pe
    if type(pe) not in types.patch_embeds:
        report.unsupported["patch_embed"] = f"{type(pe).__name__} is not timm's PatchEmbed"
        return pe
    if not pe.flatten:
        report.unsupported["patch_embed"] = f"output_fmt {pe.output_fmt} (e.g. dynamic_img_size) runs unfused"
        return pe
    new = layers.PatchEmbed(img_size=pe.img_size, patch_size=pe.patch_size, in_chans=pe.proj.in_channels,
                            embed_dim=pe.proj.out_channels, bias=pe.proj.bias is not None,
                            strict_img_size=pe.strict_img_size, dynamic_img_pad=pe.dynamic_img_pad, device="meta")
    return _adopt(new, pe)


def _convert_block(block: nn.Module, name: str, types: _Types, flags: dict, report: OptimizeReport) -> nn.Module:
    if isinstance(block, FusedBlock):
        return block
    if type(block) not in types.blocks:
        report.unsupported[name] = f"{type(block).__name__} is not a pre-norm Block (timm's Block or vk's)"
        return block
    children = dict(block._modules)
    if flags["attention"]:
        children["attn"] = _convert_attention(block.attn, f"{name}.attn", types, report)
    if flags["mlp"]:
        children["mlp"] = _convert_mlp(block.mlp, f"{name}.mlp", types, report)
    why_not = _why_not_fused(block, types)
    if flags["norm"] and why_not is None:
        children["norm1"] = _vk_layer_norm(block.norm1)
        children["norm2"] = _vk_layer_norm(block.norm2)
        return _adopt(FusedBlock({}), block, **children)
    if flags["norm"]:
        report.unsupported[name] = f"residual adds unfused: {why_not}"
    if all(children[k] is v for k, v in block._modules.items()):
        return block
    # The block's own forward with new children: a shallow clone, so the original stays intact.
    clone = _adopt(type(block).__new__(type(block)), block, **children)
    clone.__dict__.update({k: v for k, v in block.__dict__.items() if k not in clone.__dict__})
    return clone


def _why_not_fused(block: nn.Module, types: _Types) -> Optional[str]:
    for part in ("norm1", "norm2"):
        if not types.is_layer_norm(getattr(block, part)):
            return f"{part} is {type(getattr(block, part)).__name__}, not a last-dim LayerNorm"
    for part in ("ls1", "ls2"):
        if not isinstance(getattr(block, part), nn.Identity) and type(getattr(block, part)) not in types.layer_scales:
            return f"{part} is {type(getattr(block, part)).__name__}"
    for part in ("drop_path1", "drop_path2"):
        if not isinstance(getattr(block, part), nn.Identity) and type(getattr(block, part)) not in types.drop_paths:
            return f"{part} is {type(getattr(block, part)).__name__}"
    return None


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


# --- the fused forward (bound to the model instance) -------------------------------------------

def _embed(model: nn.Module, x: Tensor) -> Tensor:
    """Images -> tokens ready for the blocks, as the model's own forward_features computes them."""
    if isinstance(model, VisionTransformer):
        return model.embed(x)
    pe = model.patch_embed
    if (type(pe) is layers.PatchEmbed and pe.flatten and isinstance(pe.norm, nn.Identity)
            and not model.dynamic_img_size and (model.pos_drop.p == 0.0 or not model.training)):
        pe.check_input(x)
        prefix = [t for t in (model.cls_token, model.reg_token) if t is not None]
        x = ops.patch_embed(pe.pad(x), pe.proj.weight, pe.proj.bias, pos_embed=model.pos_embed,
                            prefix_tokens=torch.cat(prefix, dim=1) if prefix else None)
    else:
        x = model._pos_embed(pe(x))
    return model.norm_pre(model.patch_drop(x))


def _fused_forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
    if attn_mask is not None or is_causal:
        return type(self).forward_features(self, x, attn_mask=attn_mask, is_causal=is_causal)
    return run_blocks(self.blocks, _embed(self, x), self.norm, self.grad_checkpointing)


def _fused_forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
    if attn_mask is not None or is_causal:
        return type(self).forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
    # Class-token pooling reads token 0 only: in eval mode the last block's MLP skips the others.
    cls_only = not self.training and self.global_pool == "token" and getattr(self, "attn_pool", None) is None
    x = run_blocks(self.blocks, _embed(self, x), self.norm, self.grad_checkpointing, cls_only)
    return self.forward_head(x)
