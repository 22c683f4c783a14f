#!/usr/bin/env bash
# The GPU run, one part per call so that each fits the 10-minute limit of a lent machine:
#   bash benchmarks/run_gpu.sh quick | ops | models-base | models-other | pytest
# Results are upserted into benchmarks/results/<device>/ (CSV, run JSON, plots); with $OUT set
# they are also copied there so that they come back from the device machine.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install -e . failed; using PYTHONPATH" >&2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
part="${1:-quick}"
bench() { python -m vit_kernels bench "$@"; }
case "$part" in
  quick)           python -m vit_kernels info; bench --quick ;;
  ops)             # one op per call: bash benchmarks/run_gpu.sh ops attention
                   bench --ops "${2:?name an op}" --models '' --dtypes bf16 ;;
  ops-fp16)        bench --models '' --dtypes fp16,fp32 --modes fwd --no-compile ;;
  models-base)     # The baselines other issues measure against: ViT-B/16 bf16 at batch 256, eager and compiled.
                   bench --ops '' --models vit_base_patch16_224 --batch-sizes 1,8,32,256 \
                     --providers timm,vk,timm+compile,vk+compile,timm+cudagraph,vk+cudagraph ;;
  models-autotune) bench --ops '' --models vit_base_patch16_224 --batch-sizes 256 --modes inference \
                     --providers timm,timm+compile-max-autotune ;;
  models-other)    bench --ops '' --models vit_small_patch16_224,vit_large_patch16_224,vit_base_patch14_reg4_dinov2 \
                     --batch-sizes 32,256 --no-compile ;;
  pytest)          python -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider ;;
  *) echo "unknown part $part; valid: quick, ops OP, ops-fp16, models-base, models-autotune, models-other, pytest" >&2
     exit 2 ;;
esac
if [[ -n "${OUT:-}" ]]; then cp -r benchmarks/results "$OUT/"; fi
