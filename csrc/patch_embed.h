// Patch embedding: image -> normalised patches -> projection + bias + position embedding + prefix tokens.
//
// The shared half of the extension: input checks, the token-buffer assembly (ATen GEMM) and the
// declaration of the device-specific patchify kernels (patch_embed_cpu.cpp, cuda/patch_embed_cuda.cu).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

namespace vit_kernels {

using OptTensor = c10::optional<at::Tensor>;

// Sizes of one call. Tokens are ordered [prefix (P) | patches (L = gh * gw, row-major)] and the
// patch matrix has one row per token (B * T rows, prefix rows zero) and K = C * ph * pw columns
// ordered (c, i, j) like weight.view(D, K).
struct Geometry {
  int64_t B, C, H, W;    // images (any strides)
  int64_t D, ph, pw;     // weight (D, C, ph, pw)
  int64_t gh, gw, L;     // patch grid; with pad the last row/column of patches may overhang H/W
  int64_t P, T, K;       // prefix tokens, tokens per image (P + L), patch length
};

// Checks every argument (TORCH_CHECK_VALUE: a Python ValueError naming the argument and the
// expected value) and returns the sizes.
Geometry check_patch_embed_inputs(const at::Tensor& images, const at::Tensor& weight, const OptTensor& bias,
                                  const OptTensor& pos_embed, const OptTensor& prefix_tokens,
                                  const OptTensor& mean, const OptTensor& std, bool pad);

// Writes the (B * T, K) patch matrix: zero rows for the prefix tokens, then every patch of every
// image as x' = (x [/ 255 for uint8] - mean[c]) / std[c], zero where a padded patch overhangs
// the image. mean/std are undefined (no normalisation) or contiguous length-C tensors in the
// accumulation type of `patches` (float, or double for double).
void patchify_cpu(const at::Tensor& images, const at::Tensor& mean, const at::Tensor& std,
                  at::Tensor& patches, const Geometry& g);
void patchify_cuda(const at::Tensor& images, const at::Tensor& mean, const at::Tensor& std,
                   at::Tensor& patches, const Geometry& g);

using PatchifyFn = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&,
                            const Geometry&);

// The op on either device: checks, patchify, then one GEMM into the token buffer.
at::Tensor patch_embed_forward(const at::Tensor& images, const at::Tensor& weight, const OptTensor& bias,
                               const OptTensor& pos_embed, const OptTensor& prefix_tokens,
                               const OptTensor& mean, const OptTensor& std, bool pad, PatchifyFn patchify);

}  // namespace vit_kernels
