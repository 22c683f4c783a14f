// CPU half of the patch-embed extension: the patchify loop and the CPU registration.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "patch_embed.h"

namespace vit_kernels {
namespace {

// One patch-matrix row per iteration of the parallel loop; the image is read through its
// strides, so NCHW and channels-last need no copy.
template <typename in_t, typename out_t>
void patchify_cpu_kernel(const at::Tensor& images, const at::Tensor& mean, const at::Tensor& std,
                         at::Tensor& patches, const Geometry& g) {
  using acc_t = at::opmath_type<out_t>;
  const in_t* img = images.const_data_ptr<in_t>();
  out_t* dst = patches.mutable_data_ptr<out_t>();
  const int64_t sB = images.stride(0), sC = images.stride(1), sH = images.stride(2), sW = images.stride(3);
  const bool normalise = mean.defined();
  const acc_t* m = normalise ? mean.const_data_ptr<acc_t>() : nullptr;
  const acc_t* s = normalise ? std.const_data_ptr<acc_t>() : nullptr;
  constexpr bool is_uint8 = std::is_same_v<in_t, uint8_t>;

  // Rows are K elements (hundreds to thousands): a few dozen rows per task amortise the
  // scheduling without starving the second core on a batch of one.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(g.K, 1));
  at::parallel_for(0, g.B * g.T, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      out_t* out = dst + row * g.K;
      const int64_t b = row / g.T, t = row % g.T;
      if (t < g.P) {
        std::fill(out, out + g.K, out_t(0));
        continue;
      }
      const int64_t y0 = (t - g.P) / g.gw * g.ph, x0 = (t - g.P) % g.gw * g.pw;
      for (int64_t c = 0; c < g.C; ++c) {
        const in_t* plane = img + b * sB + c * sC;
        for (int64_t i = 0; i < g.ph; ++i) {
          const int64_t y = y0 + i;
          for (int64_t j = 0; j < g.pw; ++j, ++out) {
            const int64_t x = x0 + j;
            if (y >= g.H || x >= g.W) {  // padding: zero after normalisation, as timm pads the model input
              *out = out_t(0);
              continue;
            }
            acc_t v = static_cast<acc_t>(plane[y * sH + x * sW]);
            if (is_uint8) v = v / acc_t(255);
            if (normalise) v = (v - m[c]) / s[c];
            *out = static_cast<out_t>(v);
          }
        }
      }
    }
  });
}

}  // namespace

void patchify_cpu(const at::Tensor& images, const at::Tensor& mean, const at::Tensor& std, at::Tensor& patches,
                  const Geometry& g) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, patches.scalar_type(), "patchify_cpu", [&] {
    using out_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND3(at::kByte, at::kHalf, at::kBFloat16, images.scalar_type(), "patchify_cpu", [&] {
      patchify_cpu_kernel<scalar_t, out_t>(images, mean, std, patches, g);
    });
  });
}

at::Tensor patch_embed_cpu(const at::Tensor& images, const at::Tensor& weight, const OptTensor& bias,
                           const OptTensor& pos_embed, const OptTensor& prefix_tokens, const OptTensor& mean,
                           const OptTensor& std, bool pad) {
  return patch_embed_forward(images, weight, bias, pos_embed, prefix_tokens, mean, std, pad, patchify_cpu);
}

}  // namespace vit_kernels

TORCH_LIBRARY_IMPL(vit_kernels, CPU, m) {
  m.impl("patch_embed", &vit_kernels::patch_embed_cpu);
}
