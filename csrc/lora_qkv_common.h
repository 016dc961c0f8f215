// Device-agnostic pieces of the LoRA-QKV op: argument checks and the ATen composite forward /
// backward. The CPU path is the composite; the CUDA path uses it for shapes its fused kernels do
// not cover. Dropout masks are applied by device-specific `DropoutFns` (see philox.h).
//
//   y_g = x W_gᵀ + b_g + s · (drop_g(x) A_gᵀ) B_gᵀ         g ∈ {q, k, v}
//
// Shapes: x [T, d_in]; weight [3 d_out, d_in]; bias [3 d_out] or undefined; lora_A [3r, d_in];
// lora_B [3 d_out, r] (the block-diagonal 3 d_out × 3r matrix without its zero blocks).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <tuple>

namespace acelora {

struct Dims {
  int64_t tokens, d_in, d_out, r;
};

inline Dims check_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& lora_A, const at::Tensor& lora_B) {
  TORCH_CHECK(x.dim() == 2, "lora_qkv: x must be 2-D [tokens, d_in] here, got ", x.dim(), "-D");
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) % 3 == 0,
              "lora_qkv: weight must be [3*d_out, d_in], got ", weight.sizes());
  const int64_t d_in = weight.size(1), d_out = weight.size(0) / 3;
  TORCH_CHECK(x.size(1) == d_in, "lora_qkv: x has ", x.size(1), " features, weight expects ", d_in);
  TORCH_CHECK(lora_A.dim() == 2 && lora_A.size(0) % 3 == 0 && lora_A.size(0) > 0 && lora_A.size(1) == d_in,
              "lora_qkv: lora_A must be [3*r, ", d_in, "], got ", lora_A.sizes());
  const int64_t r = lora_A.size(0) / 3;
  TORCH_CHECK(lora_B.dim() == 2 && lora_B.size(0) == 3 * d_out && lora_B.size(1) == r,
              "lora_qkv: lora_B must be [", 3 * d_out, ", ", r, "], got ", lora_B.sizes());
  TORCH_CHECK(x.is_floating_point(), "lora_qkv: x must be floating point, got ", x.scalar_type());
  for (const at::Tensor* t : {&weight, &lora_A, &lora_B}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "lora_qkv: dtype mismatch: x is ", x.scalar_type(),
                " but a parameter is ", t->scalar_type(), " (cast the adapters or use autocast)");
    TORCH_CHECK(t->device() == x.device(), "lora_qkv: device mismatch: x is on ", x.device(),
                " but a parameter is on ", t->device());
  }
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == 3 * d_out, "lora_qkv: bias must be [", 3 * d_out,
                "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "lora_qkv: dtype mismatch: x is ", x.scalar_type(),
                " but bias is ", bias->scalar_type());
    TORCH_CHECK(bias->device() == x.device(), "lora_qkv: device mismatch: x is on ", x.device(),
                " but bias is on ", bias->device());
  }
  return {x.size(0), d_in, d_out, r};
}

inline void check_dropout(double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "lora_qkv: dropout_p must be in [0, 1), got ", p);
}

inline bool uses_dropout(double p, bool training) { return training && p > 0.0; }

// [3 d_out, 3r] block-diagonal matrix from lora_B [3 d_out, r].
inline at::Tensor block_diag_B(const at::Tensor& lora_B, int64_t d_out) {
  auto parts = lora_B.split(d_out, 0);
  return at::block_diag({parts[0], parts[1], parts[2]});
}

// The diagonal blocks [3 d_out, r] of a full [3 d_out, 3r] matrix.
inline at::Tensor diag_blocks(const at::Tensor& full, int64_t d_out, int64_t r) {
  // [3, d_out, 3, r] -> diagonal over the two group dims -> [d_out, r, 3] -> [3, d_out, r]
  return full.view({3, d_out, 3, r}).diagonal(0, 0, 2).permute({2, 0, 1}).reshape({3 * d_out, r});
}

// How a device applies the dropout masks of rng_state (see philox.h):
//   drop(rng_state, x [T,d], p)            -> [3, T, d]  x ⊙ m_g / (1-p) for g = q, k, v
//   masked_sum(rng_state, v [3,T,d], p)    -> [T, d]     Σ_g m_g / (1-p) ⊙ v_g
struct DropoutFns {
  at::Tensor (*drop)(const at::Tensor&, const at::Tensor&, double);
  at::Tensor (*masked_sum)(const at::Tensor&, const at::Tensor&, double);
};

inline std::tuple<at::Tensor, at::Tensor> composite_forward(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, bool dropout,
    double p, const at::Tensor& rng_state, DropoutFns fns, const Dims& d) {
  at::Tensor y = (bias.has_value() && bias->defined()) ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  at::Tensor u;
  if (dropout) {
    at::Tensor xd = fns.drop(rng_state, x, p);  // [3,T,d]
    u = at::bmm(xd, lora_A.view({3, d.r, d.d_in}).transpose(1, 2))                              // [3,T,r]
            .transpose(0, 1).reshape({d.tokens, 3 * d.r});
  } else {
    u = at::mm(x, lora_A.t());  // [T, 3r]
  }
  y.addmm_(u, block_diag_B(lora_B, d.d_out).t(), /*beta=*/1, /*alpha=*/scale);
  return {y, u};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> composite_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& u, const at::Tensor& rng_state, double scale, bool dropout,
    double p, bool need_dx, DropoutFns fns, const Dims& d) {
  at::Tensor dU = at::mm(grad_y, block_diag_B(lora_B, d.d_out)).mul_(scale);  // [T, 3r]
  at::Tensor dB = diag_blocks(at::mm(grad_y.t(), u).mul_(scale), d.d_out, d.r);
  at::Tensor dA, dx;
  if (dropout) {
    at::Tensor dU3 = dU.view({d.tokens, 3, d.r}).transpose(0, 1);  // [3,T,r]
    dA = at::bmm(dU3.transpose(1, 2), fns.drop(rng_state, x, p)).reshape({3 * d.r, d.d_in});
    if (need_dx) {
      at::Tensor dxd = at::bmm(dU3, lora_A.view({3, d.r, d.d_in}));  // [3,T,d]
      dx = at::mm(grad_y, weight).add_(fns.masked_sum(rng_state, dxd, p));
    }
  } else {
    dA = at::mm(dU.t(), x);
    if (need_dx) dx = at::mm(grad_y, weight).addmm_(dU, lora_A);
  }
  if (!need_dx) dx = at::empty({0}, x.options());
  return {dx, dA, dB};
}

}  // namespace acelora
