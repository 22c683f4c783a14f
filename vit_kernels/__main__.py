"""Command line: python -m vit_kernels {info,bench,compile-report}, --version."""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from . import __version__, backend, ops
from . import bench as harness

# The Plan fields whose option is not --<field>, for naming the option in an error.
_OPTIONS = {"batches": "--batch-sizes"}


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except Exception as error:  # an absent or broken package is what info reports
        return f"not available ({type(error).__name__})"


def _commit() -> str:
    """The git commit of the package's source (with "+ local changes" when the tree differs), or why not."""
    source = Path(__file__).resolve().parent.parent
    try:
        def git(*args):
            return subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        if Path(git("rev-parse", "--show-toplevel")).resolve() != source:
            return "unknown (the package is not in a git checkout of its own)"
        changed = git("status", "--porcelain", "--untracked-files=no", "--", "vit_kernels", "csrc")
        return git("rev-parse", "--short=12", "HEAD") + (" + local changes" if changed else "")
    except (OSError, subprocess.SubprocessError) as error:
        return f"unknown ({type(error).__name__})"


def info(_args) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"vit_kernels {__version__} (commit {_commit()})")
    print(f"python   {platform.python_version()}")
    for module in ("torch", "triton", "timm"):
        print(f"{module:<8} {_version(module)}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    print(f"device   {device} ({name})")
    print(f"backend  {backend.get_backend()} (set with vk.set_backend or {backend.ENV_VAR})")
    for op in harness.OPS:
        impl, why = ops.implementation(op, device)
        print(f"  {op:<15} {impl:<10} {why}")
    return 0


def _names(text):
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers; got {text!r}") from None


def bench(args, parser: argparse.ArgumentParser) -> int:
    plan = harness.Plan(ops=_names(args.ops), models=_names(args.models), dtypes=_names(args.dtypes),
                        modes=_names(args.modes), providers=_names(args.providers), batches=args.batch_sizes or None,
                        quick=args.quick, compile=args.compile, cuda_graphs=not args.no_cuda_graphs,
                        device=args.device, out=args.out, plots=not args.no_plots)
    if args.ops is not None and args.models is None:
        plan.models = []
    if args.models is not None and args.ops is None:
        plan.ops = []
    try:
        rows, _ = harness.run(plan)
    except harness.PlanError as error:  # raised before anything ran: a usage error
        parser.error(f"argument {_OPTIONS.get(error.field, '--' + error.field)}: {error}")
    except harness.ResultsNotSaved as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 1 if any(r.get("status") in ("mismatch", "error") for r in rows) else 0


def compile_report(args) -> int:
    from . import backend
    if backend.interpreter_enabled():
        print("error: compile-report compiles for sm_90; unset TRITON_INTERPRET (the interpreter replaces "
              "the compiled kernels and their autotune configs)", file=sys.stderr)
        return 2
    from .compile_report import launches, report
    precisions = tuple(launches.PRECISIONS) if args.full else launches.GATE_PRECISIONS
    result = report.build(precisions, all_configs=args.full, workers=args.jobs, kernels=_names(args.kernels),
                          log=lambda text: print(text, file=sys.stderr))
    command = "python -m vit_kernels compile-report" + (" --full" if args.full else "") + \
        (f" --kernels {args.kernels}" if args.kernels else "")
    markdown = report.to_markdown(result, command)
    if args.json:
        with open(args.json, "w") as f:
            f.write(report.to_json(result))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown)
    else:
        print(markdown)
    failures = result.failures()
    print(f"compile-report: {len(result.rows)} rows, {len(failures)} violations in kept configs",
          file=sys.stderr)
    for failure in failures:
        print(f"  {failure['kernel']} [{failure['variant']}] {failure['config']}: "
              f"{'; '.join(failure['violations'])}", file=sys.stderr)
    return 1 if args.check and failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vit_kernels", description=__doc__)
    parser.add_argument("--version", action="version", version=f"vit_kernels {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, device, and which implementation each op uses here")
    bench_parser = commands.add_parser(
        "bench", help="time every op and model: vit_kernels against timm, SDPA and torch.compile",
        description="Checks every provider against a high-precision reference, then times the ones that agree. "
                    "Rows are upserted into DIR/results.csv; a JSON of the run and PNG plots go beside it.")
    bench_parser.add_argument("--ops", help=f"comma-separated; default all: {', '.join(harness.OPS)} ('' for none)")
    bench_parser.add_argument("--models", help="comma-separated timm names; default vit_base_patch16_224 on a CPU "
                              "or with --quick, else vit_small/base/large_patch16_224 and vit_base_patch14_reg4_dinov2")
    bench_parser.add_argument("--dtypes", help="comma-separated: float32, float16, bfloat16 (or fp32, fp16, bf16); "
                              "default bfloat16 on CUDA, float32 on CPU")
    bench_parser.add_argument("--modes", help=f"comma-separated: {', '.join(harness.OP_MODES)} (ops), "
                                                  f"{', '.join(harness.MODEL_MODES)} (models)")
    bench_parser.add_argument("--providers", help="comma-separated provider names to keep (e.g. vk,timm+compile); "
                              "the baseline always runs")
    bench_parser.add_argument("--batch-sizes", type=_ints, help="model batch sweep, comma-separated; default 1..512 on CUDA, 4 on CPU")
    bench_parser.add_argument("--quick", action="store_true", help="one shape per op, one model, one batch: 1-2 minutes")
    compile_group = bench_parser.add_mutually_exclusive_group()
    compile_group.add_argument("--compile", dest="compile", action="store_true", default=None,
                               help="include torch.compile providers (default: on CUDA without --quick)")
    compile_group.add_argument("--no-compile", dest="compile", action="store_false")
    bench_parser.add_argument("--no-cuda-graphs", action="store_true", help="skip the CUDA-graph model providers")
    bench_parser.add_argument("--no-plots", action="store_true")
    bench_parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    bench_parser.add_argument("--out", default=None, metavar="DIR", help="default: benchmarks/results/<device>")
    report_parser = commands.add_parser(
        "compile-report", help="compile every Triton kernel for sm_90 (no GPU needed) and report "
                               "registers, spills, shared memory, tensor-core use",
        description="Every kernel x launch variant the host code makes x autotune config, compiled for sm_90 "
                    "exactly as a launch on an H100 would specialise it. The gate (default) covers bf16, "
                    "float16 and float32 and the configs the autotuner may pick; --full adds float32 with TF32 "
                    "and the pruned configs.")
    report_parser.add_argument("--full", action="store_true", help="every precision and every config")
    report_parser.add_argument("--json", metavar="PATH", help="write every row as JSON")
    report_parser.add_argument("--markdown", metavar="PATH", help="write the tables here instead of stdout")
    report_parser.add_argument("--check", action="store_true",
                               help="exit 1 if a kept config fails to compile, spills, needs more than 227 KB "
                                    "of shared memory or runs a 16-bit/TF32 dot without wgmma (HGMMA)")
    report_parser.add_argument("--kernels", help="comma-separated substrings of kernel names to keep")
    report_parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: cores)")
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench(args, bench_parser)
    return {"info": info, "compile-report": compile_report}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
