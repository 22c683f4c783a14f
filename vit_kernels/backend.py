"""Which implementation runs an op: the Triton kernels or the PyTorch reference.

``auto`` (the default) runs the kernels on CUDA tensors and the reference elsewhere;
``triton`` runs the kernels everywhere, which on a CPU needs the Triton interpreter
(``TRITON_INTERPRET=1`` set before ``vit_kernels`` is imported); ``torch`` runs the reference
everywhere. The environment variable ``VIT_KERNELS_BACKEND`` sets the default.

``set_backend`` changes the process-wide default; ``use_backend`` overrides it for the thread
that enters the block (threads started inside do not inherit it), so one thread's override
never changes what another runs. A thread-local and not a ContextVar: torch 2.11's dynamo
cannot trace ``ContextVar.get`` (a graph break in every op), and it guards on a thread-local's
attribute like on a global, so a compiled model recompiles when the choice changes.

The patch-embed op has a third implementation, the C++/CUDA extension: its dispatch lives
in ``ops/patch_embed.py`` and only reads the backend chosen here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import os
import threading
from typing import Any, Callable, Iterator, Optional

import torch

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "VIT_KERNELS_BACKEND"
# The dtypes the kernels take. Every op runs float64 (and float32 dots on a GPU, see
# float32_dots_on_kernels) in the PyTorch reference, whatever the backend.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _checked(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {name!r}")
    return name


def _from_environment() -> str:
    name = os.environ.get(ENV_VAR, "auto")
    if name not in BACKENDS:
        raise ValueError(f"environment variable {ENV_VAR}={name!r}: expected one of {BACKENDS} "
                         f"(or leave it unset for 'auto')")
    return name


_default = _from_environment()
_overrides = threading.local()  # .backend: the innermost use_backend of this thread, or None


def get_backend() -> str:
    """The backend ops run with in this thread: its ``use_backend`` override, else the default."""
    return getattr(_overrides, "backend", None) or _default


def set_backend(name: str) -> None:
    """Choose the process-wide default implementation: "auto", "triton" or "torch"."""
    global _default
    _default = _checked(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed code, in this thread, with another backend; then restore the previous one."""
    previous = getattr(_overrides, "backend", None)
    _overrides.backend = _checked(name)
    try:
        yield
    finally:
        _overrides.backend = previous


# Triton reads TRITON_INTERPRET when a kernel is defined, i.e. when vit_kernels is imported:
# read it once, here, so that every decision agrees with the kernels that exist.
_INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_enabled() -> bool:
    """Whether the kernels run in the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRETER


def refuse_bfloat16_dots(op: str, dtype: torch.dtype) -> None:
    """Raise for a bfloat16 kernel whose dots would run in the interpreter, which computes them
    wrongly (results around 1e10, triton 3.6 and 3.8) instead of returning garbage."""
    if dtype == torch.bfloat16 and _INTERPRETER:
        raise RuntimeError(
            f"{op}: bfloat16 on the Triton interpreter (TRITON_INTERPRET=1) is not supported: the "
            "interpreter does not compute bfloat16 dot products correctly. Use float16 or float32 there, "
            "or the PyTorch reference (vk.use_backend('torch'))")


def float32_dots_on_kernels() -> bool:
    """Whether float32 GEMMs and attention run the Triton kernels: only in the interpreter.

    Compiled for sm_90 a float32 dot is either TF32 or FFMA, and the compile report
    (benchmarks/results/static/) shows those kernels spilling (kilobytes of stack for FFMA on
    triton 3.6, most attention backward configs even with TF32): on a GPU float32 runs PyTorch
    (cuBLAS, SDPA), as fast as float32 gets there. The interpreter computes float32 dots exactly,
    so it keeps testing the kernels' float32 path on a CPU."""
    return interpreter_enabled()


def dot_precision(dtype: torch.dtype) -> str:
    """The ``input_precision`` of the kernels' dots: "ieee" for float32 when PyTorch's own float32
    matmuls may not use TF32 (``torch.get_float32_matmul_precision() == "highest"``, the default),
    else "tf32" (Triton's default, which 16-bit operands ignore). One rule for every op."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


# Looked up once: torch.compile cannot trace importlib (a graph break in every op under fullgraph).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_installed() -> bool:
    return _TRITON_INSTALLED


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch as the host code made it: the kernel (a JITFunction or the Autotuner
    around one), its grid, and its arguments exactly as passed."""
    kernel: Any
    grid: Any
    args: tuple
    kwargs: dict


# The open recordings, innermost last: a plain list, since torch 2.11's dynamo cannot trace a
# ContextVar read (kernel_choice runs inside every compiled op).
_recordings: list[list[Launch]] = []


@contextlib.contextmanager
def record_launches() -> Iterator[list[Launch]]:
    """Inside, every op takes its kernel path and its launches are appended to the yielded list
    instead of run: the op bodies can then run on meta tensors of any size. This is how the
    compile report learns what the host code launches, and how an op's fake implementation
    runs the body without launching."""
    launches: list[Launch] = []
    _recordings.append(launches)
    try:
        yield launches
    finally:
        _recordings.pop()


class _Recorder:
    def __init__(self, kernel, launches: list[Launch]):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(Launch(self.kernel, grid, args, kwargs))
        return launch


def launcher(kernel):
    """What an op launches a Triton kernel through: ``kernel[grid](*args)`` on it launches.

    torch.library's ``wrap_triton``, so that torch.compile sees the launch; the kernel itself
    when it runs in the interpreter (nothing compiled to trace there, and torch 2.11's
    ``wrap_triton`` refuses an interpreted kernel); a recorder inside ``record_launches``."""
    if _recordings:
        return _Recorder(kernel, _recordings[-1])
    from torch.library import wrap_triton
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    fn = kernel
    while not isinstance(fn, (JITFunction, InterpretedFunction)) and hasattr(fn, "fn"):
        fn = fn.fn  # an Autotuner or Heuristics around the jitted function
    if isinstance(fn, InterpretedFunction):
        return kernel
    # Device-side TMA descriptors (the GEMM's) live in global scratch memory that Triton asks its
    # allocator for at launch. The allocator is a ContextVar, unset in every new thread: set it
    # before each launch (cheap), from PyTorch's caching allocator. Compiled graphs bring their own.
    import triton
    triton.set_allocator(_scratch)
    return wrap_triton(kernel)


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    # The caching allocator's blocks are 512-byte aligned, more than TMA's 128.
    return torch.empty(size, dtype=torch.int8, device="cuda")


def kernel_op(name: str, fn: Optional[Callable] = None, *, schema: Optional[str] = None,
              backward: Optional[Callable] = None, setup_context: Optional[Callable] = None):
    """Register ``fn``, whose body launches kernels through ``launcher``, as the op ``name``, with
    ``backward``/``setup_context`` as its autograd formula when given; returns the op, called like
    ``fn`` (``@kernel_op(name, ...)`` as a decorator). Every Triton op registers through this.

    Compiled kernels: ``triton_op``, so torch.compile sees the launches inside (its fake
    implementation is ``fn`` itself, launches traced by ``wrap_triton``). Under the interpreter
    the launch is a plain Python call that a traced graph would silently drop, so the op stays
    opaque (``custom_op``) and its fake implementation runs ``fn`` with the launches recorded
    and discarded: the same body gives the output shapes either way.
    """
    from torch.library import custom_op, triton_op

    if fn is None:
        return lambda fn: kernel_op(name, fn, schema=schema, backward=backward, setup_context=setup_context)
    if interpreter_enabled():
        op = custom_op(name, fn, mutates_args=(), schema=schema)

        @op.register_fake
        def _fake(*args, **kwargs):
            if _recordings:  # already recording (the compile report): keep the launches
                return fn(*args, **kwargs)
            with record_launches():
                return fn(*args, **kwargs)
    else:
        op = triton_op(name, fn, mutates_args=(), schema=schema)
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)
    return op


def traceable(fn: Callable) -> Callable:
    """``fn`` (a public op, or a check of its inputs) as one node of an FX graph.

    torch.fx.symbolic_trace, torchvision's create_feature_extractor and timm's FX tools pass
    proxies, not tensors; they arrive through ``__torch_function__``, as in torch.nn.functional's
    functions, so ``fn``'s Python checks and dispatch run when the graph runs, on tensors.
    """
    @functools.wraps(fn)
    def op(*args, **kwargs):
        args_and_kwargs = (*args, *kwargs.values())
        if torch.overrides.has_torch_function(args_and_kwargs):
            tensors = tuple(a for a in args_and_kwargs if torch.overrides.is_tensor_like(a)
                            or isinstance(a, torch.fx.Proxy))
            return torch.overrides.handle_torch_function(op, tensors, *args, **kwargs)
        return fn(*args, **kwargs)
    return op


def refuse_double_backward(op: str) -> None:
    """Raise in a kernel op's backward when autograd is recording it (``create_graph=True``):
    the backward kernels have no derivatives of their own, and an untracked result would be a
    silently wrong second derivative."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"vit_kernels.ops.{op}: double backward (create_graph=True, e.g. a gradient penalty) is not "
            "supported by the kernels; run that computation under vk.use_backend('torch')")


def reference_reason() -> Optional[str]:
    """Why every op runs its PyTorch reference now, or None: backend "torch", or an ONNX export
    (either exporter), whose graph must be standard ONNX ops; Triton kernels and the C++/CUDA
    extension have no ONNX form, and onnxruntime could not run them."""
    if get_backend() == "torch":
        return "backend 'torch' selected"
    if torch.onnx.is_in_onnx_export():
        return "an ONNX export records the PyTorch reference (standard ONNX ops)"
    return None


def kernel_choice(device: torch.device | str) -> tuple[str, str]:
    """("triton" | "torch", why) for a tensor on ``device`` under the current backend."""
    device = torch.device(device)
    current = get_backend()
    reason = reference_reason()
    if reason is not None:
        return "torch", reason
    if _recordings:
        return "triton", "launches recorded, not run (compile report)"
    if not triton_installed():
        reason = "triton is not installed"
        if current == "triton":
            raise RuntimeError(f"backend 'triton' selected but {reason}")
        return "torch", reason
    if device.type == "cuda":
        return "triton", f"backend {current!r} on a CUDA tensor"
    if current == "auto":
        return "torch", f"backend 'auto' on a {device.type} tensor (the kernels need CUDA)"
    if _INTERPRETER:
        return "triton", "backend 'triton' through the Triton interpreter (TRITON_INTERPRET=1)"
    late = os.environ.get("TRITON_INTERPRET", "0") == "1"
    raise RuntimeError(
        f"backend 'triton' selected for a {device.type} tensor, but the kernels need a CUDA tensor "
        "or the Triton interpreter: " + (
            "TRITON_INTERPRET=1 was set after vit_kernels was imported, when the kernels had already been "
            "defined for a GPU; set it before the import (in the shell, or before `import vit_kernels`)"
            if late else "set TRITON_INTERPRET=1 before importing vit_kernels"))


def runs_kernels(op: str, t: torch.Tensor, *, dots: bool) -> bool:
    """Whether ``op`` on ``t`` runs its Triton kernels; the one rule every op dispatches by.

    The backend's choice (raises if 'triton' cannot run) for a non-empty tensor of a kernel dtype:
    float64 and empty tensors run the reference. For ops with dot products (``dots``), float32
    runs the reference outside the interpreter (``float32_dots_on_kernels``) and bfloat16 is
    refused in it (``refuse_bfloat16_dots``)."""
    if t.dtype not in KERNEL_DTYPES or t.numel() == 0 or kernel_choice(t.device)[0] != "triton":
        return False
    if dots and t.dtype == torch.float32 and not float32_dots_on_kernels():
        return False
    if dots:
        refuse_bfloat16_dots(op, t.dtype)
    return True


def implementation(kernel: str, device: torch.device | str) -> tuple[str, str]:
    """("triton" | "torch" | "unavailable", why) for an op whose kernel path runs ``kernel`` (a
    description, e.g. "Triton flash attention"), on ``device`` under the current backend."""
    try:
        impl, why = kernel_choice(device)
    except RuntimeError as error:
        return "unavailable", str(error)
    if impl == "triton":
        return "triton", f"{kernel}; {why}"
    return "torch", f"PyTorch reference; {why}"
