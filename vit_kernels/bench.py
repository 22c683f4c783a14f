"""The default benchmark: vit_kernels against timm on the same weights, on whatever device is here."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .vision_transformer import create_model


@dataclass
class ModelResult:
    provider: str
    images_per_s: float
    median_ms: float


def _time_forward(model, images: torch.Tensor, warmup: int, iters: int) -> float:
    """Median seconds of one forward pass (synchronised on CUDA)."""
    sync = torch.cuda.synchronize if images.is_cuda else (lambda: None)
    times = []
    with torch.inference_mode():
        for i in range(warmup + iters):
            sync()
            start = time.perf_counter()
            model(images)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def compare_with_timm(model_name: str = "vit_base_patch16_224", batch_size: int | None = None,
                      dtype: torch.dtype | None = None, device: str | None = None,
                      warmup: int = 1, iters: int = 3):
    """Build timm's model and ours with the same weights; return (results, max diff, mean diff)."""
    import timm

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    batch_size = batch_size or (64 if device.type == "cuda" else 4)
    ref = timm.create_model(model_name).to(device, dtype).eval()
    ours = create_model(model_name).to(device, dtype).eval()
    ours.load_state_dict(ref.state_dict())
    images = torch.randn(batch_size, ref.in_chans, *ref.patch_embed.img_size, device=device, dtype=dtype)
    with torch.inference_mode():
        expected, actual = ref(images).float(), ours(images).float()
    diff = (actual - expected).abs()
    results = []
    for provider, model in (("timm", ref), ("vit_kernels", ours)):
        seconds = _time_forward(model, images, warmup, iters)
        results.append(ModelResult(provider, batch_size / seconds, seconds * 1e3))
    return results, diff.max().item(), diff.mean().item()
