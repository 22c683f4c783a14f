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


def _names(text):
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def bench(args) -> int:
    from . import bench as harness
    plan = harness.Plan(ops=_names(args.ops), models=_names(args.models), dtypes=_names(args.dtypes),
                        modes=_names(args.modes), providers=_names(args.providers), batches=[int(b) for b in _names(args.batch_sizes)] if args.batch_sizes
                        else None, quick=args.quick, compile=args.compile, cuda_graphs=not args.no_cuda_graphs,
                        device=args.device, out=args.out, plots=not args.no_plots)
    if args.ops is not None and args.models is None:
        plan.models = []
    if args.models is not None and args.ops is None:
        plan.ops = []
    try:
        rows, _ = harness.run(plan)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 1 if any(r.get("status") in ("mismatch", "error") for r in rows) else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vit_kernels", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, device, and which implementation each op uses here")
    bench_parser = commands.add_parser(
        "bench", help="time every op and model: vit_kernels against timm, SDPA and torch.compile",
        description="Checks every provider against a high-precision reference, then times the ones that agree. "
                    "Rows are upserted into DIR/results.csv; a JSON of the run and PNG plots go beside it.")
    bench_parser.add_argument("--ops", help="comma-separated; default all: " + ", ".join(OPS) + " ('' for none)")
    bench_parser.add_argument("--models", help="comma-separated timm names; default vit_base_patch16_224 on a CPU "
                              "or with --quick, else vit_small/base/large_patch16_224 and vit_base_patch14_reg4_dinov2")
    bench_parser.add_argument("--dtypes", help="comma-separated: float32, float16, bfloat16 (or fp32, fp16, bf16); "
                              "default bfloat16 on CUDA, float32 on CPU")
    bench_parser.add_argument("--modes", help="comma-separated: fwd, bwd, fwd+bwd (ops), inference, train (models)")
    bench_parser.add_argument("--providers", help="comma-separated provider names to keep (e.g. vk,timm+compile); "
                              "the baseline always runs")
    bench_parser.add_argument("--batch-sizes", help="model batch sweep, comma-separated; default 1..512 on CUDA, 4 on CPU")
    bench_parser.add_argument("--quick", action="store_true", help="one shape per op, one model, one batch: 1-2 minutes")
    compile_group = bench_parser.add_mutually_exclusive_group()
    compile_group.add_argument("--compile", dest="compile", action="store_true", default=None,
                               help="include torch.compile providers (default: on CUDA without --quick)")
    compile_group.add_argument("--no-compile", dest="compile", action="store_false")
    bench_parser.add_argument("--no-cuda-graphs", action="store_true", help="skip the CUDA-graph model providers")
    bench_parser.add_argument("--no-plots", action="store_true")
    bench_parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    bench_parser.add_argument("--out", default=None, metavar="DIR", help="default: benchmarks/results/<device>")
    args = parser.parse_args(argv)
    return {"info": info, "bench": bench}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
