"""``create_model(name, features_only=True)``: the outputs of chosen blocks as feature maps, as timm's.

timm wraps a ViT in ``FeatureGetterNet``, which calls the model's ``forward_intermediates`` and
prunes the blocks after the last one asked for; ``Features`` does the same on vk's model (whose
``forward_intermediates`` runs the fused residual stream), with the same ``feature_info``
interface, state_dict keys (``model.*``) and defaults (the last 3 blocks, NCHW).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import nn

OUTPUT_FORMATS = ("NCHW", "NLC")


class FeatureInfo:
    """What each block's output is (``num_chs``, ``reduction``, ``module``), as timm's FeatureInfo: an
    accessor without ``idx`` answers for the returned blocks, with ``idx`` for those block indices."""

    def __init__(self, info: List[Dict], out_indices: Sequence[int]):
        self.info = [dict(f, index=i) for i, f in enumerate(info)]
        self.out_indices = tuple(out_indices)

    def get_dicts(self, keys: Optional[Sequence[str]] = None, idx: Optional[Union[int, Sequence[int]]] = None):
        indices = self.out_indices if idx is None else idx
        picked = [self.info[i] for i in ([indices] if isinstance(indices, int) else indices)]
        picked = [f if keys is None else {k: f[k] for k in keys} for f in picked]
        return picked[0] if isinstance(indices, int) else picked

    def get(self, key: str, idx: Optional[Union[int, Sequence[int]]] = None):
        found = self.get_dicts([key], idx)
        return found[key] if isinstance(found, dict) else [f[key] for f in found]

    def channels(self, idx=None):
        return self.get("num_chs", idx)

    def reduction(self, idx=None):
        return self.get("reduction", idx)

    def module_name(self, idx=None):
        return self.get("module", idx)

    def __getitem__(self, item):
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)


class Features(nn.Module):
    """A ViT returning the outputs of blocks ``out_indices`` (the last ``n`` for an int), each
    (B, C, H, W) for ``output_fmt="NCHW"`` or (B, L, C) for "NLC"; ``norm`` applies the final norm."""

    def __init__(self, model: nn.Module, out_indices: Union[int, Sequence[int]] = 3, output_fmt: str = "NCHW",
                 norm: bool = False):
        super().__init__()
        if output_fmt not in OUTPUT_FORMATS:
            raise ValueError(f"output_fmt must be one of {OUTPUT_FORMATS}; got {output_fmt!r}")
        # Indices are resolved before the blocks after the last one are dropped.
        self.out_indices = model.prune_intermediate_layers(out_indices, prune_norm=not norm)
        self.feature_info = FeatureInfo(model.feature_info, self.out_indices)
        self.model = model
        self.output_fmt = output_fmt
        self.norm = norm

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self.model.forward_intermediates(x, indices=self.out_indices, norm=self.norm,
                                                output_fmt=self.output_fmt, intermediates_only=True)
