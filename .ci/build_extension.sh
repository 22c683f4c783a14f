#!/usr/bin/env bash
# CI step for the C++/CUDA patch-embed extension (csrc/), on a 2-core machine without a GPU:
#   1. JIT-build the CPU extension exactly as the package does on first use (into the cache the
#      tests then use), and fail if it does not load or disagrees with the reference;
#   2. compile the CUDA sources for sm_90 with nvcc (compile only: nothing can run them here),
#      so a CUDA compile error turns CI red.
# Usage: .ci/build_extension.sh [python]   (default: python); CUDA_HOME defaults to /usr/local/cuda.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-python}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}

echo "== CPU extension (JIT, cache: ${TORCH_EXTENSIONS_DIR:-~/.cache/torch_extensions})"
time PYTHONPATH=. "$PYTHON" - <<'PY'
import warnings
warnings.simplefilter("error")  # the fallback warning means the build failed: fail here, with the reason
from vit_kernels import _extension
assert _extension.load(), _extension.status()
assert _extension.has_kernel("cpu")
print(_extension.status()[1])
import torch, vit_kernels as vk
from vit_kernels import reference
images, weight = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), torch.randn(8, 3, 16, 16) / 28
torch.testing.assert_close(vk.ops.patch_embed(images, weight), reference.patch_embed(images, weight),
                           atol=1e-4, rtol=1e-4)
PY

echo "== CUDA sources (nvcc, sm_90, compile only)"
NVCC="$CUDA_HOME/bin/nvcc"
if [[ ! -x "$NVCC" ]]; then
  echo "no nvcc at $NVCC: set CUDA_HOME to a CUDA toolkit" >&2
  exit 1
fi
mapfile -t INCLUDES < <("$PYTHON" -c "
from torch.utils import cpp_extension
import sysconfig
try:
    paths = cpp_extension.include_paths(device_type='cuda')
except TypeError:  # torch < 2.6 spells it cuda=True
    paths = cpp_extension.include_paths(cuda=True)
for p in paths + [sysconfig.get_paths()['include']]:
    print(p)")
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
INC_FLAGS=()
for p in "${INCLUDES[@]}"; do INC_FLAGS+=(-isystem "$p"); done
# The flags torch's CUDAExtension passes (half/bf16 operators off, the C++ standard).
time "$NVCC" -c csrc/cuda/patch_embed_cuda.cu -o "$OUT/patch_embed_cuda.o" "${INC_FLAGS[@]}" \
  -gencode arch=compute_90,code=sm_90 -O3 -std=c++20 --expt-relaxed-constexpr \
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
  -D__CUDA_NO_HALF2_OPERATORS__ -DTORCH_EXTENSION_NAME=vit_kernels_C -DTORCH_API_INCLUDE_EXTENSION_H \
  -Xcompiler -fPIC
echo "CUDA sources compiled for sm_90"
