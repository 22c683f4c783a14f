"""The model against timm: same state_dict keys, outputs, intermediates and gradients."""
import math

import numpy as np
import pytest
import torch

import vit_kernels as vk

timm = pytest.importorskip("timm")

# Two blocks keep every architectural feature of a config (prefix tokens, pooling, norms,
# LayerScale, widths, image size) at a fraction of the CPU time of the full depth.
SHALLOW = dict(depth=2)


def _pair(name, **overrides):
    ref = timm.create_model(name, **overrides)
    model = vk.create_model(name, **overrides)
    model.load_state_dict(ref.state_dict())
    return model, ref


def _images(model, batch=2, size=None):
    size = size or model.patch_embed.img_size
    return torch.randn(batch, model.in_chans, *size)


@pytest.mark.parametrize("name", vk.list_models())
def test_forward_and_intermediates_match_timm(name):
    model, ref = _pair(name, **SHALLOW)
    model.eval(), ref.eval()
    x = _images(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))
        for kwargs in (dict(), dict(indices=1, output_fmt="NLC", norm=True, return_prefix_tokens=True),
                       dict(indices=[0], stop_early=True, intermediates_only=True)):
            ours, theirs = model.forward_intermediates(x, **kwargs), ref.forward_intermediates(x, **kwargs)
            torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("name", vk.list_models())
def test_gradients_match_timm(name):
    model, ref = _pair(name, **SHALLOW)
    model.train(), ref.train()
    x = _images(model)
    model(x).square().mean().backward()
    ref(x).square().mean().backward()
    theirs = dict(ref.named_parameters())
    for param_name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, theirs[param_name].grad, msg=lambda m: f"{param_name}: {m}")


def test_full_depth_base_matches_timm():
    model, ref = _pair("vit_base_patch16_224")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref.eval()(x))


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "vit_base_patch14_reg4_dinov2"])
def test_dynamic_img_size_second_resolution(name):
    # 160 x 208 is not square and not the trained size: the pos-embed is resampled to a 10 x 13 grid.
    model, ref = _pair(name, dynamic_img_size=True, **SHALLOW)
    size = (160, 208) if "patch16" in name else (154, 210)
    x = _images(model, size=size)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref.eval()(x))


def test_dynamic_img_pad_matches_timm():
    model, ref = _pair("vit_tiny_patch16_224", dynamic_img_size=True, dynamic_img_pad=True, **SHALLOW)
    x = _images(model, size=(150, 170))  # neither a multiple of 16: padded right and bottom
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref.eval()(x))


@pytest.mark.parametrize("overrides", [
    dict(global_pool="max"), dict(global_pool="avgmax"), dict(global_pool=""), dict(class_token=False,
                                                                                   global_pool="avg"),
    dict(pos_embed="none"), dict(qk_norm=True), dict(fc_norm=True), dict(final_norm=False),
    dict(scale_attn_norm=True, scale_mlp_norm=True), dict(proj_bias=False, qkv_bias=False),
    dict(pool_include_prefix=True, global_pool="avg"), dict(embed_norm_layer="layernorm"),
    dict(act_layer="gelu_tanh"), dict(act_layer="quick_gelu"),
])
def test_constructor_options_match_timm(overrides):
    model, ref = _pair("vit_tiny_patch16_224", **SHALLOW, **overrides)
    x = _images(model)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref.eval()(x))
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True),
                                   ref.forward_head(ref.forward_features(x), pre_logits=True))


def test_fused_attn_off_and_masks_match_timm():
    model, ref = _pair("vit_tiny_patch16_224", **SHALLOW)
    model.eval(), ref.eval()
    x = _images(model)
    n = model.patch_embed.num_patches + 1
    mask = torch.rand(n, n) > 0.3
    mask.fill_diagonal_(True)
    with torch.no_grad():
        expected = ref(x, attn_mask=mask)
        torch.testing.assert_close(model(x, attn_mask=mask), expected)
        torch.testing.assert_close(model(x, is_causal=True), ref(x, is_causal=True))
        for block in model.blocks:
            block.attn.fused_attn = False
        torch.testing.assert_close(model(x, attn_mask=mask), expected)


def test_explicit_attention_map_is_hookable():
    model = vk.create_model("vit_tiny_patch16_224", **SHALLOW).eval()
    model.blocks[0].attn.fused_attn = False
    maps = []
    model.blocks[0].attn.attn_drop.register_forward_hook(lambda m, i, o: maps.append(o))
    model(_images(model, batch=1))
    assert maps and maps[0].shape == (1, 3, 197, 197)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(1, 3, 197))


def test_grad_checkpointing_gives_same_gradients():
    model = vk.create_model("vit_tiny_patch16_224", **SHALLOW)
    x = _images(model)
    model(x).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], msg=lambda m: f"{n}: {m}")


def test_prune_and_get_intermediate_layers_match_timm():
    model, ref = _pair("vit_small_patch16_224", depth=4)
    x = _images(model)
    with torch.no_grad():
        torch.testing.assert_close(model.get_intermediate_layers(x, n=2, reshape=True, norm=True),
                                   ref.get_intermediate_layers(x, n=2, reshape=True, norm=True))
    assert model.prune_intermediate_layers([1]) == ref.prune_intermediate_layers([1]) == [1]
    assert len(model.blocks) == 2 and isinstance(model.head, torch.nn.Identity)


def test_classifier_interface():
    model = vk.create_model("vit_tiny_patch16_224", **SHALLOW)
    assert model.get_classifier() is model.head
    model.reset_classifier(10, "avg")
    assert model.head.out_features == 10 and model.global_pool == "avg"
    assert model(_images(model)).shape == (2, 10)
    model.reset_classifier(0)
    assert model(_images(model)).shape == (2, 192)
    assert model.no_weight_decay() == timm.create_model("vit_tiny_patch16_224", **SHALLOW).no_weight_decay()
    assert model.group_matcher()["stem"].startswith("^cls_token")


@pytest.mark.parametrize("mode", ["", "jax", "jax_nlhb", "moco"])
def test_init_weight_statistics(mode):
    torch.manual_seed(0)
    model = vk.VisionTransformer(embed_dim=192, depth=2, num_heads=3, num_classes=100, weight_init=mode)
    qkv = model.blocks[0].attn.qkv.weight
    fan_out, fan_in = qkv.shape
    if mode == "":
        expected_std = 0.02
    elif mode == "moco":
        expected_std = math.sqrt(6.0 / (fan_out // 3 + fan_in)) / math.sqrt(3)
    else:
        expected_std = math.sqrt(6.0 / (fan_out + fan_in)) / math.sqrt(3)  # xavier uniform
    assert qkv.std().item() == pytest.approx(expected_std, rel=0.05)
    assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.cls_token.abs().max().item() < 1e-5
    if mode.startswith("jax"):
        assert model.head.weight.abs().max().item() == 0.0
        expected_bias = -math.log(100) if mode == "jax_nlhb" else 0.0
        torch.testing.assert_close(model.head.bias, torch.full((100,), expected_bias))
        conv = model.patch_embed.proj.weight
        assert conv.std().item() == pytest.approx(conv[0].numel() ** -0.5, rel=0.05)  # lecun normal
    else:
        assert model.head.bias.abs().max().item() == 0.0


def test_fix_init_scales_output_projections():
    torch.manual_seed(0)
    plain = vk.VisionTransformer(embed_dim=192, depth=2, num_heads=3)
    torch.manual_seed(0)
    fixed = vk.VisionTransformer(embed_dim=192, depth=2, num_heads=3, fix_init=True)
    torch.testing.assert_close(fixed.blocks[1].mlp.fc2.weight, plain.blocks[1].mlp.fc2.weight / 2.0)


def _write_big_vision_npz(path, ref):
    """Write ``ref``'s weights in the original Google ViT .npz layout (the inverse of the loader)."""
    t = lambda p: p.detach().numpy()
    d, h = ref.embed_dim, ref.blocks[0].attn.num_heads
    w = {"embedding/kernel": t(ref.patch_embed.proj.weight).transpose(2, 3, 1, 0),
         "embedding/bias": t(ref.patch_embed.proj.bias), "cls": t(ref.cls_token),
         "Transformer/posembed_input/pos_embedding": t(ref.pos_embed),
         "Transformer/encoder_norm/scale": t(ref.norm.weight), "Transformer/encoder_norm/bias": t(ref.norm.bias),
         "head/kernel": t(ref.head.weight).T, "head/bias": t(ref.head.bias)}
    for i, block in enumerate(ref.blocks):
        p = f"Transformer/encoderblock_{i}/"
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = t(block.norm1.weight), t(block.norm1.bias)
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = t(block.norm2.weight), t(block.norm2.bias)
        for n, weight, bias in zip(("query", "key", "value"), block.attn.qkv.weight.chunk(3),
                                   block.attn.qkv.bias.chunk(3)):
            w[p + f"MultiHeadDotProductAttention_1/{n}/kernel"] = t(weight).T.reshape(d, h, d // h)
            w[p + f"MultiHeadDotProductAttention_1/{n}/bias"] = t(bias).reshape(h, d // h)
        w[p + "MultiHeadDotProductAttention_1/out/kernel"] = t(block.attn.proj.weight).T.reshape(h, d // h, d)
        w[p + "MultiHeadDotProductAttention_1/out/bias"] = t(block.attn.proj.bias)
        for r, fc in enumerate((block.mlp.fc1, block.mlp.fc2)):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"], w[p + f"MlpBlock_3/Dense_{r}/bias"] = t(fc.weight).T, t(fc.bias)
    np.savez(path, **w)


def test_load_pretrained_npz_round_trip(tmp_path):
    source = timm.create_model("vit_tiny_patch16_224", **SHALLOW)
    path = str(tmp_path / "vit.npz")
    _write_big_vision_npz(path, source)
    model = vk.create_model("vit_tiny_patch16_224", **SHALLOW)
    model.load_pretrained(path)
    timm_loaded = timm.create_model("vit_tiny_patch16_224", **SHALLOW)
    timm_loaded.load_pretrained(path)
    for name, value in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(timm_loaded.state_dict()[name], value)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_checkpoint_path(tmp_path, suffix):
    source = vk.create_model("vit_tiny_patch16_224", **SHALLOW)
    path = str(tmp_path / f"weights{suffix}")
    if suffix == ".pth":
        torch.save(source.state_dict(), path)
    else:
        from safetensors.torch import save_file
        save_file(source.state_dict(), path)
    loaded = vk.create_model("vit_tiny_patch16_224", checkpoint_path=path, **SHALLOW)
    for name, value in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value)


def test_strict_load_mismatch_names_keys_and_fitting_config():
    small = timm.create_model("vit_small_patch16_224").state_dict()
    model = vk.create_model("vit_tiny_patch16_224")
    with pytest.raises(RuntimeError, match=r"size mismatch.*\n.*fits \['vit_small_patch16_224'\]"):
        model.load_state_dict(small)


@pytest.mark.parametrize("make, error, match", [
    (lambda: vk.create_model("vit_base_patch16_244"), KeyError, "did you mean.*vit_base_patch16_224"),
    (lambda: vk.create_model("vit_tiny_patch16_224", pretrained=True), ValueError, "checkpoint_path"),
    (lambda: vk.VisionTransformer(embed_dim=100, num_heads=3), ValueError, "divisible by num_heads"),
    (lambda: vk.VisionTransformer(global_pool="mean"), ValueError, "global_pool must be one of"),
    (lambda: vk.VisionTransformer(pos_embed="sincos"), ValueError, "pos_embed must be one of"),
    (lambda: vk.VisionTransformer(weight_init="xavier"), ValueError, "weight_init must be one of"),
    (lambda: vk.VisionTransformer(class_token=False), ValueError, "needs class_token"),
])
def test_bad_construction(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("shape, match", [
    ((2, 1, 224, 224), "1 channels; expected in_chans = 3"),
    ((2, 3, 192, 224), r"does not match img_size \(224, 224\)"),
    ((3, 224, 224), r"shape \(B, C, H, W\)"),
])
def test_bad_input_images(shape, match):
    model = vk.create_model("vit_tiny_patch16_224", **SHALLOW)
    with pytest.raises(ValueError, match=match):
        model(torch.randn(*shape))


def test_dynamic_size_rejects_indivisible_image():
    model = vk.create_model("vit_tiny_patch16_224", dynamic_img_size=True, **SHALLOW)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        model(torch.randn(1, 3, 200, 224))


def test_backend_switch():
    assert vk.get_backend() in ("auto", "triton", "torch")
    with vk.use_backend("torch"):
        assert vk.get_backend() == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        vk.set_backend("cuda")
