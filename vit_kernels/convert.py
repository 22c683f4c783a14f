"""``optimize(model)``: vit_kernels' fused modules swapped into a timm (or vit_kernels) ViT, in place.

Each replacement holds the original module's Parameters and buffers (the same objects) and
children under the same names, registered with nn.Module's public API (``_adopt``), so
state_dict keys and values, an optimizer made before the call, and module names are unchanged.
A module with hooks registered on it is never replaced: it stays where it is, so its hooks keep
firing, and the report says so. Nothing is mutated but the modules that hold the swapped ones
and, on a timm VisionTransformer, three instance attributes (``forward``, ``forward_features``,
``forward_intermediates``) that run the fused residual stream (vk's own VisionTransformer runs it
without them); the
original modules are kept, and ``restore(model)`` puts them back. Classes are never patched.
"""
from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Dict, Optional, Union

import torch
from torch import nn

from . import backend, layers
from .features import Features
from .layers import has_hooks
from .vision_transformer import (VisionTransformer, fused_forward, fused_forward_features,
                                 fused_forward_intermediates)

log = logging.getLogger(__name__)

_ORIGINALS = "_vit_kernels_originals"
# The methods of a timm VisionTransformer that optimize overrides on the instance, and with what.
_FUSED_METHODS = {"forward": fused_forward, "forward_features": fused_forward_features,
                  "forward_intermediates": fused_forward_intermediates}
REPORT_ATTR = "vit_kernels_report"
_HOOKED = "hooks are registered on it: left as it is, so they fire"


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
        # vk's module class -> the classes it replaces (LayerNorms are recognised by their forward).
        self.replaces = {layers.Block: [], layers.Attention: [], layers.Mlp: [], layers.PatchEmbed: [],
                         layers.LayerScale: [], layers.DropPath: []}
        self.layer_norm_forwards = {nn.LayerNorm.forward, layers.LayerNorm.forward}
        self.activations = {layers.QuickGELU: "quick_gelu"}
        self.feature_wrappers = [Features]  # features_only models: the ViT is their .model
        try:
            import timm.layers as tl
            from timm.layers import activations
            from timm.models import _features, vision_transformer as tv
        except ImportError:
            return
        self.models.append(tv.VisionTransformer)
        self.feature_wrappers.append(_features.FeatureGetterNet)
        for vk_class, timm_class in ((layers.Block, tv.Block), (layers.Attention, tl.Attention),
                                     (layers.Mlp, tl.Mlp), (layers.PatchEmbed, tl.PatchEmbed),
                                     (layers.LayerScale, tl.LayerScale), (layers.DropPath, tl.DropPath)):
            self.replaces[vk_class].append(timm_class)
        self.layer_norm_forwards.add(tl.LayerNorm.forward)
        self.activations.update({activations.GELU: "gelu", activations.GELUTanh: "gelu_tanh",
                                 activations.QuickGELU: "quick_gelu"})

    def is_layer_norm(self, m) -> bool:
        """A LayerNorm over the last dim whose forward is F.layer_norm (not a subclass redefining it)."""
        return (isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1
                and type(m).forward in self.layer_norm_forwards)

    def is_replaced_by(self, module: nn.Module, vk_class: type) -> bool:
        if vk_class is layers.LayerNorm:
            return self.is_layer_norm(module)
        return type(module) in self.replaces[vk_class]

    def activation(self, act: nn.Module) -> Optional[str]:
        return layers.fused_activation_name(act) or self.activations.get(type(act))


def optimize(model: nn.Module, *, attention: bool = True, mlp: bool = True, norm: bool = True,
             patch_embed: bool = True) -> nn.Module:
    """Swap the fused vit_kernels modules into ``model`` in place and return it.

    ``attention`` / ``mlp`` / ``patch_embed``: timm's Attention, Mlp and PatchEmbed become vk's
    (which run ``qkv_attention``, ``linear_gelu``/``linear`` and ``patch_embed``). ``norm``:
    LayerNorms become vk's and timm's pre-norm blocks become vk's ``Block`` (holding the block's
    children, LayerScale and DropPath as vk's), whose residual adds run inside the next
    LayerNorm; a timm ``VisionTransformer``'s forward then carries that stream from block to
    block into the final norm, as vk's own does, and with class-token pooling in eval mode the
    last block's MLP runs on the class token only. A module with hooks registered on it is left
    as it is (its hooks keep firing; the blocks around it still fuse). What cannot be fused is
    left as it is and named in ``model.vit_kernels_report`` (also logged). A second call does
    nothing; ``restore`` undoes it.
    """
    types = _Types()
    wrapper, model = model, _unwrap(model, types)
    blocks = getattr(model, "blocks", None) if isinstance(model, nn.Module) else None
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        raise TypeError("optimize expects a Vision Transformer: an nn.Module with a `blocks` nn.Sequential "
                        "or nn.ModuleList of transformer blocks (a timm or vit_kernels VisionTransformer, or one "
                        f"inside {_WRAPPERS}); got {type(model).__name__}")
    if getattr(model, _ORIGINALS, None) is not None:
        log.info("vit_kernels.optimize: %s is already optimized; nothing to do", type(model).__name__)
        return wrapper
    _check_servable(model)

    flags = dict(attention=attention, mlp=mlp, norm=norm)
    report = OptimizeReport()
    plan: Dict[str, nn.Module] = {}
    for i, block in enumerate(blocks):
        plan.update(_convert_block(block, f"blocks.{i}", types, flags, report))

    known_model = type(model) in types.models
    if not known_model:
        report.unsupported["(model)"] = (f"{type(model).__name__} is not a timm or vit_kernels VisionTransformer: "
                                         "its forward is kept (fused blocks run one at a time)")
    else:
        parts = [(name, layers.LayerNorm) for name in ("norm_pre", "norm", "fc_norm") if norm]
        parts += [("patch_embed", layers.PatchEmbed)] if patch_embed else []
        for name, vk_class in parts:
            new = _vk_module(getattr(model, name), name, vk_class, types, report)
            if new is not getattr(model, name):
                plan[name] = new
        if getattr(model, "attn_pool", None) is not None:
            report.unsupported["attn_pool"] = "the attention-pool head runs unfused"
    vk_model = type(model) is VisionTransformer
    overridden = _FUSED_METHODS.keys() & model.__dict__.keys()
    override_forward = known_model and not vk_model and norm and not overridden
    if known_model and (norm or vk_model) and overridden:
        report.unsupported["(model)"] = "an instance-level forward override is in place: kept"

    # Nothing above touched the model; from here on every step is a plain attribute assignment.
    originals = OrderedDict()
    for name, new in plan.items():
        originals[name] = model.get_submodule(name)
        _set_submodule(model, name, new)
        report.swapped[name] = type(new).__name__
    if override_forward:
        # functools.partial, not a bound method: it pickles (by the functions' names), so
        # torch.save(model) / torch.load and copy.deepcopy keep the fused forward.
        for attr, fused in _FUSED_METHODS.items():
            setattr(model, attr, partial(fused, model))
    report.fused_stream = override_forward or (vk_model and not overridden)
    setattr(model, _ORIGINALS, originals)
    setattr(model, REPORT_ATTR, report)
    if report.swapped or report.fused_stream:
        log.info("%s", report)
    else:
        warnings.warn(f"{report}\n(nothing was swapped: the model runs as it did)", RuntimeWarning, stacklevel=2)
    return wrapper


def restore(model: nn.Module) -> nn.Module:
    """Undo ``optimize``: the original modules back in place (Parameters were always shared)."""
    wrapper, model = model, _unwrap(model, _Types())
    originals = model.__dict__.pop(_ORIGINALS, None)
    if originals is None:
        return wrapper
    for name, original in reversed(originals.items()):
        original.train(model.get_submodule(name).training)
        _set_submodule(model, name, original)
    for attr in (*_FUSED_METHODS, REPORT_ATTR):
        model.__dict__.pop(attr, None)
    return wrapper


# --- checks -----------------------------------------------------------------------------------

_WRAPPERS = "torch.compile's OptimizedModule, DistributedDataParallel, DataParallel or a features_only model"


def _unwrap(model: nn.Module, types: _Types) -> nn.Module:
    """The model inside the wrappers optimize sees through (``_WRAPPERS``): they call it, so its
    swapped modules and forward are what runs. A model sharded by FSDP is refused: FSDP has taken
    over the Parameters of the modules optimize would swap."""
    from torch._dynamo.eval_frame import OptimizedModule
    while True:
        if torch.distributed.is_available():
            from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
            if any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules()):
                raise RuntimeError("vit_kernels.optimize: the model is sharded by FSDP (fully_shard); call "
                                   "vk.optimize(model) before fully_shard. The model was left unchanged.")
        if isinstance(model, OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(model, tuple(types.feature_wrappers)):
            model = model.model
        else:
            return model


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
    """``new`` (built on the meta device, with ``old``'s names) takes over ``old``'s Parameters (the
    same objects), buffers (persistent or not, as they were), children (``children`` replace some)
    and training mode, through nn.Module's public registration API. Hooks are not moved: callers
    leave a module with hooks in place (``_vk_module``)."""
    buffers = dict(old.named_buffers(recurse=False))
    persistent = old.state_dict(keep_vars=True).keys() if buffers else ()
    for name, param in old.named_parameters(recurse=False):
        new.register_parameter(name, param)
    for name, buffer in buffers.items():
        new.register_buffer(name, buffer, persistent=name in persistent)
    for name, child in old.named_children():
        new.add_module(name, children.get(name, child))
    names = [{n for n, _ in m.named_parameters(recurse=False)} | set(dict(m.named_buffers(recurse=False)))
             | set(dict(m.named_children())) for m in (new, old)]
    if names[0] != names[1]:
        raise RuntimeError(f"vit_kernels.optimize: {type(new).__name__} and {type(old).__name__} hold "
                           f"different parts ({sorted(names[0] ^ names[1])})")
    return new.train(old.training)


def _vk_module(module: nn.Module, name: str, vk_class: type, types: _Types, report: OptimizeReport,
               **children: nn.Module) -> nn.Module:
    """vk's ``vk_class`` in place of ``module`` (its Parameters adopted), or ``module`` itself, with
    the reason in the report: an unknown class, a variant vk's cannot run, or hooks on it."""
    if type(module) is vk_class or isinstance(module, nn.Identity):
        return module
    if not types.is_replaced_by(module, vk_class):
        report.unsupported[name] = f"{type(module).__name__} is not timm's {vk_class.__name__}"
        return module
    if has_hooks(module):
        report.unsupported[name] = _HOOKED
        return module
    new = _BUILDERS[vk_class](module, types)
    if isinstance(new, str):
        report.unsupported[name] = new
        return module
    new = _adopt(new, module, **children)
    if vk_class is layers.Mlp and new.fused_activation is None:
        report.unsupported[f"{name}.act"] = f"{type(new.act).__name__} has no fused GEMM epilogue: runs after fc1"
    return new


def _attention(attn: nn.Module, types: _Types) -> Union[nn.Module, str]:
    if getattr(attn, "gate", None) is not None:
        return "gated attention"
    new = layers.Attention(attn.qkv.in_features, num_heads=attn.num_heads, attn_head_dim=attn.head_dim,
                           device="meta")
    new.scale = attn.scale
    return new


def _mlp(mlp: nn.Module, types: _Types) -> Union[nn.Module, str]:
    if not (isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.fc2, nn.Linear)):
        return "1x1-conv Mlp"
    new = layers.Mlp(mlp.fc1.in_features, mlp.fc1.out_features, mlp.fc2.out_features, device="meta")
    new.fused_activation = types.activation(mlp.act)
    return new


def _patch_embed(pe: nn.Module, types: _Types) -> Union[nn.Module, str]:
    if not pe.flatten:
        return f"output_fmt {pe.output_fmt} (e.g. dynamic_img_size) runs unfused"
    return layers.PatchEmbed(img_size=pe.img_size, patch_size=pe.patch_size, in_chans=pe.proj.in_channels,
                             embed_dim=pe.proj.out_channels, bias=pe.proj.bias is not None,
                             strict_img_size=pe.strict_img_size, dynamic_img_pad=pe.dynamic_img_pad, device="meta")


_BUILDERS: Dict[type, Callable[[nn.Module, _Types], Union[nn.Module, str]]] = {
    layers.Attention: _attention,
    layers.Mlp: _mlp,
    layers.PatchEmbed: _patch_embed,
    layers.LayerNorm: lambda norm, types: layers.LayerNorm(
        norm.normalized_shape[0], eps=norm.eps, affine=norm.elementwise_affine, bias=norm.bias is not None,
        device="meta"),
    layers.LayerScale: lambda ls, types: layers.LayerScale(
        ls.gamma.shape[0], init_values=ls.init_values, inplace=ls.inplace, device="meta"),
    layers.DropPath: lambda dp, types: layers.DropPath(dp.drop_prob, dp.scale_by_keep),
    # A shell on the meta device: every child is replaced by the block's own.
    layers.Block: lambda block, types: layers.Block(block.norm1.normalized_shape[0], num_heads=1, device="meta"),
}


def _convert_block(block: nn.Module, name: str, types: _Types, flags: dict,
                   report: OptimizeReport) -> Dict[str, nn.Module]:
    """The swaps for one block: {name: vk Block holding its (converted) children} when its residual
    adds can fuse, else {name.child: vk module} for the children that convert."""
    if type(block) is not layers.Block and not types.is_replaced_by(block, layers.Block):
        report.unsupported[name] = f"{type(block).__name__} is not a pre-norm Block (timm's Block or vk's)"
        return {}
    children = {part: _vk_module(getattr(block, part), f"{name}.{part}", vk_class, types, report)
                for part, vk_class, flag in (("attn", layers.Attention, "attention"), ("mlp", layers.Mlp, "mlp"))
                if flags[flag]}
    why_not = _why_not_fused(block, types)
    if flags["norm"] and why_not is None and type(block) is not layers.Block:
        parts = {"norm1": layers.LayerNorm, "norm2": layers.LayerNorm, "ls1": layers.LayerScale,
                 "ls2": layers.LayerScale, "drop_path1": layers.DropPath, "drop_path2": layers.DropPath}
        children.update({part: _vk_module(getattr(block, part), f"{name}.{part}", vk_class, types, report)
                         for part, vk_class in parts.items()})
        new = _vk_module(block, name, layers.Block, types, report, **children)
        if new is not block:
            return {name: new}
    elif flags["norm"] and why_not is not None:
        report.unsupported[name] = f"residual adds unfused: {why_not}"
    return {f"{name}.{part}": child for part, child in children.items() if child is not getattr(block, part)}


def _why_not_fused(block: nn.Module, types: _Types) -> Optional[str]:
    for part in ("norm1", "norm2"):
        if not types.is_layer_norm(getattr(block, part)):
            return f"{part} is {type(getattr(block, part)).__name__}, not a last-dim LayerNorm"
    for part, vk_class in (("ls1", layers.LayerScale), ("ls2", layers.LayerScale),
                           ("drop_path1", layers.DropPath), ("drop_path2", layers.DropPath)):
        child = getattr(block, part)
        if not isinstance(child, (nn.Identity, vk_class)) and not types.is_replaced_by(child, vk_class):
            return f"{part} is {type(child).__name__}"
    return None


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)
