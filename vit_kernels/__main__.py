"""Command line: python -m vit_kernels {info,bench}."""
from __future__ import annotations

import argparse
import importlib
import platform
import sys

import torch

from . import backend

OPS = ("attention", "add_layer_norm", "linear_gelu", "patch_embed")


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except Exception as error:  # an absent or broken package is what info reports
        return f"not available ({type(error).__name__})"


def info(_args) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"python   {platform.python_version()}")
    for module in ("torch", "triton", "timm"):
        print(f"{module:<8} {_version(module)}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    print(f"device   {device} ({name})")
    print(f"backend  {backend.get_backend()} (set with vk.set_backend or {backend.ENV_VAR})")
    for op in OPS:
        module = importlib.import_module(f"vit_kernels.ops.{op}")
        try:
            impl, why = module.implementation(device)
        except RuntimeError as error:
            impl, why = "error", str(error)
        print(f"  {op:<15} {impl:<10} {why}")
    return 0


def bench(args) -> int:
    from .bench import compare_with_timm
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(args.dtype)
    results, max_diff, mean_diff = compare_with_timm(args.model, args.batch_size, dtype, args.device,
                                                     iters=args.iters)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"{args.model} on {device}, backend {backend.get_backend()}")
    for r in results:
        print(f"  {r.provider:<12} {r.images_per_s:10.1f} img/s   median {r.median_ms:9.2f} ms/batch")
    print(f"  speed-up vit_kernels / timm: {results[1].images_per_s / results[0].images_per_s:.2f}x")
    print(f"  logits vs timm: max |diff| {max_diff:.3e}, mean |diff| {mean_diff:.3e}")
    if device == "cpu":
        print("  (CPU: both run PyTorch code here; the GPU kernels were not timed)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vit_kernels", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, device, and which implementation each op uses here")
    bench_parser = commands.add_parser("bench", help="the default model: vit_kernels against timm")
    bench_parser.add_argument("--model", default="vit_base_patch16_224")
    bench_parser.add_argument("--batch-size", type=int, default=None, help="default: 64 on CUDA, 4 on CPU")
    bench_parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                              help="default: bfloat16 on CUDA, float32 on CPU")
    bench_parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    bench_parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args(argv)
    return {"info": info, "bench": bench}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
