"""optimize(model) on the Triton kernels (the interpreter on a CPU): a tiny model, forward and backward.

Whichever ops have a kernel run it; the rest run the reference. Compared with the unfused timm
model on PyTorch's own ops, so tolerances allow for a different summation order in fp32.
"""

import pytest
import torch



import vit_kernels as vk

timm = pytest.importorskip("timm")
pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# 16 patches + a class token = 17 tokens (a partial tile), head dim 32; LayerScale and DropPath
# so both are folded into the fused adds.
TINY = dict(img_size=32, patch_size=8, embed_dim=64, num_heads=2, depth=2, num_classes=10,
            init_values=0.1, drop_path_rate=0.2)


def _pair():
    ref = timm.models.vision_transformer.VisionTransformer(**TINY).to(DEVICE)
    model = timm.models.vision_transformer.VisionTransformer(**TINY).to(DEVICE)
    model.load_state_dict(ref.state_dict())
    with vk.use_backend("triton"):
        vk.optimize(model)
    return model, ref


def test_triton_backend_forward_backward():
    model, ref = _pair()
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    with vk.use_backend("triton"):
        # At least the attention kernel has landed: the test runs kernels, not only the reference.
        assert vk.ops.implementation("attention", DEVICE)[0] == "triton"
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), ref.eval()(x), atol=1e-4, rtol=1e-4)
        model.train(), ref.train()
        torch.manual_seed(5)
        out = model(x)
        out.square().mean().backward()
    torch.manual_seed(5)
    expected = ref(x)
    expected.square().mean().backward()
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    theirs = dict(ref.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, theirs[name].grad, atol=1e-4, rtol=1e-3,
                                   msg=lambda m: f"{name}: {m}")


def test_triton_backend_training_steps():
    # A few optimizer steps on the kernels: the loss goes down and matches the unfused model's.
    model, ref = _pair()
    x = torch.randn(8, 3, 32, 32, device=DEVICE)
    y = torch.randint(0, 10, (8,), device=DEVICE)
    losses = {}
    for name, m in (("fused", model), ("ref", ref)):
        optimizer = torch.optim.AdamW(m.parameters(), lr=1e-2)
        torch.manual_seed(7)
        losses[name] = []
        with vk.use_backend("triton" if name == "fused" else "torch"):
            for _ in range(4):
                loss = torch.nn.functional.cross_entropy(m(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses[name].append(loss.item())
    assert losses["fused"][-1] < losses["fused"][0]
    torch.testing.assert_close(torch.tensor(losses["fused"]), torch.tensor(losses["ref"]), atol=1e-3, rtol=1e-3)
