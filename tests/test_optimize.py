"""optimize(model) against the unfused timm model: outputs, intermediates, gradients, state, restore.

Everything here runs the PyTorch reference of every op (``vk.use_backend("torch")``): it tests
the conversion and the fused residual stream, not the kernels (tests/test_optimize_triton.py
runs a tiny model on the kernels in the interpreter).
"""
import logging

import pytest
import torch
from torch import nn

import vit_kernels as vk
from vit_kernels.layers import Block

timm = pytest.importorskip("timm")

# Two blocks keep every architectural feature of a config (prefix tokens, pooling, norms,
# LayerScale, widths, image size) at a fraction of the CPU time of the full depth.
SHALLOW = dict(depth=2)


def _small(name):
    """depth 2, and the 518 px DINOv2 configs at 224 px (1369 -> 256 tokens, same architecture)."""
    size = vk.vision_transformer.MODEL_CONFIGS[name].get("img_size", 224)
    return dict(SHALLOW, img_size=224 if size > 256 else size)


@pytest.fixture(autouse=True)
def _reference_backend():
    with vk.use_backend("torch"):
        yield


def _pair(name, **overrides):
    """(optimized, unfused) timm models with the same weights."""
    ref = timm.create_model(name, **overrides)
    model = timm.create_model(name, **overrides)
    model.load_state_dict(ref.state_dict())
    return vk.optimize(model), ref


def _images(model, batch=2):
    return torch.randn(batch, 3, *model.patch_embed.img_size)


def _assert_same_grads(model, ref):
    theirs = dict(ref.named_parameters())
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, theirs[name].grad, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("name", vk.list_models())
def test_matches_timm(name):
    ref = timm.create_model(name, **_small(name))
    model = timm.create_model(name, **_small(name))
    model.load_state_dict(ref.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())

    vk.optimize(model)
    assert model.vit_kernels_report.fused_stream
    assert all(type(b) is Block for b in model.blocks)
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert all(p is params[n] for n, p in model.named_parameters())

    x = _images(model)
    model.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))
        torch.testing.assert_close(model.forward_features(x), ref.forward_features(x))
        for kwargs in (dict(indices=1, output_fmt="NLC", norm=True, return_prefix_tokens=True),
                       dict(indices=[0], stop_early=True, intermediates_only=True)):
            torch.testing.assert_close(model.forward_intermediates(x, **kwargs),
                                       ref.forward_intermediates(x, **kwargs))

    model.train(), ref.train()
    model(x).square().mean().backward()
    ref(x).square().mean().backward()
    _assert_same_grads(model, ref)


@pytest.mark.parametrize("name", [n for n, c in vk.vision_transformer.MODEL_CONFIGS.items()
                                  if c.get("global_pool", "token") == "token"])
def test_class_token_path(name, monkeypatch):
    # Eval-mode class-token pooling: the last block's MLP sees one token per image, same logits.
    # Seen through the op, not a hook: a hook on the last block turns the shortcut off.
    model, ref = _pair(name, **_small(name))
    model.eval(), ref.eval()
    seen, mlp = [], vk.ops.mlp
    monkeypatch.setattr(vk.ops, "mlp", lambda x, *args: seen.append(x.shape[1]) or mlp(x, *args))
    x = _images(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))
    assert seen == [x.shape[-1] // model.patch_embed.patch_size[0] * x.shape[-2] // model.patch_embed.patch_size[1]
                    + model.num_prefix_tokens, 1]


def test_vk_model():
    ref = vk.create_model("vit_small_patch14_dinov2", depth=2, img_size=56, drop_path_rate=0.2)
    model = vk.create_model("vit_small_patch14_dinov2", depth=2, img_size=56, drop_path_rate=0.2)
    model.load_state_dict(ref.state_dict())
    vk.optimize(model)
    assert model.vit_kernels_report.fused_stream and type(model.blocks[0]) is Block
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref.eval()(x))
    model.train(), ref.train()
    torch.manual_seed(1)
    model(x).square().mean().backward()
    torch.manual_seed(1)
    ref(x).square().mean().backward()
    _assert_same_grads(model, ref)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_features_match(checkpointing):
    # DropPath (folded into the fused adds), dropout, LayerScale, qk-norm and grad checkpointing:
    # same seed, same random draws in the same order, same gradients.
    kwargs = dict(depth=3, img_size=64, drop_path_rate=0.3, proj_drop_rate=0.1, drop_rate=0.1,
                  init_values=0.1, qk_norm=True)
    model, ref = _pair("vit_tiny_patch16_224", **kwargs)
    model.set_grad_checkpointing(checkpointing), ref.set_grad_checkpointing(checkpointing)
    x = _images(model, batch=4)
    torch.manual_seed(3)
    out = model(x)
    torch.manual_seed(3)
    expected = ref(x)
    torch.testing.assert_close(out, expected)
    out.square().mean().backward()
    expected.square().mean().backward()
    _assert_same_grads(model, ref)


def test_autocast():
    model, ref = _pair("vit_tiny_patch16_224", depth=2, img_size=64)
    x = _images(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = model(x), ref(x)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("train", [False, True])
def test_compile_fullgraph(train):
    # CPU inductor compiles this model in about a minute on 2 cores; aot_eager traces the same
    # graph (dynamo + AOT autograd, fullgraph) in seconds. Inductor runs in the cuda test below.
    model, ref = _pair("vit_tiny_patch16_224", depth=2, img_size=64, init_values=1e-3)
    model.train(train), ref.train(train)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = _images(model)
    torch.testing.assert_close(compiled(x), ref(x))
    if train:
        compiled(x).square().mean().backward()
        ref(x).square().mean().backward()
        _assert_same_grads(model, ref)
    torch._dynamo.reset()


@pytest.mark.cuda
def test_compile_inductor_cuda():
    model, ref = _pair("vit_base_patch16_224", depth=2)
    model, ref = model.cuda().eval(), ref.cuda().eval()
    x = _images(model).cuda()
    with vk.use_backend("auto"), torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), ref(x), atol=1e-3, rtol=1e-3)


def test_double_optimize_and_restore():
    model, ref = _pair("vit_small_patch16_224", depth=2, img_size=64, init_values=1e-2)
    x = _images(model)
    modules = list(model.modules())
    assert vk.optimize(model) is model
    assert list(model.modules()) == modules  # the second call changed nothing

    restored = vk.restore(model)
    assert restored is model and not hasattr(model, "vit_kernels_report")
    assert "forward" not in model.__dict__ and "forward_features" not in model.__dict__
    assert type(model.blocks[0]) is timm.models.vision_transformer.Block
    assert type(model.blocks[0].attn) is timm.layers.Attention and type(model.norm) is not vk.layers.LayerNorm
    assert vk.restore(model) is model  # restoring an unoptimized model is a no-op
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref.eval()(x))
    # Re-optimizing after restore works and finds the same Parameters.
    params = list(model.parameters())
    vk.optimize(model)
    assert all(a is b for a, b in zip(model.parameters(), params))


def test_optimizer_made_before_keeps_working():
    ref = timm.create_model("vit_tiny_patch16_224", depth=1, img_size=32)
    model = timm.create_model("vit_tiny_patch16_224", depth=1, img_size=32)
    model.load_state_dict(ref.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    vk.optimize(model)  # after the optimizer was made: it must still train the model
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    x = _images(model)
    for m, opt in ((model, optimizer), (ref, ref_opt)):
        m(x).square().mean().backward()
        opt.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, msg=lambda m: f"{name}: {m}")


def test_hooks_by_name():
    model = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32)
    calls = []
    model.blocks[1].mlp.register_forward_hook(lambda *a: calls.append("before"))
    vk.optimize(model)
    model.get_submodule("blocks.1.attn").register_forward_hook(lambda *a: calls.append("after"))
    model.train()(torch.randn(1, 3, 32, 32))
    assert sorted(calls) == ["after", "before"]


def test_flags_and_logging(caplog):
    model, ref = _pair("vit_tiny_patch16_224", depth=2, img_size=32)
    vk.restore(model)
    with caplog.at_level(logging.INFO, logger="vit_kernels.convert"):
        vk.optimize(model, attention=False, mlp=True, norm=False, patch_embed=False)
    assert "residual stream not fused" in caplog.text
    assert type(model.blocks[0]) is timm.models.vision_transformer.Block  # the block itself, vk's Mlp swapped in
    assert type(model.blocks[0].mlp) is vk.layers.Mlp and type(model.blocks[0].attn) is timm.layers.Attention
    assert type(ref.blocks[0].mlp) is timm.layers.Mlp  # the model built from the same weights is untouched
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref.eval()(x))
    vk.restore(model)
    assert type(model.blocks[0].mlp) is timm.layers.Mlp


@pytest.mark.parametrize("overrides, unsupported", [
    (dict(norm_layer="rmsnorm"), "blocks.0"),
    (dict(mlp_layer="swiglu", act_layer="silu"), "blocks.0.mlp"),
    (dict(block_fn="ParallelScalingBlock"), "blocks.0"),
    (dict(dynamic_img_size=True), "patch_embed"),
])
def test_unsupported_parts_left_as_they_are(overrides, unsupported):
    overrides = dict(overrides)
    if overrides.get("norm_layer") == "rmsnorm":
        overrides["norm_layer"] = timm.layers.RmsNorm
    if overrides.get("mlp_layer") == "swiglu":
        overrides["mlp_layer"] = timm.layers.SwiGLUPacked
    if overrides.get("block_fn") == "ParallelScalingBlock":
        overrides["block_fn"] = timm.models.vision_transformer.ParallelScalingBlock
    model, ref = _pair("vit_tiny_patch16_224", depth=2, img_size=32, **overrides)
    assert unsupported in model.vit_kernels_report.unsupported
    assert unsupported in str(model.vit_kernels_report)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref.eval()(x))


def test_unknown_vit_class():
    # EVA (RoPE, SwiGLU): its blocks are not timm's Block; nothing fusable, model unchanged in effect.
    ref = timm.create_model("eva02_tiny_patch14_224", depth=1, img_size=28)
    model = timm.create_model("eva02_tiny_patch14_224", depth=1, img_size=28)
    model.load_state_dict(ref.state_dict())
    vk.optimize(model)
    assert "(model)" in model.vit_kernels_report.unsupported and "blocks.0" in model.vit_kernels_report.unsupported
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref.eval()(x))


def test_not_a_vit():
    with pytest.raises(TypeError, match="expects a Vision Transformer.*got Sequential"):
        vk.optimize(nn.Sequential(nn.Linear(4, 4)))


def test_dtype_the_kernels_cannot_serve():
    model = timm.create_model("vit_tiny_patch16_224", depth=1, img_size=32).double()
    modules = list(model.modules())
    with vk.use_backend("triton"), pytest.raises(RuntimeError, match="left unchanged"):
        vk.optimize(model)
    assert list(model.modules()) == modules and not hasattr(model, "vit_kernels_report")
    assert "forward" not in model.__dict__
