"""Builds the C++/CUDA patch-embed extension (csrc/) as vit_kernels._C when torch is importable.

Under pip's default build isolation torch is not importable here, so nothing is compiled and
the package JIT-compiles the same sources on first use (vit_kernels/_extension.py). With
``pip install --no-build-isolation -e .`` (the GPU machines) this builds it: a CUDAExtension
when a CUDA toolkit is found (``CUDA_HOME``/bin/nvcc) and torch has CUDA, else a CppExtension.
``TORCH_CUDA_ARCH_LIST`` defaults to 9.0 (H100/H200); ``VIT_KERNELS_BUILD_EXTENSION=0`` skips it.
"""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

CPU_SOURCES = ["csrc/patch_embed.cpp", "csrc/patch_embed_cpu.cpp"]
CUDA_SOURCES = ["csrc/cuda/patch_embed_cuda.cu"]


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package as vit_kernels/csrc, so a wheel without a built
    extension can still compile it on first use."""

    def run(self):
        super().run()
        self.copy_tree("csrc", os.path.join(self.build_lib, "vit_kernels", "csrc"))


def extension_kwargs() -> dict:
    if os.environ.get("VIT_KERNELS_BUILD_EXTENSION", "1") == "0":
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # build isolation: compiled on first use instead
        return {}
    cuda_home = cpp_extension.CUDA_HOME
    if torch.version.cuda and cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        ext = cpp_extension.CUDAExtension("vit_kernels._C", CPU_SOURCES + CUDA_SOURCES,
                                          extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})
    else:
        ext = cpp_extension.CppExtension("vit_kernels._C", CPU_SOURCES, extra_compile_args=["-O3"])
    return {"ext_modules": [ext], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


kwargs = extension_kwargs()
kwargs["cmdclass"] = {"build_py": BuildPyWithSources, **kwargs.get("cmdclass", {})}
setup(**kwargs)
