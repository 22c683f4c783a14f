"""Loads the C++/CUDA patch-embed extension (csrc/) on first use.

Two ways in, same sources: ``setup.py`` builds the module ``vit_kernels._C`` when torch is
importable at build time (``pip install --no-build-isolation``); otherwise the first
``load()`` compiles csrc/ with ``torch.utils.cpp_extension.load`` into a cache
(``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``; the CPU part takes about
half a minute on 2 cores, once). The CUDA kernel is compiled only when a CUDA device and
toolkit are there. ``VIT_KERNELS_EXTENSION=0`` skips the extension.

A failed build never breaks ``import vit_kernels``: ``load()`` returns False, warns once with
the reason, the op falls back to the PyTorch reference, and ``status()`` says why.
"""
from __future__ import annotations

import importlib
import os
import threading
import warnings
from pathlib import Path

import torch

OP = "vit_kernels::patch_embed"
ENV_VAR = "VIT_KERNELS_EXTENSION"
# A wheel ships the sources in the package; a source checkout (editable install) has them beside it.
_HERE = Path(__file__).resolve().parent
CSRC = next((p for p in (_HERE / "csrc", _HERE.parent / "csrc") if p.is_dir()), _HERE.parent / "csrc")
CPU_SOURCES = ("patch_embed.cpp", "patch_embed_cpu.cpp")
CUDA_SOURCES = ("cuda/patch_embed_cuda.cu",)

_lock = threading.Lock()
_loaded: bool | None = None  # None: not tried yet
_detail = "not loaded yet (loads on the first patch_embed call)"


def _registered(key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(OP, key)
    except RuntimeError:  # the op is not defined at all
        return False


def _jit_build() -> str:
    from torch.utils import cpp_extension

    if not CSRC.is_dir():
        raise RuntimeError(f"the extension sources are not at {CSRC} (install from a source checkout)")
    with_cuda = torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
    sources = [str(CSRC / s) for s in CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())]
    name = "vit_kernels_C_cuda" if with_cuda else "vit_kernels_C_cpu"
    cpp_extension.load(name=name, sources=sources, extra_cflags=["-O3"], extra_cuda_cflags=["-O3"],
                       is_python_module=False, verbose=os.environ.get("VIT_KERNELS_VERBOSE_BUILD") == "1")
    return f"JIT-compiled {name} into {cpp_extension._get_build_directory(name, verbose=False)}"


def _load_library() -> str:
    """Registers the op; returns how. Raises with the reason when neither way works."""
    try:
        importlib.import_module("vit_kernels._C")
        return "prebuilt module vit_kernels._C"
    except ImportError as e:
        prebuilt = e
    try:
        return _jit_build()
    except Exception as e:
        if isinstance(prebuilt, ModuleNotFoundError):
            raise
        raise RuntimeError(f"{e} (and the prebuilt vit_kernels._C failed to import: {prebuilt})") from e


def load() -> bool:
    """Loads the extension once; True when ``torch.ops.vit_kernels.patch_embed`` has a CPU kernel."""
    global _loaded, _detail
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        if os.environ.get(ENV_VAR, "1") == "0":
            _loaded, _detail = False, f"disabled by {ENV_VAR}=0"
            return False
        try:
            _detail = _load_library()
            if not _registered("CPU"):
                raise RuntimeError(f"the library loaded but {OP} has no CPU kernel")
            _loaded = True
        except Exception as e:  # a compiler error, a missing toolkit, an ABI mismatch: all mean "use the reference"
            reason = " ".join(f"{type(e).__name__}: {e}".split())
            _loaded, _detail = False, reason if len(reason) < 600 else reason[:600] + " ..."
            warnings.warn(f"vit_kernels: the patch-embed extension is unavailable, patch_embed runs the PyTorch "
                          f"reference ({_detail})", RuntimeWarning, stacklevel=2)
    return _loaded


def has_kernel(device_type: str) -> bool:
    """Whether the loaded extension has a kernel for ``device_type`` ("cpu", "cuda")."""
    return bool(_loaded) and _registered(device_type.upper())


def status() -> tuple[bool | None, str]:
    """(loaded: True / False / None if not tried yet, how or why not), for ``python -m vit_kernels info``."""
    if _loaded:
        kernels = [d for d in ("CPU", "CUDA") if has_kernel(d)]
        return True, f"{_detail} ({', '.join(kernels)} kernels)"
    return _loaded, _detail
