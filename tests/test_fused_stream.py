"""vk's own VisionTransformer runs the fused residual stream; Block equals timm's; LayerNorm2d
equals timm's; optimize keeps Parameters, buffers and hooks.

Reference backend throughout (``vk.use_backend("torch")``): these test the module structure,
not the kernels.
"""
import pytest
import torch
from torch import nn

import vit_kernels as vk
from vit_kernels import layers

timm = pytest.importorskip("timm")

# Two blocks, LayerScale and DropPath: every factor of the fused add is present.
TINY = dict(depth=2, img_size=32, init_values=0.1, drop_path_rate=0.2)


@pytest.fixture(autouse=True)
def _reference_backend():
    with vk.use_backend("torch"):
        yield


def _count_add_layer_norm(monkeypatch):
    """The (tokens, has residual) of every add_layer_norm call made through vk.ops."""
    calls = []
    op = vk.ops.add_layer_norm

    def counted(x, residual, *args, **kwargs):
        calls.append((x.shape[1], residual is not None))
        return op(x, residual, *args, **kwargs)
    monkeypatch.setattr(vk.ops, "add_layer_norm", counted)
    return calls


def _same_draws(modules, x):
    """Each module's output on x, every one from the same random state (DropPath, dropout)."""
    outs = []
    for module in modules:
        torch.manual_seed(1)
        outs.append(module(x))
    return outs


@pytest.mark.parametrize("train", [False, True])
def test_model_runs_the_fused_stream_without_optimize(monkeypatch, train):
    # Every residual add is inside a LayerNorm (norm2, the next norm1, the final norm); in eval
    # mode with class-token pooling the last block's norm2, MLP and the final norm see token 0 only.
    model = vk.create_model("vit_tiny_patch16_224", **TINY).train(train)
    x = torch.randn(2, 3, 32, 32)
    calls = _count_add_layer_norm(monkeypatch)
    model(x)
    tokens = model.patch_embed.num_patches + 1
    last = 1 if not train else tokens
    assert calls == [(tokens, False), (tokens, True), (tokens, True), (last, True), (last, True)]
    assert not hasattr(model, "vit_kernels_report")


def test_model_matches_optimized_timm_bit_for_bit():
    # The same code runs both: vk's model and an optimized timm model give identical results.
    ref = timm.create_model("vit_tiny_patch16_224", **TINY)
    model = vk.create_model("vit_tiny_patch16_224", **TINY)
    model.load_state_dict(ref.state_dict())
    vk.optimize(ref)
    x = torch.randn(2, 3, 32, 32)
    for train in (False, True):
        out, expected = _same_draws([model.train(train), ref.train(train)], x)
        assert torch.equal(out, expected)


def test_hooked_block_and_norm_run_unfused_and_fire():
    model = vk.create_model("vit_tiny_patch16_224", **TINY).eval()
    ref = timm.create_model("vit_tiny_patch16_224", **TINY).eval()
    model.load_state_dict(ref.state_dict())
    seen = []
    model.blocks[0].register_forward_hook(lambda m, args, out: seen.append(("block", out.shape[1])))
    model.blocks[1].norm2.register_forward_hook(lambda m, args, out: seen.append(("norm2", out.shape[1])))
    model.norm.register_forward_hook(lambda m, args, out: seen.append(("norm", out.shape[1])))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))
    # Hooks in the last block or on the final norm see every token, as timm's do: the class-token
    # shortcut (the last MLP on token 0 alone) is off while they are registered.
    assert seen == [("block", 5), ("norm2", 5), ("norm", 5)]


def test_compile_fullgraph():
    model = vk.create_model("vit_tiny_patch16_224", **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="aot_eager")(x), model(x))
    torch._dynamo.reset()


@pytest.mark.parametrize("kwargs", [dict(), dict(init_values=0.1, drop_path=0.5, qk_norm=True, proj_drop=0.1)])
def test_block_matches_timm(kwargs):
    ref = timm.models.vision_transformer.Block(64, 2, **kwargs)
    block = layers.Block(64, 2, **kwargs)
    block.load_state_dict(ref.state_dict())
    x = torch.randn(4, 17, 64)
    for train in (False, True):
        outs = _same_draws([block.train(train), ref.train(train)], x)
        torch.testing.assert_close(*outs)
    for out in outs:
        out.square().sum().backward()
    for p, q in zip(block.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_forward_fused_then_pending_add_is_forward():
    block = layers.Block(64, 2, init_values=0.1).eval()
    x = torch.randn(2, 9, 64)
    stream, pending = block.forward_fused(x)
    torch.testing.assert_close(layers.add_pending(stream, pending), block(x))


def test_layer_norm_2d_matches_timm():
    ref = timm.layers.LayerNorm2d(48)
    norm = layers.get_norm_layer("layernorm2d")(48)
    assert type(norm) is layers.LayerNorm2d and norm.eps == ref.eps == 1e-6
    assert not layers.is_last_dim_layer_norm(norm)  # its forward is not a last-dim LayerNorm
    with torch.no_grad():
        ref.weight.normal_(), ref.bias.normal_()
    norm.load_state_dict(ref.state_dict())
    x = torch.randn(2, 48, 5, 7, requires_grad=True)
    out, expected = norm(x), ref(x)
    torch.testing.assert_close(out, expected)
    assert out.shape == x.shape
    grads = torch.autograd.grad(out.square().sum(), (x, norm.weight, norm.bias))
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, ref.weight, ref.bias))
    torch.testing.assert_close(grads, expected_grads)


def test_optimize_leaves_hooked_modules_in_place():
    # A module with hooks is not replaced, so its hooks keep firing; the blocks around it fuse.
    ref = timm.create_model("vit_tiny_patch16_224", **TINY).eval()
    model = timm.create_model("vit_tiny_patch16_224", **TINY).eval()
    model.load_state_dict(ref.state_dict())
    hooked = {"blocks.0": model.blocks[0], "blocks.1.norm1": model.blocks[1].norm1, "norm": model.norm}
    fired = []
    for name, module in hooked.items():
        module.register_forward_hook(lambda m, args, out, name=name: fired.append(name))
    params = dict(model.named_parameters())
    vk.optimize(model)
    report = model.vit_kernels_report
    for name, module in hooked.items():
        assert model.get_submodule(name) is module and "hooks" in report.unsupported[name]
    assert type(model.blocks[1]) is layers.Block and type(model.blocks[0].attn) is layers.Attention
    assert all(p is params[n] for n, p in model.named_parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))
    assert fired == ["blocks.0", "blocks.1.norm1", "norm"]
    vk.restore(model)
    assert type(model.blocks[0].attn) is timm.layers.Attention


def test_adopt_keeps_parameters_buffers_and_their_persistence():
    old = nn.LayerNorm(8)
    old.register_buffer("kept", torch.arange(3.0))
    old.register_buffer("scratch", torch.ones(2), persistent=False)
    new = vk.convert._adopt(layers.LayerNorm(8, device="meta"), old.eval())
    assert new.weight is old.weight and new.bias is old.bias
    assert new.kept is old.kept and new.scratch is old.scratch
    assert list(new.state_dict()) == list(old.state_dict()) == ["weight", "bias", "kept"]
    assert not new.training
    with pytest.raises(RuntimeError, match="different parts"):
        vk.convert._adopt(layers.Mlp(8, device="meta"), old)
