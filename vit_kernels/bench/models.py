"""The model benchmarks: vit_kernels against timm with the same weights, eager and compiled.

Train is forward + backward of sum(output * g) for a fixed random g, with gradients zeroed per step;
the optimizer step is left out (it is the same for every provider).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..vision_transformer import MODEL_CONFIGS, create_model
from .case import Case

MODELS = ("vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224", "vit_base_patch14_reg4_dinov2")
MODEL_MODES = ("inference", "train")
QUICK_MODEL_MODES = ("inference",)


@dataclass(frozen=True)
class ModelProvider:
    model: str                          # which model of the ModelPair runs: "timm" or "vk"
    compile: bool = False               # torch.compile'd (only when compile is on)
    compile_mode: Optional[str] = None
    cuda_graph: bool = False            # one captured inference forward (CUDA, batch <= CUDA_GRAPH_MAX_BATCH)


MODEL_PROVIDERS = {
    "timm": ModelProvider("timm"),
    "vk": ModelProvider("vk"),
    "timm+compile": ModelProvider("timm", compile=True),
    "timm+compile-max-autotune": ModelProvider("timm", compile=True, compile_mode="max-autotune"),
    "vk+compile": ModelProvider("vk", compile=True),
    "timm+cudagraph": ModelProvider("timm", cuda_graph=True),
    "vk+cudagraph": ModelProvider("vk", cuda_graph=True),
}
FULL_BATCHES = (1, 8, 32, 64, 128, 256, 512)
# Above this batch the float32 reference of a training step would not fit: train rows there are
# checked against the baseline in the same dtype instead (with twice the tolerance floor).
TRAIN_REFERENCE_MAX_BATCH = 64
CUDA_GRAPH_MAX_BATCH = 32


def valid_models() -> list[str]:
    return sorted(MODEL_CONFIGS)


def batches_for(device: torch.device, quick: bool) -> tuple:
    if device.type != "cuda":
        return (4,)
    return (64,) if quick else FULL_BATCHES


# Per image; N tokens, C width, depth blocks, L patches, patch p.
MODEL_FORMULA = "inference  depth * (24*N*C^2 + 4*N^2*C) + 2*L*C*3p^2 flop;  train = 3x inference (forward + backward)"


def model_flops(model, batch: int, mode: str) -> float:
    N = model.patch_embed.num_patches + model.num_prefix_tokens
    C, depth = model.embed_dim, len(model.blocks)
    p = model.patch_embed.patch_size[0]
    per_image = depth * (24 * N * C * C + 4 * N * N * C) + 2 * model.patch_embed.num_patches * C * 3 * p * p
    return batch * per_image * (3 if mode == "train" else 1)


def _cuda_graph(model, example: torch.Tensor):
    """Capture one inference forward on a static input; calls copy their images into it (a cost a user pays too)."""
    static_in = example.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(2):
            model(static_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out = model(static_in)

    def run(images):
        static_in.copy_(images)
        graph.replay()
        return static_out
    return run


class ModelPair:
    """timm's model and ours in ``dtype`` with the same weights, plus a float32 reference copy."""

    def __init__(self, name: str, device: torch.device, dtype: torch.dtype, **overrides):
        import timm
        self.name, self.device, self.dtype = name, device, dtype
        self.reference = timm.create_model(name, pretrained=False, **overrides).to(device, torch.float32)
        self.timm = self.reference if dtype == torch.float32 else \
            timm.create_model(name, pretrained=False, **overrides).to(device, dtype)
        self.timm.load_state_dict(self.reference.state_dict())
        self.vk = create_model(name, **overrides).to(device, dtype)
        self.vk.load_state_dict(self.reference.state_dict())
        self.compiled: dict = {}

    def module(self, provider: str) -> torch.nn.Module:
        return getattr(self, MODEL_PROVIDERS[provider].model)

    def provider_models(self, compile_: bool, cuda_graphs: bool = False) -> dict:
        """provider -> what it calls; ``cuda_graphs``: the CUDA-graph providers too (captured lazily,
        at the first call, so only rows that run pay for the capture)."""
        models = {}
        for key, how in MODEL_PROVIDERS.items():
            if how.compile and compile_:
                # dynamic=False: each batch size gets its own static graph, as a deployed model would.
                if key not in self.compiled:
                    self.compiled[key] = torch.compile(self.module(key), mode=how.compile_mode, dynamic=False)
                models[key] = self.compiled[key]
            elif how.cuda_graph and cuda_graphs:
                models[key] = _LazyGraph(self.module(key))
            elif not (how.compile or how.cuda_graph):
                models[key] = self.module(key)
        return models


def _inference_call(model, module, images):
    module.eval()

    def call():
        with torch.no_grad():
            return (model(images),)
    return call


def _train_call(model, module, images, g):
    module.train()
    params = [p for _, p in sorted(module.named_parameters())]

    def call():
        module.zero_grad(set_to_none=True)
        out = model(images)
        (out.float() * g).sum().backward()
        return (out,) + tuple(p.grad for p in params)
    return call


def model_cases(name: str, device: torch.device, dtype: torch.dtype, modes, batches, compile_: bool,
                cuda_graphs: bool, pair: ModelPair) -> list[Case]:
    cases = []
    cfg = pair.vk
    img = cfg.patch_embed.img_size
    for mode in modes:
        for batch in batches:
            graphs = cuda_graphs and mode == "inference" and device.type == "cuda" and batch <= CUDA_GRAPH_MAX_BATCH
            models = pair.provider_models(compile_, graphs)

            def make_set(batch=batch):
                images = torch.randn(batch, 3, *img, device=device, dtype=dtype)
                g = torch.randn(batch, cfg.num_classes or cfg.embed_dim, device=device)
                return images, g

            def factory(model, key, mode=mode):
                if mode == "inference":
                    return lambda s: _inference_call(model, pair.module(key), s[0])
                return lambda s: _train_call(model, pair.module(key), s[0], s[1])

            factories = {key: factory(m, key) for key, m in models.items()}
            use_ref = mode == "inference" or batch <= TRAIN_REFERENCE_MAX_BATCH
            reference = _reference(pair, mode) if use_ref else None
            cases.append(Case("model", name, mode, f"B={batch} img={img[0]}", dtype, device, factories, "timm",
                              make_set, reference, model_flops(cfg, batch, mode), 0.0,
                              MODEL_FORMULA, items=batch, input_sets=2))
    return cases


def _reference(pair: ModelPair, mode: str):
    def run(input_set):
        images, g = input_set
        x = images.float()
        if mode == "inference":
            return _inference_call(pair.reference, pair.reference, x)()
        return _train_call(pair.reference, pair.reference, x, g)()
    return run


class _LazyGraph:
    def __init__(self, module):
        self.module, self.run = module, None

    def __call__(self, images):
        if self.run is None:
            self.run = _cuda_graph(self.module, images)
        return self.run(images)
