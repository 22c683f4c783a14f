"""Patch embedding: image -> normalised patches -> projection + bias + position embedding + prefix tokens.

The forward runs the C++/CUDA extension (csrc/, op ``vit_kernels::patch_embed``, loaded by
``vit_kernels._extension``) or, under backend "torch" or when the extension is unavailable,
the reference. ``pad=True`` is timm's ``dynamic_img_pad``: the image is padded right/bottom
to a multiple of the patch with zeros *after* normalisation (timm pads the model input).

Backward (PyTorch ops, registered with ``register_autograd``), with g (B, T, D) the output
grad, gp = g[:, P:] its patch rows, X (B*L, K) the normalised patch matrix, W = weight.view(D, K):
    d bias = gp.sum(0, 1)            d prefix = g[:, :P].sum(0)       d pos = g.sum(0) (or gp.sum(0))
    d W = gp^T X                      d X = gp W  -> folded back to the (padded) image, cropped: dxn
    xn = (x * u - mean) / std with u = 1/255 for uint8:  d x = dxn * u / std,
    d mean = -sum(dxn) / std,  d std = -sum(dxn * xn) / std   (sums over batch, height, width).
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .. import _extension, backend, reference

IMAGE_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64)
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def extension_choice(device: torch.device | str) -> tuple[str, str]:
    """("extension" | "torch", why) for patch_embed on ``device`` (loads the extension if needed)."""
    device = torch.device(device)
    reason = backend.reference_reason()
    if reason is not None:
        return "torch", reason
    if not _extension_ready():
        return "torch", f"PyTorch reference: the extension is unavailable ({_extension.status()[1]})"
    if not _extension.has_kernel(device.type):
        return "torch", f"PyTorch reference: the extension has no {device.type} kernel ({_extension.status()[1]})"
    return "extension", f"C++/CUDA extension, {_extension.status()[1]}"


def _grid(images: torch.Tensor, weight: torch.Tensor, pad: bool) -> tuple[int, int]:
    (H, W), (ph, pw) = images.shape[-2:], weight.shape[-2:]
    if not pad and (H % ph or W % pw):
        raise ValueError(f"image size {(H, W)} must be divisible by the patch size {(ph, pw)}; "
                         "or pad=True pads right/bottom")
    return -(-H // ph), -(-W // pw)


def _check(images, weight, bias, pos_embed, prefix_tokens, mean, std, pad) -> tuple[int, int]:
    """The checks of csrc/patch_embed.cpp with the same messages; returns (P, L)."""
    if images.dim() != 4:
        raise ValueError(f"images must have shape (B, C, H, W); got {tuple(images.shape)}")
    if images.dtype not in IMAGE_DTYPES:
        raise ValueError(f"images must be uint8, float16, bfloat16, float32 (or float64); got {images.dtype}")
    if weight.dim() != 4:
        raise ValueError(f"weight must have shape (D, C, ph, pw); got {tuple(weight.shape)}")
    if weight.dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight must be float16, bfloat16, float32 (or float64); got {weight.dtype}")
    C, D = images.shape[1], weight.shape[0]
    if weight.shape[1] != C:
        raise ValueError(f"images have {C} channels; expected in_chans = {weight.shape[1]} "
                         f"(weight has shape {tuple(weight.shape)})")
    if 0 in (D, *weight.shape[-2:]):
        raise ValueError(f"weight must have shape (D, C, ph, pw) with D, ph, pw > 0; got {tuple(weight.shape)}")
    gh, gw = _grid(images, weight, pad)
    P, L = 0, gh * gw
    for name, t in (("weight", weight), ("bias", bias), ("pos_embed", pos_embed),
                    ("prefix_tokens", prefix_tokens), ("mean", mean), ("std", std)):
        if t is not None and t.device != images.device:
            raise ValueError(f"{name} must be on the images' device {images.device}; got {t.device}")
        if t is not None and name in ("bias", "pos_embed", "prefix_tokens") and t.dtype != weight.dtype:
            raise ValueError(f"{name} must have the weight's dtype {weight.dtype}; got {t.dtype}")
    if prefix_tokens is not None:
        if prefix_tokens.dim() != 3 or prefix_tokens.shape[0] != 1 or prefix_tokens.shape[2] != D:
            raise ValueError(f"prefix_tokens must have shape (1, P, D = {D}); got {tuple(prefix_tokens.shape)}")
        P = prefix_tokens.shape[1]
    if bias is not None and tuple(bias.shape) != (D,):
        raise ValueError(f"bias must have shape (D,) = ({D},); got {tuple(bias.shape)}")
    if pos_embed is not None and (pos_embed.dim() != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[2] != D
                                  or pos_embed.shape[1] not in (P + L, L)):
        raise ValueError(f"pos_embed must have shape (1, P + L, D) = (1, {P + L}, {D}) or (1, L, D) = (1, {L}, {D}) "
                         f"for {P} prefix tokens and a {gh} x {gw} patch grid; got {tuple(pos_embed.shape)}")
    if (mean is None) != (std is None):
        raise ValueError("mean and std must be given together")
    for name, t in (("mean", mean), ("std", std)):
        if t is not None and not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor; got {t.dtype}")
        if t is not None and t.numel() != C:
            raise ValueError(f"{name} must have C = {C} elements (one per channel); got shape {tuple(t.shape)}")
    return P, L


def _channel_vector(name: str, value, images: torch.Tensor) -> Optional[torch.Tensor]:
    """mean or std as given: a tensor, or a sequence (timm's ``IMAGENET_DEFAULT_MEAN``) made float32
    on the images' device. A zero in a sequence std is rejected here (a tensor std: ``_check_std``)."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a tensor or a sequence of floats, one per channel; got {value!r}") from e
    if name == "std" and 0.0 in values:
        raise ValueError(f"std must be non-zero in every channel; channel {values.index(0.0)} is 0")
    return torch.tensor(values, dtype=torch.float32, device=images.device)


def _check_std(std: Optional[torch.Tensor]) -> None:
    """As csrc/patch_embed.cpp: a zero in a CPU std is a ValueError; a CUDA std is not read (that
    would sync the device on every call), nor one being traced by torch.compile."""
    if std is None or std.device.type != "cpu" or torch.compiler.is_compiling():
        return
    zeros = (std.reshape(-1) == 0).nonzero()
    if len(zeros):
        raise ValueError(f"std must be non-zero in every channel; channel {int(zeros[0])} is 0")


def _normalised(images, mean, std, dtype) -> torch.Tensor:
    """The float image the projection sees (before padding), as the reference computes it."""
    x = images.to(dtype)
    if images.dtype == torch.uint8:
        x = x / 255
    if mean is not None:
        x = (x - mean.to(x).reshape(1, -1, 1, 1)) / std.to(x).reshape(1, -1, 1, 1)
    return x


def _padded(x: torch.Tensor, gh: int, gw: int, ph: int, pw: int) -> torch.Tensor:
    return F.pad(x, (0, gw * pw - x.shape[-1], 0, gh * ph - x.shape[-2]))


def _reference(images, weight, bias, pos_embed, prefix_tokens, mean, std, pad) -> torch.Tensor:
    _check_std(std)
    gh, gw = _grid(images, weight, pad)
    if (gh * weight.shape[-2], gw * weight.shape[-1]) != tuple(images.shape[-2:]):
        images = _padded(_normalised(images, mean, std, weight.dtype), gh, gw, *weight.shape[-2:])
        mean = std = None
    return reference.patch_embed(images, weight, bias, pos_embed, prefix_tokens, mean, std)


@backend.traceable
def patch_embed(images: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                pos_embed: Optional[torch.Tensor] = None, prefix_tokens: Optional[torch.Tensor] = None,
                mean: Union[torch.Tensor, Sequence[float], None] = None,
                std: Union[torch.Tensor, Sequence[float], None] = None, *, pad: bool = False) -> torch.Tensor:
    """(B, C, H, W) uint8 or float images -> (B, P + L, D) tokens in the weight's dtype.

    See ``reference.patch_embed``; ``pad=True`` pads right/bottom to whole patches (timm's
    ``dynamic_img_pad``) with zeros after normalisation. ``mean``/``std`` are tensors or
    sequences of C floats (see ``_channel_vector``).
    """
    mean, std = _channel_vector("mean", mean, images), _channel_vector("std", std, images)
    _check(images, weight, bias, pos_embed, prefix_tokens, mean, std, pad)
    if backend.reference_reason() is None and _use_extension(images.device.type):
        return torch.ops.vit_kernels.patch_embed.default(images, weight, bias, pos_embed, prefix_tokens,
                                                         mean, std, pad)
    return _reference(images, weight, bias, pos_embed, prefix_tokens, mean, std, pad)


def _fake(images, weight, bias=None, pos_embed=None, prefix_tokens=None, mean=None, std=None, pad=False):
    P, L = _check(images, weight, bias, pos_embed, prefix_tokens, mean, std, pad)
    return weight.new_empty((images.shape[0], P + L, weight.shape[0]))


def _setup_context(ctx, inputs, output) -> None:
    images, weight, bias, pos_embed, prefix_tokens, mean, std, pad = inputs
    ctx.save_for_backward(images, weight, mean, std)
    ctx.num_prefix = 0 if prefix_tokens is None else prefix_tokens.shape[1]
    ctx.pos_len = None if pos_embed is None else pos_embed.shape[1]
    ctx.pad = pad


def _backward(ctx, grad: torch.Tensor):
    images, weight, mean, std = ctx.saved_tensors
    (B, C, H, W), (D, _, ph, pw), P = images.shape, weight.shape, ctx.num_prefix
    gh, gw = _grid(images, weight, ctx.pad)
    # The dispatcher drops trailing arguments equal to their defaults, and their flags with them.
    needs = tuple(ctx.needs_input_grad) + (False,) * 8
    g_patch = grad[:, P:].reshape(B * gh * gw, D)
    d_images = d_weight = d_bias = d_pos = d_prefix = d_mean = d_std = None
    if needs[2]:
        d_bias = g_patch.sum(0)
    if needs[3]:
        d_pos = grad.sum(0, keepdim=True) if ctx.pos_len == grad.shape[1] else grad[:, P:].sum(0, keepdim=True)
    if needs[4]:
        d_prefix = grad[:, :P].sum(0, keepdim=True)
    if needs[1] or needs[6]:
        xn = _normalised(images, mean, std, weight.dtype)
    if needs[1]:
        patches = _padded(xn, gh, gw, ph, pw).reshape(B, C, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5)
        d_weight = (g_patch.t() @ patches.reshape(B * gh * gw, C * ph * pw)).reshape(weight.shape)
    if needs[0] or needs[5] or needs[6]:
        d_xn = (g_patch @ weight.reshape(D, -1)).reshape(B, gh, gw, C, ph, pw).permute(0, 3, 1, 4, 2, 5)
        d_xn = d_xn.reshape(B, C, gh * ph, gw * pw)[:, :, :H, :W]
        inv_std = None if std is None else 1 / std.to(torch.float64).reshape(C)
        if needs[0]:
            d_images = (d_xn if std is None else d_xn / std.to(d_xn).reshape(1, C, 1, 1)).to(images.dtype)
        # mean and std get a C-vector each from sums over the batch and image: float64 sums, scaled
        # after summing, keep them as accurate as PyTorch's own (mean and std are usually constants).
        if needs[5]:
            d_mean = (-d_xn.sum((0, 2, 3), dtype=torch.float64) * inv_std).reshape(mean.shape).to(mean.dtype)
        if needs[6]:
            d_std = (-(d_xn * xn).sum((0, 2, 3), dtype=torch.float64) * inv_std).reshape(std.shape).to(std.dtype)
    return d_images, d_weight, d_bias, d_pos, d_prefix, d_mean, d_std, None


_python_parts_registered = False
# device type -> whether the extension runs it: the loader runs once per device type.
_extension_for: dict[str, bool] = {}


# torch.compile runs this when it traces (the loader's lock and build cannot be traced, and a
# fullgraph compile may be the first call in a process) and keeps the answer as a constant.
@torch.compiler.assume_constant_result
def _use_extension(device_type: str) -> bool:
    ok = _extension_for.get(device_type)
    if ok is None:
        ok = _extension_for[device_type] = _extension_ready() and _extension.has_kernel(device_type)
        if _extension.status()[0] and not ok:  # e.g. a CPU-only JIT build on a machine without nvcc
            warnings.warn(f"vit_kernels: the patch-embed extension has no {device_type} kernel, patch_embed runs "
                          f"the PyTorch reference there ({_extension.status()[1]})", RuntimeWarning, stacklevel=3)
    return ok


def _extension_ready() -> bool:
    """Loads the extension (once) and registers its fake and autograd; False if it is unavailable."""
    global _python_parts_registered
    if not _extension.load():
        return False
    if not _python_parts_registered:
        torch.library.register_fake(_extension.OP, _fake)
        torch.library.register_autograd(_extension.OP, _backward, setup_context=_setup_context)
        _python_parts_registered = True
    return True
