"""Training activation memory: what autograd keeps for the backward, fused models vs timm eager.

Counted with ``torch.autograd.graph.saved_tensors_hooks``: every tensor an op saves for its
backward adds its number of elements (weights count too, as timm's Linear saves its weight). A vk
model (``vk.create_model``, and ``vk.optimize`` of a timm model) must keep at most what timm's
eager model keeps, on the reference path and on the kernels (the interpreter on a CPU).
"""
import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

import vit_kernels as vk

from .utils import DEVICE, CustomOpCalls

timm = pytest.importorskip("timm")


def saved_elements(model, images, backend: str) -> int:
    """Elements autograd keeps for the backward of one training forward of ``model`` under ``backend``."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel()
        return t

    with vk.use_backend(backend), saved_tensors_hooks(pack, lambda t: t):
        model.train()(images)
    return total


def _check(make_timm, make_vk, images, backend: str) -> None:
    """vk's model and vk.optimize of a timm model keep at most what timm's eager model keeps (the
    weights may differ: what is saved depends on the shapes only)."""
    theirs = saved_elements(make_timm(), images, "torch")
    optimized = make_timm()
    with vk.use_backend(backend):
        vk.optimize(optimized)
    for name, model in (("vk model", make_vk()), ("vk.optimize(timm model)", optimized)):
        ours = saved_elements(model, images, backend)
        assert ours <= theirs, f"{name} keeps {ours:,} elements for the backward; timm eager {theirs:,}"


# Depth 2, batch 2. vit_small: 197 tokens, 6 heads of 64. dinov2 at 224 px: 257 tokens, LayerScale
# and DropPath folded into the fused adds. qk-norm: timm keeps each norm's input and statistics.
# Dropout: the reference attention's dropout path and the unfused MLP (linear_gelu, linear).
REFERENCE_CASES = {
    "vit_small": ("vit_small_patch16_224", {}),
    "layerscale-droppath": ("vit_small_patch14_dinov2", dict(img_size=224, drop_path_rate=0.1)),
    "qk-norm": ("vit_small_patch16_224", dict(qk_norm=True)),
    "dropout": ("vit_small_patch16_224", dict(attn_drop_rate=0.1, proj_drop_rate=0.1)),
}


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("case", list(REFERENCE_CASES))
def test_reference_path_keeps_at_most_what_timm_keeps(case, backend):
    name, kwargs = REFERENCE_CASES[case]
    images = torch.randn(2, 3, 224, 224, device=DEVICE)
    _check(lambda: timm.create_model(name, depth=2, **kwargs).to(DEVICE),
           lambda: vk.create_model(name, depth=2, **kwargs).to(DEVICE), images, backend)


# 16 patches + a class token (+ 4 registers): tiny, for the interpreter.
TINY = dict(img_size=32, patch_size=8, embed_dim=64, num_heads=2, depth=2, num_classes=10)
KERNEL_CASES = {
    "plain": {},
    "layerscale-droppath": dict(init_values=0.1, drop_path_rate=0.2),
    "qk-norm": dict(qk_norm=True),
    "registers": dict(init_values=0.1, reg_tokens=4, no_embed_class=True),
}
# On a GPU float32 dots run PyTorch (backend.float32_dots_on_kernels): float16 there runs the kernels.
KERNEL_DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32


@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_kernels_keep_at_most_what_timm_keeps(case):
    pytest.importorskip("triton")
    kwargs = dict(TINY, **KERNEL_CASES[case])
    images = torch.randn(2, 3, 32, 32, device=DEVICE, dtype=KERNEL_DTYPE)
    with CustomOpCalls() as calls:
        _check(lambda: timm.models.vision_transformer.VisionTransformer(**kwargs).to(DEVICE, KERNEL_DTYPE),
               lambda: vk.VisionTransformer(**kwargs).to(DEVICE, KERNEL_DTYPE), images, "triton")
    # The counts are the kernels' saves, not the reference's.
    assert {"qkv_attention_fwd", "add_layer_norm_fwd", "mlp_fwd"} <= set(calls.names), calls.names
