"""vit_kernels: Vision Transformers for PyTorch on hand-written Triton and CUDA kernels."""
from . import layers, ops
from .backend import get_backend, set_backend, use_backend
from .convert import optimize, restore
from .vision_transformer import VisionTransformer, create_model, list_models

__version__ = "0.1.0"

__all__ = ["ops", "layers", "VisionTransformer", "create_model", "list_models",
           "get_backend", "set_backend", "use_backend", "optimize", "restore"]
