"""vk.ops.implementation: what each Triton op reports under each backend (patch_embed's extension
dispatch is tested in tests/test_patch_embed.py)."""
import pytest
import torch

import vit_kernels as vk

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_OPS = ("attention", "qkv_attention", "add_layer_norm", "linear", "linear_gelu", "mlp")


@pytest.mark.parametrize("op", KERNEL_OPS)
def test_implementation_follows_the_backend(op):
    with vk.use_backend("triton"):
        impl, why = vk.ops.implementation(op, DEVICE)
        assert impl == "triton" and "Triton" in why, why
    with vk.use_backend("torch"):
        assert vk.ops.implementation(op, DEVICE) == ("torch", "PyTorch reference; backend 'torch' selected")
    with vk.use_backend("auto"):
        assert vk.ops.implementation(op, DEVICE)[0] == ("triton" if DEVICE == "cuda" else "torch")


def test_implementation_of_an_unknown_op_names_the_choices():
    with pytest.raises(ValueError, match="op must be one of .*'patch_embed'.*got 'softmax'"):
        vk.ops.implementation("softmax", DEVICE)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the kernels run on a CUDA tensor without the interpreter")
def test_implementation_says_when_the_kernels_cannot_run(monkeypatch):
    # 'triton' on a CPU tensor without the interpreter: reported, not raised (the info command
    # and the bench log print it), while running the op raises the same reason.
    monkeypatch.setattr(vk.backend, "_INTERPRETER", False)
    with vk.use_backend("triton"):
        impl, why = vk.ops.implementation("attention", "cpu")
        assert impl == "unavailable" and "TRITON_INTERPRET=1" in why, why
