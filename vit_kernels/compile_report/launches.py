"""The kernel launches the host code makes, learnt by running it on meta tensors.

Every scenario runs real vit_kernels code (a model's forward and backward, or a public op)
inside ``backend.record_launches()`` on the meta device: no memory, no GPU, and the
launches come out with the exact arguments a GPU run would pass (dtypes, shapes, strides,
storage offsets of packed views, constexpr flags). Nothing here restates what the ops launch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Callable, Iterator

import torch

from .. import backend, ops
from ..bench.models import FULL_BATCHES, MODEL_MODES
from ..vision_transformer import create_model

META = torch.device("meta")
TRAIN_BATCH = 256
INFERENCE_BATCHES = (1, 32, 256)


@dataclasses.dataclass(frozen=True)
class Precision:
    """An operand dtype and, for float32, whether PyTorch's matmuls may use TF32."""
    name: str
    dtype: torch.dtype
    tf32: bool = False


PRECISIONS = {p.name: p for p in (
    Precision("bf16", torch.bfloat16),
    Precision("fp16", torch.float16),
    Precision("fp32-tf32", torch.float32, tf32=True),
    Precision("fp32", torch.float32),
)}
# float32 launches no dot kernel outside the interpreter (backend.float32_dots_on_kernels), so
# TF32 changes nothing: the gate leaves it to the full report. fp16 stays in: its conversions
# differ from bf16's, and at the register limit that decides whether a tile spills.
GATE_PRECISIONS = ("bf16", "fp16", "fp32")


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str                      # what a user runs, e.g. "ViT-B/16 train b256"
    run: Callable[[torch.dtype], None]


@dataclasses.dataclass(frozen=True)
class Recorded:
    scenario: str
    precision: str
    launch: backend.Launch


@contextlib.contextmanager
def _precision(precision: Precision) -> Iterator[None]:
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if precision.tf32 else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _backward(output: torch.Tensor) -> None:
    # A dense gradient, as a loss gives; ``output.sum().backward()`` would send an expanded
    # (stride 0) one, which no training step does and which specialises differently.
    output.backward(torch.empty_like(output))


def _model_run(name: str, mode: str, batch: int, **overrides) -> Callable[[torch.dtype], None]:
    def run(dtype: torch.dtype) -> None:
        with META:
            model = create_model(name, **overrides).to(dtype)
        images = torch.empty(batch, 3, *model.patch_embed.img_size, device=META, dtype=dtype)
        if mode == "train":
            model.train()
            _backward(model(images))
        else:
            model.eval()
            with torch.no_grad():
                model(images)
    return run


def _models() -> list[Scenario]:
    """Real ViTs: ViT-S/B/L/H (C 384 to 1280, head dims 64 and 80), lengths 197, 257, 577 and 1025,
    and the towers whose blocks differ (DINOv2's LayerScale, CLIP's QuickGELU, SigLIP's tanh GELU)."""
    models = [
        ("ViT-S/16", "vit_small_patch16_224", {}),
        ("ViT-B/16", "vit_base_patch16_224", {}),
        ("ViT-L/16", "vit_large_patch16_224", {}),
        ("ViT-H/14", "vit_huge_patch14_224", {}),
        ("ViT-B/16 at 384 (N 577)", "vit_base_patch16_224", dict(img_size=384)),
        ("ViT-L/16 at 512 (N 1025)", "vit_large_patch16_224", dict(img_size=512)),
        ("DINOv2 ViT-B/14 reg4", "vit_base_patch14_reg4_dinov2", {}),
        ("CLIP ViT-B/16", "vit_base_patch16_clip_224", dict(act_layer="quick_gelu")),
        ("SigLIP ViT-B/16", "vit_base_patch16_siglip_224", dict(act_layer="gelu_tanh")),
    ]
    scenarios = []
    for label, name, overrides in models:
        scenarios.append(Scenario(f"{label} train b{TRAIN_BATCH}", _model_run(name, "train", TRAIN_BATCH, **overrides)))
        for batch in INFERENCE_BATCHES:
            scenarios.append(Scenario(f"{label} inference b{batch}", _model_run(name, "inference", batch, **overrides)))
    # Training features the plain models leave off.
    features = [
        ("qk-norm", dict(qk_norm=True)),
        ("attention dropout", dict(attn_drop_rate=0.1)),
        ("qk-norm + attention dropout", dict(qk_norm=True, attn_drop_rate=0.1)),
        ("LayerScale + DropPath", dict(init_values=1e-5, drop_path_rate=0.1)),
    ]
    for label, overrides in features:
        scenarios.append(Scenario(f"ViT-B/16 train b{TRAIN_BATCH}, {label}",
                                  _model_run("vit_base_patch16_224", "train", TRAIN_BATCH, **overrides)))
    return scenarios


def _vit_b_mlp(op: str, recompute: bool) -> Callable[[torch.dtype], None]:
    """ViT-B's MLP at batch 256 as ``linear_gelu`` (fc1 alone, as an Mlp with dropout or a norm
    inside runs it) or as ``mlp``, keeping or recomputing the pre-activation."""
    def run(dtype: torch.dtype) -> None:
        def param(*shape):
            return torch.empty(*shape, device=META, dtype=dtype, requires_grad=True)
        x, w1, b1, w2, b2 = param(TRAIN_BATCH * 197, 768), param(3072, 768), param(3072), param(768, 3072), param(768)
        if op == "mlp":
            _backward(ops.mlp(x, w1, b1, w2, b2, recompute=recompute))
        else:
            _backward(ops.linear_gelu(x, w1, b1, recompute=recompute))
    return run


# (B, H, N, D) of the attention shapes counted for work and traffic: ViT-B/16 and ViT-H/14 at
# batch 256, and the widest head the kernel takes.
ATTENTION_SHAPES = ((TRAIN_BATCH, 12, 197, 64), (TRAIN_BATCH, 16, 257, 80), (TRAIN_BATCH, 6, 197, 128))


def attention_scenario_name(shape: tuple) -> str:
    return "attention(q, k, v) fwd+bwd, (B, H, N, D) = ({}, {}, {}, {}) contiguous".format(*shape)


def _attention_bhnd(shape: tuple) -> Callable[[torch.dtype], None]:
    """``vk.ops.attention`` on (B, H, N, D) tensors laid out as SDPA users hold them."""
    def run(dtype: torch.dtype) -> None:
        q, k, v = (torch.empty(*shape, device=META, dtype=dtype, requires_grad=True) for _ in range(3))
        _backward(ops.attention(q, k, v))
    return run


def _qkv_attention(head_dim: int, qk_norm: bool, dropout_p: float) -> Callable[[torch.dtype], None]:
    """``vk.ops.qkv_attention`` at batch 256, N 197, on a packed projection with 12 heads of ``head_dim``:
    the head dims no model scenario runs with qk-norm or dropout."""
    def run(dtype: torch.dtype) -> None:
        qkv = torch.empty(TRAIN_BATCH, 197, 3 * 12 * head_dim, device=META, dtype=dtype, requires_grad=True)
        norms = [torch.nn.LayerNorm(head_dim, device=META, dtype=dtype) if qk_norm else None for _ in range(2)]
        _backward(ops.qkv_attention(qkv, 12, dropout_p=dropout_p, q_norm=norms[0], k_norm=norms[1]))
    return run


def _ops() -> list[Scenario]:
    features = [("", False, 0.0), (", qk-norm", True, 0.0), (", attention dropout", False, 0.1),
                (", qk-norm + attention dropout", True, 0.1)]
    return [Scenario(f"{op}(recompute={recompute}) fwd+bwd, ViT-B", _vit_b_mlp(op, recompute))
            for op in ("linear_gelu", "mlp") for recompute in (False, True)] + \
        [Scenario(attention_scenario_name(shape), _attention_bhnd(shape)) for shape in ATTENTION_SHAPES] + \
        [Scenario(f"qkv_attention fwd+bwd, head dim {d}{label}", _qkv_attention(d, qk_norm, p))
         for d in (80, 128) for label, qk_norm, p in features]


def scenarios() -> list[Scenario]:
    return _models() + _ops()


def benchmark_scenarios(model: str = "vit_base_patch16_224") -> list[Scenario]:
    """What ``python -m vit_kernels bench --models MODEL`` runs on a GPU: every mode at every batch."""
    return [Scenario(f"{model} {mode} b{batch}", _model_run(model, mode, batch))
            for mode in MODEL_MODES for batch in FULL_BATCHES]


def record(scenario_list: list[Scenario], precisions: tuple[str, ...]) -> list[Recorded]:
    """Every launch each scenario makes in each precision, in order."""
    recorded = []
    for precision_name in precisions:
        precision = PRECISIONS[precision_name]
        for scenario in scenario_list:
            with warnings.catch_warnings(), _precision(precision), backend.use_backend("triton"), \
                    backend.record_launches() as launches:
                # The patch-embed extension has no meta kernel and says so; its reference runs instead.
                warnings.simplefilter("ignore", RuntimeWarning)
                scenario.run(precision.dtype)
            recorded += [Recorded(scenario.name, precision_name, launch) for launch in launches]
    return recorded
