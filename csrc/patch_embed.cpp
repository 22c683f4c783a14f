// Shared half of the patch-embed extension: checks, the token-buffer assembly and the schema.
#include "patch_embed.h"

#include <Python.h>
#include <torch/library.h>

namespace vit_kernels {
namespace {

bool is_image_dtype(at::ScalarType t) {
  return t == at::kByte || t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

bool is_weight_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

void check_same_device(const char* name, const at::Tensor& t, const at::Tensor& images) {
  TORCH_CHECK_VALUE(t.device() == images.device(), name, " must be on the images' device ", images.device(),
                    "; got ", t.device());
}

void check_param(const char* name, const at::Tensor& t, const at::Tensor& weight, const at::Tensor& images) {
  check_same_device(name, t, images);
  TORCH_CHECK_VALUE(t.scalar_type() == weight.scalar_type(), name, " must have the weight's dtype ",
                    weight.scalar_type(), "; got ", t.scalar_type());
}

}  // namespace

Geometry check_patch_embed_inputs(const at::Tensor& images, const at::Tensor& weight, const OptTensor& bias,
                                  const OptTensor& pos_embed, const OptTensor& prefix_tokens,
                                  const OptTensor& mean, const OptTensor& std, bool pad) {
  TORCH_CHECK_VALUE(images.dim() == 4, "images must have shape (B, C, H, W); got ", images.sizes());
  TORCH_CHECK_VALUE(is_image_dtype(images.scalar_type()),
                    "images must be uint8, float16, bfloat16, float32 (or float64); got ", images.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 4, "weight must have shape (D, C, ph, pw); got ", weight.sizes());
  TORCH_CHECK_VALUE(is_weight_dtype(weight.scalar_type()),
                    "weight must be float16, bfloat16, float32 (or float64); got ", weight.scalar_type());
  check_same_device("weight", weight, images);

  Geometry g{};
  g.B = images.size(0), g.C = images.size(1), g.H = images.size(2), g.W = images.size(3);
  g.D = weight.size(0), g.ph = weight.size(2), g.pw = weight.size(3);
  TORCH_CHECK_VALUE(weight.size(1) == g.C, "images have ", g.C, " channels; expected in_chans = ", weight.size(1),
                    " (weight has shape ", weight.sizes(), ")");
  TORCH_CHECK_VALUE(g.ph > 0 && g.pw > 0 && g.D > 0, "weight must have shape (D, C, ph, pw) with D, ph, pw > 0; got ",
                    weight.sizes());
  if (!pad) {
    TORCH_CHECK_VALUE(g.H % g.ph == 0 && g.W % g.pw == 0, "image size (", g.H, ", ", g.W,
                      ") must be divisible by the patch size (", g.ph, ", ", g.pw, "); or pad=True pads right/bottom");
  }
  g.gh = (g.H + g.ph - 1) / g.ph;
  g.gw = (g.W + g.pw - 1) / g.pw;
  g.L = g.gh * g.gw;
  g.K = g.C * g.ph * g.pw;

  g.P = 0;
  if (prefix_tokens) {
    const auto& p = *prefix_tokens;
    check_param("prefix_tokens", p, weight, images);
    TORCH_CHECK_VALUE(p.dim() == 3 && p.size(0) == 1 && p.size(2) == g.D,
                      "prefix_tokens must have shape (1, P, D = ", g.D, "); got ", p.sizes());
    g.P = p.size(1);
  }
  g.T = g.P + g.L;
  if (bias) {
    check_param("bias", *bias, weight, images);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == g.D, "bias must have shape (D,) = (", g.D, ",); got ",
                      bias->sizes());
  }
  if (pos_embed) {
    const auto& p = *pos_embed;
    check_param("pos_embed", p, weight, images);
    TORCH_CHECK_VALUE(p.dim() == 3 && p.size(0) == 1 && p.size(2) == g.D &&
                          (p.size(1) == g.T || p.size(1) == g.L),
                      "pos_embed must have shape (1, P + L, D) = (1, ", g.T, ", ", g.D, ") or (1, L, D) = (1, ", g.L,
                      ", ", g.D, ") for ", g.P, " prefix tokens and a ", g.gh, " x ", g.gw, " patch grid; got ",
                      p.sizes());
  }
  TORCH_CHECK_VALUE(mean.has_value() == std.has_value(), "mean and std must be given together");
  for (const auto* arg : {&mean, &std}) {
    if (!arg->has_value()) continue;
    const char* name = arg == &mean ? "mean" : "std";
    const auto& t = **arg;
    check_same_device(name, t, images);
    TORCH_CHECK_VALUE(t.is_floating_point(), name, " must be a floating-point tensor; got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.numel() == g.C, name, " must have C = ", g.C, " elements (one per channel); got shape ",
                      t.sizes());
  }
  // A zero std is caught where reading it is cheap: on the CPU. A CUDA std is not read (that
  // would sync the device on every call); a zero there gives inf/nan tokens.
  if (std && std->is_cpu()) {
    const at::Tensor values = std->to(at::kDouble).contiguous();
    const double* v = values.const_data_ptr<double>();
    for (int64_t c = 0; c < g.C; ++c) {
      TORCH_CHECK_VALUE(v[c] != 0, "std must be non-zero in every channel; channel ", c, " is 0");
    }
  }
  return g;
}

at::Tensor patch_embed_forward(const at::Tensor& images, const at::Tensor& weight, const OptTensor& bias,
                               const OptTensor& pos_embed, const OptTensor& prefix_tokens,
                               const OptTensor& mean, const OptTensor& std, bool pad, PatchifyFn patchify) {
  const Geometry g = check_patch_embed_inputs(images, weight, bias, pos_embed, prefix_tokens, mean, std, pad);
  const auto opts = weight.options();
  // Normalisation constants in the accumulation type the kernels compute in.
  const auto acc = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean_acc, std_acc;
  if (mean) {
    mean_acc = mean->reshape({g.C}).to(acc).contiguous();
    std_acc = std->reshape({g.C}).to(acc).contiguous();
  }

  // Prefix rows of the patch matrix are zero, so one GEMM over all B * T rows writes the whole
  // token buffer: the P extra rows per image (1-5 in 197) cost less than a batched GEMM whose
  // per-image M = L wastes a partial tile, or a copy of the result into place.
  at::Tensor patches = at::empty({g.B * g.T, g.K}, opts);
  patchify(images, mean_acc, std_acc, patches, g);

  // The added term (T, D): prefix tokens on the prefix rows, bias on the patch rows, pos_embed
  // on every row (length T) or on the patch rows (length L). It is small; it goes into the
  // token buffer with one broadcast copy, and the GEMM accumulates onto it (beta = 1).
  at::Tensor term;
  if (prefix_tokens || bias || pos_embed) {
    term = at::zeros({g.T, g.D}, opts);
    if (prefix_tokens) term.narrow(0, 0, g.P).copy_((*prefix_tokens)[0]);
    if (bias) term.narrow(0, g.P, g.L).add_(*bias);
    if (pos_embed) term.narrow(0, g.T - pos_embed->size(1), pos_embed->size(1)).add_((*pos_embed)[0]);
  }
  // weight.view(D, K) needs the (c, i, j) order contiguous; a channels-last weight is copied.
  const at::Tensor w2d = weight.reshape({g.D, g.K});
  at::Tensor out = at::empty({g.B, g.T, g.D}, opts);
  at::Tensor out2d = out.view({g.B * g.T, g.D});
  if (term.defined()) {
    out.copy_(term.unsqueeze(0).expand({g.B, g.T, g.D}));
    out2d.addmm_(patches, w2d.t());
  } else {
    at::mm_out(out2d, patches, w2d.t());
  }
  return out;
}

}  // namespace vit_kernels

// FRAGMENT, not TORCH_LIBRARY: the Triton ops register themselves in the same namespace from
// Python, and either may be loaded first.
TORCH_LIBRARY_FRAGMENT(vit_kernels, m) {
  m.def(
      "patch_embed(Tensor images, Tensor weight, Tensor? bias=None, Tensor? pos_embed=None, "
      "Tensor? prefix_tokens=None, Tensor? mean=None, Tensor? std=None, bool pad=False) -> Tensor");
}

// Lets setup.py build this as the importable module vit_kernels._C (importing it registers the
// op); the JIT build loads the same library with torch.ops.load_library instead.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
