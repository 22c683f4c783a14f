"""A real training run: a small ViT on scikit-learn's 8x8 digits, optimized vs the unfused timm model.

Same init, same batches, same dropout draws: the loss curves must track each other and the
optimized model must reach >= 95% held-out accuracy. Reference backend (about a minute on CPU).
"""
import pytest
import torch

import vit_kernels as vk

timm = pytest.importorskip("timm")
datasets = pytest.importorskip("sklearn.datasets")

EPOCHS = 40
BATCH = 32
LR = 3e-3


def digits():
    """(train_x, train_y, test_x, test_y): 1797 8x8 images, 1 channel, standardised; a fixed 80/20 split."""
    data = datasets.load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    split = int(0.8 * len(y))
    return x[:split], y[:split], x[split:], y[split:]


def small_vit():
    # Patch 2 -> 16 tokens + a class token; LayerScale and DropPath so the fused adds fold both.
    return timm.models.vision_transformer.VisionTransformer(
        img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=3, num_heads=4,
        mlp_ratio=2.0, init_values=0.1, drop_path_rate=0.05)


def train(model, data, epochs=EPOCHS, steps=None):
    """Per-step training losses and the held-out accuracy."""
    train_x, train_y, test_x, test_y = data
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, pct_start=0.15,
                                                   total_steps=epochs * -(-len(train_y) // BATCH))
    generator = torch.Generator().manual_seed(1)
    torch.manual_seed(2)  # DropPath's draws
    losses = []
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(train_y), generator=generator).split(BATCH):
            loss = torch.nn.functional.cross_entropy(model(train_x[idx]), train_y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            if steps is not None and len(losses) == steps:
                return losses, None
    model.eval()
    with torch.no_grad():
        accuracy = (model(test_x).argmax(-1) == test_y).float().mean().item()
    return losses, accuracy


def test_digits_training_tracks_reference():
    data = digits()
    torch.manual_seed(0)
    ref = small_vit()
    model = small_vit()
    model.load_state_dict(ref.state_dict())
    vk.optimize(model)
    # One thread: this model is far too small to gain from two, and with other jobs on the
    # machine OpenMP's spinning threads made the run up to 20x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with vk.use_backend("torch"):
            losses, accuracy = train(model, data)
            ref_losses, ref_accuracy = train(ref, data)
    finally:
        torch.set_num_threads(threads)

    losses, ref_losses = torch.tensor(losses), torch.tensor(ref_losses)
    # The first steps differ only by rounding; later, rounding differences compound, so compare
    # the curves epoch by epoch.
    torch.testing.assert_close(losses[:10], ref_losses[:10], rtol=1e-4, atol=1e-4)
    steps = len(losses) // EPOCHS
    per_epoch = losses[:steps * EPOCHS].reshape(EPOCHS, steps).mean(1)
    ref_per_epoch = ref_losses[:steps * EPOCHS].reshape(EPOCHS, steps).mean(1)
    assert (per_epoch - ref_per_epoch).abs().max() < 0.05 + 0.1 * ref_per_epoch.max(), (per_epoch, ref_per_epoch)
    assert per_epoch[-1] < 0.25 * per_epoch[0]
    assert accuracy >= 0.95, accuracy
    assert abs(accuracy - ref_accuracy) <= 0.02, (accuracy, ref_accuracy)
