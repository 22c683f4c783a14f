"""Whole-model edge cases (issue #13): empty batches and the meta device, on both backends.

"auto" is the default dispatch (on the CPU: the patch-embed extension, the reference elsewhere);
"torch" runs the reference of every op. The op-level cases are in tests/test_patch_embed.py.
"""
import contextlib
import warnings

import pytest
import torch

import vit_kernels as vk

BACKENDS = ["auto", "torch"]


def grads_are_zero(model):
    return {name: p.grad is not None and p.grad.shape == p.shape and not p.grad.any()
            for name, p in model.named_parameters()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_forward_and_backward(backend):
    # A batch of 0 (a filtered batch with nothing left): logits (0, num_classes), features
    # (0, 197, 192), and every gradient zero and of its parameter's shape.
    model = vk.create_model("vit_tiny_patch16_224")
    images = torch.randn(0, 3, 224, 224, requires_grad=True)
    with vk.use_backend(backend):
        assert model.forward_features(images).shape == (0, 197, 192)
        logits = model(images)
        assert logits.shape == (0, model.num_classes)
        logits.sum().backward()
    assert images.grad.shape == images.shape
    assert all(grads_are_zero(model).values()), grads_are_zero(model)


# dynamic_img_size flattens NHWC patch tokens in _pos_embed (the unfused path); "map" pools
# with attention on a latent expanded to the batch; registers without a class token pool "avg";
# drop_path in training draws one factor per sample.
@pytest.mark.parametrize("overrides", [dict(dynamic_img_size=True), dict(global_pool="map"),
                                       dict(reg_tokens=4, class_token=False, global_pool="avg"),
                                       dict(drop_path_rate=0.1, init_values=1e-5)],
                         ids=["dynamic_img_size", "map", "registers_avg", "drop_path_layer_scale"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_model_variants(backend, overrides):
    model = vk.create_model("vit_tiny_patch16_224", img_size=32, depth=2, **overrides).train()
    images = torch.randn(0, 3, 32, 32, requires_grad=True)
    with vk.use_backend(backend):
        logits = model(images)
        logits.sum().backward()
    assert logits.shape == (0, model.num_classes) and images.grad.shape == images.shape
    assert all(grads_are_zero(model).values()), grads_are_zero(model)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_intermediates(backend):
    # NCHW intermediates unflatten the patch tokens to the (2, 2) grid of a 32 x 32 image.
    model = vk.create_model("vit_tiny_patch16_224", img_size=32, depth=2)
    with vk.use_backend(backend):
        final, intermediates = model.forward_intermediates(torch.randn(0, 3, 32, 32), indices=2)
    assert final.shape == (0, 5, 192)
    assert [t.shape for t in intermediates] == [(0, 192, 2, 2)] * 2


@pytest.fixture
def meta_quietly():
    # The extension has no meta kernel; patch_embed warns once and runs the reference there.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*has no meta kernel", category=RuntimeWarning)
        yield


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["to_meta", "default_device"])
def test_meta_device_forward_and_backward(backend, how, meta_quietly):
    # How models are sized and initialised without memory: .to("meta"), or built under
    # torch.device("meta"). No op may ask about autocast on "meta" (torch raises for it).
    default_device = torch.device("meta") if how == "default_device" else contextlib.nullcontext()
    with vk.use_backend(backend), default_device:
        model = vk.create_model("vit_tiny_patch16_224")
        if how == "to_meta":
            model = model.to("meta")
        logits = model(torch.empty(2, 3, 224, 224, device="meta"))
        logits.sum().backward()
    assert logits.device.type == "meta" and logits.shape == (2, 1000)
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_optimize_timm_model_on_meta(backend, meta_quietly):
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        ref = timm.create_model("vit_tiny_patch16_224")
    with vk.use_backend(backend):
        model = vk.optimize(ref)
        logits = model(torch.empty(2, 3, 224, 224, device="meta"))
    assert logits.device.type == "meta" and logits.shape == (2, 1000)
