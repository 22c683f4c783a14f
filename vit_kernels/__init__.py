"""vit_kernels: Vision Transformers for PyTorch on hand-written Triton and CUDA kernels."""
from . import ops
from .backend import get_backend, set_backend, use_backend

__version__ = "0.1.0"

__all__ = ["ops", "get_backend", "set_backend", "use_backend"]
