"""Compile one kernel launch for sm_90 with no GPU, as a real launch would, and read the cubin.

Specialisation is Triton's own: the JIT function's binder (the code ``kernel[grid](...)`` runs)
is built for an sm_90 backend and fed the recorded arguments, so 16-byte aligned pointers,
integers divisible by 16 and integers equal to 1 are marked exactly as at launch. Without
those attributes the software pipeliner gives up silently (one shared-memory stage, no
cp.async), so a wrong guess here would report a different kernel from the one that runs.

The cubin is read with the ``cuobjdump`` shipped in the triton wheel: registers and stack
(spill) bytes from the resource usage, the rest from the SASS. Shared memory is Triton's
dynamic allocation (``metadata.shared``); cuobjdump's SHARED column holds only static memory.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import re
import subprocess
import tempfile
from typing import Any, Optional

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner, Config
from triton.runtime.jit import JITFunction

TARGET = GPUTarget("cuda", 90, 32)
# Hopper per SM: 64 warps, 64K registers, 228 KB of shared memory of which one block may
# take 227 KB, 1 KB reserved per resident block, at most 32 blocks.
SM_WARPS, SM_REGISTERS, SM_SHARED, BLOCK_SHARED_MAX, BLOCK_RESERVED_SHARED, SM_BLOCKS = \
    64, 65536, 228 * 1024, 227 * 1024, 1024, 32


def jit_function(kernel) -> JITFunction:
    """The JITFunction under an Autotuner (or Heuristics) wrapper."""
    fn = kernel
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


def kernel_name(kernel) -> str:
    fn = jit_function(kernel)
    return f"{fn.fn.__module__}.{fn.fn.__name__}"


def configs(kernel) -> list[Optional[Config]]:
    """The autotuner's configs, or [None] for a kernel launched with fixed meta-parameters."""
    return list(kernel.configs) if isinstance(kernel, Autotuner) else [None]


def kept_configs(kernel, args: tuple, kwargs: dict) -> list[Optional[Config]]:
    """The configs the autotuner offers for this launch: its early_config_prune applied."""
    if not isinstance(kernel, Autotuner):
        return [None]
    prune = kernel.early_config_prune
    if prune is None:
        return list(kernel.configs)
    return list(prune(kernel.configs, dict(zip(kernel.arg_names, args)), **kwargs))


def autotune_key(kernel, args: tuple, kwargs: dict) -> Optional[tuple]:
    """The autotuner's cache key for this launch (its key arguments and every tensor's dtype), as Triton forms it."""
    if not isinstance(kernel, Autotuner):
        return None
    named = {**dict(zip(kernel.arg_names, args)), **kwargs}
    return tuple([named[k] for k in kernel.keys if k in named]
                 + [str(v.dtype) for v in named.values() if hasattr(v, "dtype")])


@dataclasses.dataclass(frozen=True)
class Job:
    """One compilation: everything ``triton.compile`` needs, picklable for a worker process."""
    module: str
    name: str
    signature: tuple
    constexprs: tuple
    attrs: tuple
    options: tuple

    def key(self) -> tuple:
        return dataclasses.astuple(self)


@functools.lru_cache(maxsize=None)
def _backend():
    return make_backend(TARGET)


@functools.lru_cache(maxsize=None)
def _binder(fn: JITFunction):
    from triton.runtime.jit import create_function_from_signature
    return create_function_from_signature(fn.signature, fn.params, _backend())


def specialise(kernel, args: tuple, kwargs: dict, config: Optional[Config]) -> Job:
    """The compilation ``kernel[grid](*args, **kwargs)`` would trigger on an H100 with ``config``."""
    from triton import knobs

    fn = jit_function(kernel)
    kwargs = {**kwargs, **(config.all_kwargs() if config is not None else {})}
    # As JITFunction.run fills them in before binding.
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, specialization, options = _binder(fn)(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(_backend(), kwargs, bound, specialization, options)
    return Job(fn.fn.__module__, fn.fn.__name__, tuple(signature.items()), tuple(sorted(constexprs.items())),
               tuple(sorted((path, tuple(map(tuple, attr))) for path, attr in attrs.items())),
               tuple(sorted(options.__dict__.items())))


def _cuobjdump(*args: str) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return subprocess.run([tool, *args], check=True, capture_output=True, text=True).stdout


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)([.A-Z0-9_]*)(.*?);")
_BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")
MATRIX_OPS = ("HGMMA", "HMMA", "FFMA")
LOAD_OPS = ("UTMALDG", "LDGSTS", "LDG")


def read_sass(sass: str) -> dict:
    """Instruction counts of interest and the main loop: the innermost loop (backward branch)
    with the most tensor-core instructions, or the longest loop in a kernel without them."""
    instructions = [(int(m.group(1), 16), m.group(2), m.group(4)) for m in _SASS_LINE.finditer(sass)]
    counts: dict[str, int] = {}
    for _, op, _ in instructions:
        counts[op] = counts.get(op, 0) + 1
    loops = []
    for address, op, operands in instructions:
        target = _BRANCH_TARGET.search(operands) if op == "BRA" else None
        if target and int(target.group(1), 16) < address:  # not the trap loop (a BRA to itself) after EXIT
            start = int(target.group(1), 16)
            body = [o for a, o, _ in instructions if start <= a <= address]
            loops.append((sum(o in ("HGMMA", "HMMA") for o in body), -len(body), len(body)))
    main_loop = max(loops)[2] if loops else None
    return dict(counts={op: counts.get(op, 0) for op in MATRIX_OPS + LOAD_OPS + ("LDL", "STL")},
                instructions=len(instructions), main_loop=main_loop)



def _dots(ttir: str) -> list[tuple[str, str]]:
    """(operand element type, input precision) of every tt.dot; precision is absent when default (tf32)."""
    dots = []
    for line in ttir.splitlines():
        if "tt.dot " in line:
            precision = re.search(r"inputPrecision\s*=\s*(\w+)", line)
            operand = re.search(r":\s*tensor<[0-9x]+x(\w+)", line)
            dots.append((operand.group(1) if operand else "?", precision.group(1) if precision else "tf32"))
    return dots


def ctas_per_sm(num_warps: int, registers: int, shared: int) -> int:
    """Resident blocks per SM allowed by warps, registers (allocated per warp in 256s) and shared memory."""
    regs_per_warp = -(-registers * 32 // 256) * 256
    limits = [SM_WARPS // num_warps, SM_BLOCKS, SM_SHARED // (shared + BLOCK_RESERVED_SHARED)]
    if regs_per_warp:
        limits.append(SM_REGISTERS // (regs_per_warp * num_warps))
    return max(0, min(limits))


def compile_job(job: Job) -> dict[str, Any]:
    """Compile ``job`` for sm_90 and read the result; the error text instead if it does not compile."""
    fn = jit_function(getattr(importlib.import_module(job.module), job.name))
    options = dict(job.options)
    try:
        attrs = {path: [list(a) for a in attr] for path, attr in job.attrs}
        compiled = triton.compile(ASTSource(fn, dict(job.signature), dict(job.constexprs), attrs),
                                  target=TARGET, options=options)
    except Exception as error:  # a config that does not compile is a result, reported per row
        message = str(error).strip().splitlines()
        return dict(error=f"{type(error).__name__}: {message[-1] if message else ''}"[:300])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = _cuobjdump("--dump-resource-usage", path)
        sass = read_sass(_cuobjdump("--dump-sass", path))
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    shared = int(compiled.metadata.shared)
    return dict(error=None, registers=registers, stack=stack, shared=shared,
                local_loads=sass["counts"]["LDL"], local_stores=sass["counts"]["STL"],
                matrix={op: sass["counts"][op] for op in MATRIX_OPS},
                loads={op: sass["counts"][op] for op in LOAD_OPS},
                instructions=sass["instructions"], main_loop=sass["main_loop"],
                dots=_dots(compiled.asm["ttir"]),
                ctas_per_sm=ctas_per_sm(options["num_warps"], registers, shared))
