"""Impossible arguments and unreadable checkpoints: a ValueError that names the argument or file (issue #13)."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import vit_kernels as vk
from vit_kernels.checkpoint import checkpoint_format

# One block at 32x32 (a 2x2 patch grid): building it takes milliseconds.
TINY = dict(img_size=32, patch_size=16, embed_dim=48, depth=1, num_heads=3)


@pytest.mark.parametrize("overrides, match", [
    (dict(num_heads=0), "num_heads must be an int >= 1; got 0"),
    (dict(num_heads=-3), "num_heads must be an int >= 1; got -3"),
    (dict(patch_size=0), "patch_size must be a positive int or an"),
    (dict(patch_size=(16, 0)), r"patch_size .*; got \(16, 0\)"),
    # Valid on its own, but no whole patch fits the image: the grid would be empty.
    (dict(patch_size=64), "img_size 32 is smaller than patch_size 64"),
    (dict(img_size=0), "img_size must be a positive int or an"),
    (dict(img_size=(32, -1)), r"img_size .*; got \(32, -1\)"),
    (dict(img_size=None), "img_size .*; got None"),
    (dict(depth=-1), "depth must be an int >= 0; got -1"),
    (dict(depth=1.5), "depth must be an int >= 0; got 1.5"),
    (dict(embed_dim=0), "embed_dim must be an int >= 1; got 0"),
    (dict(in_chans=0), "in_chans must be an int >= 1; got 0"),
    (dict(num_classes=-1), "num_classes must be an int >= 0; got -1"),
    (dict(reg_tokens=-1), "reg_tokens must be an int >= 0; got -1"),
    (dict(mlp_ratio=0), "mlp_ratio must be a number > 0; got 0"),
    (dict(mlp_ratio=float("nan")), "mlp_ratio must be a number > 0; got nan"),
    (dict(drop_path_rate=2.0), r"drop_path_rate must be in \[0, 1\]; got 2.0"),
    (dict(drop_path_rate=-0.1), r"drop_path_rate must be in \[0, 1\]; got -0.1"),
    # A dropout rate of 1 drops everything (and the attention op refuses it): [0, 1) for these.
    (dict(drop_rate=1.0), r"drop_rate must be in \[0, 1\); got 1.0"),
    (dict(pos_drop_rate=-0.5), r"pos_drop_rate must be in \[0, 1\); got -0.5"),
    (dict(patch_drop_rate=1.0), r"patch_drop_rate must be in \[0, 1\); got 1.0"),
    (dict(proj_drop_rate=float("nan")), r"proj_drop_rate must be in \[0, 1\); got nan"),
    (dict(attn_drop_rate=1.0), r"attn_drop_rate must be in \[0, 1\); got 1.0"),
])
def test_impossible_constructor_value_names_the_argument(overrides, match):
    with pytest.raises(ValueError, match=match):
        vk.VisionTransformer(**{**TINY, **overrides})


def test_create_model_overrides_go_through_the_same_checks():
    with pytest.raises(ValueError, match="num_heads must be an int >= 1; got 0"):
        vk.create_model("vit_tiny_patch16_224", num_heads=0)
    with pytest.raises(ValueError, match=r"drop_path_rate must be in \[0, 1\]; got 1.5"):
        vk.create_model("vit_tiny_patch16_224", drop_path_rate=1.5)


def test_boundary_values_still_build():
    # The edges of each range are models timm builds too: no blocks, no head, every path dropped,
    # one patch, (H, W) pairs, and a numpy integer read from a config file.
    model = vk.VisionTransformer(**{**TINY, "depth": 0, "num_classes": 0, "drop_path_rate": 1.0,
                                    "img_size": (16, 32), "patch_size": (16, 16), "num_heads": np.int64(3)})
    assert len(model.blocks) == 0 and model.patch_embed.num_patches == 2


def test_load_state_dict_with_a_non_tensor_names_the_key():
    model = vk.VisionTransformer(**TINY)
    state = {**model.state_dict(), "cls_token": 3}
    with pytest.raises(RuntimeError) as theirs:
        nn.Module.load_state_dict(model, state)
    # torch's own error (it names the key and the type), then the fitting-config hint.
    with pytest.raises(RuntimeError, match=r'"cls_token", expected torch.Tensor.*int') as ours:
        model.load_state_dict(state)
    assert str(ours.value) == f"{theirs.value}\n(no known model config fits the state dict)"


def _tiny_state():
    return vk.create_model("vit_tiny_patch16_224", depth=1, img_size=32).state_dict()


def _save_safetensors(state, path):
    from safetensors.torch import save_file
    save_file(state, path)


def _save_legacy(state, path):
    torch.save(state, path, _use_new_zipfile_serialization=False)


# Names that lie about the content: the format is read from the file's first bytes.
@pytest.mark.parametrize("save, name, kind", [
    (_save_safetensors, "w.pth", "safetensors"),
    (_save_safetensors, "w.bin", "safetensors"),
    (torch.save, "w.safetensors", "torch"),
    (_save_legacy, "w.pt", "torch"),
])
def test_checkpoint_format_is_read_from_the_content(tmp_path, save, name, kind):
    state = _tiny_state()
    path = str(tmp_path / name)
    save(state, path)
    assert checkpoint_format(path) == kind
    loaded = vk.create_model("vit_tiny_patch16_224", depth=1, img_size=32, checkpoint_path=path)
    for key, value in state.items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


def test_npz_is_recognised_under_any_name(tmp_path):
    path = str(tmp_path / "w.pth")
    with open(path, "wb") as f:
        np.savez(f, **{"embedding/kernel": np.zeros((16, 16, 3, 48), np.float32)})
    assert checkpoint_format(path) == "npz"


@pytest.mark.parametrize("content", [b"", b"hello, not weights", b"\x93NUMPY\x01\x00v\x00"])
def test_unknown_checkpoint_format_names_the_file_and_the_formats(tmp_path, content):
    path = tmp_path / "w.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"'.*w\.pth' is not a safetensors, torch.save .* or JAX/Flax .npz file"):
        vk.create_model("vit_tiny_patch16_224", depth=1, img_size=32, checkpoint_path=str(path))


def test_load_pretrained_refuses_a_state_dict_file(tmp_path):
    path = str(tmp_path / "w.npz")
    _save_safetensors(_tiny_state(), path)
    model = vk.create_model("vit_tiny_patch16_224", depth=1, img_size=32)
    with pytest.raises(ValueError, match=r"is a safetensors file, not a JAX/Flax .npz checkpoint"):
        model.load_pretrained(path)
