"""Loading weights from files: PyTorch/safetensors state dicts and JAX/Flax .npz checkpoints."""
from __future__ import annotations

import os
import warnings
import zipfile
from typing import Dict, List

import numpy as np
import torch
import torch.nn as nn

from .layers import AttentionPoolLatent, resample_abs_pos_embed

FORMATS = "safetensors, torch.save (.pth/.pt/.bin) or JAX/Flax .npz"


def checkpoint_format(path: str) -> str:
    """'safetensors', 'torch' or 'npz', read from the file's first bytes: names lie (a safetensors
    file saved as .pth is common), and torch.load would misread it as a legacy pickle."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint_path {path!r} is not a file")
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header itself.
    if len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") + 8 <= os.path.getsize(path):
        return "safetensors"
    if head.startswith(b"PK"):  # a zip: torch.save's archive (a data.pkl inside) or numpy's .npz (.npy members)
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile:
            names = []
        if any(n.endswith(".npy") for n in names):
            return "npz"
        if any(n.endswith("data.pkl") for n in names):
            return "torch"
    elif head.startswith(b"\x80"):  # a pickle: torch.save's legacy (pre-1.6) format
        return "torch"
    raise ValueError(f"checkpoint_path {path!r} is not a {FORMATS} file (it begins with {head!r})")


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """A state dict from a safetensors or torch.save file (unwrapping 'state_dict'/'model')."""
    kind = checkpoint_format(path)
    if kind == "npz":
        raise ValueError(f"checkpoint_path {path!r} is a JAX/Flax .npz checkpoint, not a state dict; "
                         "load it with model.load_pretrained")
    if kind == "safetensors":
        from safetensors.torch import load_file
        return load_file(path)
    # A file object, not the path: newer torch.load sends a path ending in .safetensors to safetensors
    # by its name, and the content has already said this is torch.save's.
    with open(path, "rb") as f:
        state = torch.load(f, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def configs_that_fit(state_dict: Dict[str, torch.Tensor]) -> List[str]:
    """Names of the model configs whose parameter names and shapes equal the state dict's."""
    from .vision_transformer import MODEL_CONFIGS, VisionTransformer
    # A value that is not a tensor fits no config (torch's own error names its key).
    if not all(torch.overrides.is_tensor_like(v) for v in state_dict.values()):
        return []
    wanted = {k: tuple(v.shape) for k, v in state_dict.items()}
    fits = []
    for name, config in MODEL_CONFIGS.items():
        with torch.device("meta"):
            model = VisionTransformer(**config, weight_init="skip")
        if {k: tuple(v.shape) for k, v in model.state_dict().items()} == wanted:
            fits.append(name)
    return fits


def load_checkpoint(model: nn.Module, path: str, without_head: bool = False) -> None:
    """Load ``path`` into ``model`` strictly (.npz through ``model.load_pretrained``, which keeps a
    head that does not fit). ``without_head``: a checkpoint head that does not fit the model's
    (another ``num_classes``, or none) is left out with a warning, and the model's stays as it was
    initialised, as timm does when fine-tuning pretrained weights for new classes."""
    if checkpoint_format(path) == "npz":
        model.load_pretrained(path)
        return
    state = read_state_dict(path)
    if without_head:
        own = model.state_dict()
        misfits = [k for k in ("head.weight", "head.bias")
                   if k in state and (k not in own or own[k].shape != state[k].shape)]
        if misfits:
            warnings.warn(f"{path}: {misfits} do not fit the model's head (num_classes={model.num_classes}) "
                          "and were not loaded; the head keeps its initial weights", UserWarning, stacklevel=3)
            state = {k: v for k, v in state.items() if k not in misfits}
            state.update({k: v for k, v in own.items() if k.startswith("head.")})
    model.load_state_dict(state)


def _to_torch(array: np.ndarray, transpose: bool = True) -> torch.Tensor:
    """A Flax array in PyTorch's layout: conv HWIO -> OIHW, dense (in, out) -> (out, in)."""
    if transpose:
        if array.ndim == 4:
            array = array.transpose(3, 2, 0, 1)
        elif array.ndim == 3:
            array = array.transpose(2, 0, 1)
        elif array.ndim == 2:
            array = array.transpose(1, 0)
    return torch.from_numpy(np.ascontiguousarray(array))


def _find_prefix(weights, prefix: str) -> str:
    if prefix:
        return prefix
    for candidate in ("", "opt/target/", "params/", "params/img/"):
        if f"{candidate}embedding/kernel" in weights:
            return candidate
    raise ValueError("the .npz file has no 'embedding/kernel' entry: not a ViT checkpoint in the "
                     "original or big_vision layout")


def _copy_attention(qkv: nn.Linear, proj: nn.Linear, w, mha: str, index) -> None:
    """Flax's separate query/key/value (D, H, hd) kernels -> timm's packed qkv and the out projection."""
    take = (lambda a: a[index]) if index is not None else (lambda a: a)
    qkv.weight.copy_(torch.cat([_to_torch(take(w[f"{mha}{n}/kernel"]), False).flatten(1).T
                                for n in ("query", "key", "value")]))
    qkv.bias.copy_(torch.cat([_to_torch(take(w[f"{mha}{n}/bias"]), False).reshape(-1)
                              for n in ("query", "key", "value")]))
    proj.weight.copy_(_to_torch(take(w[f"{mha}out/kernel"])).flatten(1))
    proj.bias.copy_(_to_torch(take(w[f"{mha}out/bias"])))


def _copy_norm(norm: nn.Module, w, key: str, index=None) -> None:
    take = (lambda a: a[index]) if index is not None else (lambda a: a)
    norm.weight.copy_(_to_torch(take(w[f"{key}/scale"])))
    norm.bias.copy_(_to_torch(take(w[f"{key}/bias"])))


def _copy_mlp(mlp: nn.Module, w, key: str, index=None) -> None:
    take = (lambda a: a[index]) if index is not None else (lambda a: a)
    for r, fc in enumerate((mlp.fc1, mlp.fc2)):
        fc.weight.copy_(_to_torch(take(w[f"{key}/Dense_{r}/kernel"])))
        fc.bias.copy_(_to_torch(take(w[f"{key}/Dense_{r}/bias"])))


@torch.no_grad()
def load_npz_weights(model: nn.Module, path: str, prefix: str = "") -> None:
    """Load a Google ViT (.npz) checkpoint: the original layout (encoderblock_{i}) or big_vision's
    (one stacked 'encoderblock' with the layer as the leading axis, MAP head)."""
    kind = checkpoint_format(path)
    if kind != "npz":
        raise ValueError(f"{path!r} is a {kind} file, not a JAX/Flax .npz checkpoint; load it with "
                         "create_model(name, checkpoint_path=...) or model.load_state_dict")
    w = np.load(path)
    prefix = _find_prefix(w, prefix)
    big_vision = (prefix.startswith("params/") or f"{prefix}pos_embedding" in w
                  or f"{prefix}Transformer/encoderblock/LayerNorm_0/scale" in w)

    model.patch_embed.proj.weight.copy_(_to_torch(w[f"{prefix}embedding/kernel"]))
    model.patch_embed.proj.bias.copy_(_to_torch(w[f"{prefix}embedding/bias"]))
    if model.cls_token is not None:
        model.cls_token.copy_(_to_torch(w[f"{prefix}cls"], False))
    if model.pos_embed is not None:
        key = f"{prefix}pos_embedding" if big_vision else f"{prefix}Transformer/posembed_input/pos_embedding"
        pos_embed = _to_torch(w[key], False)
        if pos_embed.shape != model.pos_embed.shape:
            pos_embed = resample_abs_pos_embed(
                pos_embed, model.patch_embed.grid_size,
                num_prefix_tokens=0 if model.no_embed_class else model.num_prefix_tokens,
                interpolation="bilinear", antialias=False)
        model.pos_embed.copy_(pos_embed)
    if hasattr(model.norm, "weight"):
        _copy_norm(model.norm, w, f"{prefix}Transformer/encoder_norm")
    if (isinstance(model.head, nn.Linear) and f"{prefix}head/bias" in w
            and model.head.bias.shape[0] == w[f"{prefix}head/bias"].shape[-1]):
        model.head.weight.copy_(_to_torch(w[f"{prefix}head/kernel"]))
        model.head.bias.copy_(_to_torch(w[f"{prefix}head/bias"]))
    if isinstance(model.attn_pool, AttentionPoolLatent):
        pool, head = model.attn_pool, f"{prefix}MAPHead_0/"
        mha = f"{head}MultiHeadDotProductAttention_0/"
        pool.latent.copy_(_to_torch(w[f"{head}probe"], False))
        pool.q.weight.copy_(_to_torch(w[f"{mha}query/kernel"], False).flatten(1).T)
        pool.q.bias.copy_(_to_torch(w[f"{mha}query/bias"], False).reshape(-1))
        pool.kv.weight.copy_(torch.cat([_to_torch(w[f"{mha}{n}/kernel"], False).flatten(1).T
                                        for n in ("key", "value")]))
        pool.kv.bias.copy_(torch.cat([_to_torch(w[f"{mha}{n}/bias"], False).reshape(-1)
                                      for n in ("key", "value")]))
        pool.proj.weight.copy_(_to_torch(w[f"{mha}out/kernel"]).flatten(1))
        pool.proj.bias.copy_(_to_torch(w[f"{mha}out/bias"]))
        _copy_norm(pool.norm, w, f"{head}LayerNorm_0")
        _copy_mlp(pool.mlp, w, f"{head}MlpBlock_0")

    # The two layouts name the sub-layers of a block differently.
    mha_id, mlp_id, norm2_id = (0, 0, 1) if big_vision else (1, 3, 2)
    stacked = f"{prefix}Transformer/encoderblock/LayerNorm_0/scale" in w
    for i, block in enumerate(model.blocks):
        key = f"{prefix}Transformer/encoderblock/" if stacked else f"{prefix}Transformer/encoderblock_{i}/"
        index = i if stacked else None
        _copy_norm(block.norm1, w, f"{key}LayerNorm_0", index)
        _copy_attention(block.attn.qkv, block.attn.proj, w, f"{key}MultiHeadDotProductAttention_{mha_id}/", index)
        _copy_norm(block.norm2, w, f"{key}LayerNorm_{norm2_id}", index)
        _copy_mlp(block.mlp, w, f"{key}MlpBlock_{mlp_id}", index)
