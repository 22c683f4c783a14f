// CUDA half of the patch-embed extension: the patchify kernel and the CUDA registration.
// The projection is the shared ATen GEMM (cuBLAS) of patch_embed.cpp.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "../patch_embed.h"

namespace vit_kernels {
namespace {

constexpr int kThreads = 256;

// Program `blockIdx.x` owns row `row` of the (B * T, K) patch matrix: zeros for a prefix token,
// else the normalised pixels of one patch in (c, i, j) order. Consecutive threads take
// consecutive k, so the writes are coalesced and, for NCHW images, so are the reads of each
// patch line; every pixel is read exactly once. Image offsets are 64-bit (a uint8 batch of
// 256 x 3 x 1024 x 1024 passes 2^31); in-row indices are 32-bit (K < 2^31 is checked).
template <typename in_t, typename out_t, typename acc_t>
__global__ void patchify_kernel(const in_t* __restrict__ img, out_t* __restrict__ patches,
                                const acc_t* __restrict__ mean, const acc_t* __restrict__ std, Geometry g,
                                int64_t sB, int64_t sC, int64_t sH, int64_t sW) {
  const int64_t row = blockIdx.x;
  out_t* out = patches + row * g.K;
  const int K = static_cast<int>(g.K);
  const int64_t b = row / g.T, t = row % g.T;
  if (t < g.P) {
    for (int k = threadIdx.x; k < K; k += blockDim.x) out[k] = out_t(0);
    return;
  }
  const int64_t y0 = (t - g.P) / g.gw * g.ph, x0 = (t - g.P) % g.gw * g.pw;
  const int pw = static_cast<int>(g.pw), area = static_cast<int>(g.ph * g.pw);
  const in_t* base = img + b * sB;
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    const int c = k / area, i = (k - c * area) / pw, j = k - c * area - i * pw;
    const int64_t y = y0 + i, x = x0 + j;
    acc_t v = acc_t(0);  // padding: zero after normalisation, as timm pads the model input
    if (y < g.H && x < g.W) {
      v = static_cast<acc_t>(base[c * sC + y * sH + x * sW]);
      if constexpr (std::is_same_v<in_t, uint8_t>) v = v / acc_t(255);
      if (mean != nullptr) v = (v - mean[c]) / std[c];
    }
    out[k] = static_cast<out_t>(v);
  }
}

}  // namespace

void patchify_cuda(const at::Tensor& images, const at::Tensor& mean, const at::Tensor& std, at::Tensor& patches,
                   const Geometry& g) {
  TORCH_CHECK_VALUE(g.B * g.T <= std::numeric_limits<int32_t>::max(), "images give B * T = ", g.B * g.T,
                    " tokens; the CUDA kernel takes at most 2^31 - 1 (split the batch)");
  TORCH_CHECK_VALUE(g.K <= std::numeric_limits<int32_t>::max(), "patch length C * ph * pw = ", g.K,
                    " exceeds 2^31 - 1");
  if (g.B * g.T == 0) return;
  const c10::cuda::CUDAGuard guard(images.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, patches.scalar_type(), "patchify_cuda", [&] {
    using out_t = scalar_t;
    using acc_t = at::opmath_type<out_t>;
    AT_DISPATCH_FLOATING_TYPES_AND3(at::kByte, at::kHalf, at::kBFloat16, images.scalar_type(), "patchify_cuda", [&] {
      patchify_kernel<scalar_t, out_t, acc_t><<<static_cast<unsigned>(g.B * g.T), kThreads, 0, stream>>>(
          images.const_data_ptr<scalar_t>(), patches.mutable_data_ptr<out_t>(),
          mean.defined() ? mean.const_data_ptr<acc_t>() : nullptr,
          std.defined() ? std.const_data_ptr<acc_t>() : nullptr, g, images.stride(0), images.stride(1),
          images.stride(2), images.stride(3));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor patch_embed_cuda(const at::Tensor& images, const at::Tensor& weight, const OptTensor& bias,
                            const OptTensor& pos_embed, const OptTensor& prefix_tokens, const OptTensor& mean,
                            const OptTensor& std, bool pad) {
  const c10::cuda::CUDAGuard guard(images.device());
  return patch_embed_forward(images, weight, bias, pos_embed, prefix_tokens, mean, std, pad, patchify_cuda);
}

}  // namespace vit_kernels

TORCH_LIBRARY_IMPL(vit_kernels, CUDA, m) {
  m.impl("patch_embed", &vit_kernels::patch_embed_cuda);
}
