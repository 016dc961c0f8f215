// acelora._C: the LoRA-QKV custom ops (schemas + CPU kernels).
//
//   acelora::lora_qkv_fwd(x, weight, bias, lora_A, lora_B, scale, dropout_p, training)
//       -> (y [T, 3 d_out], u [T, 3r] = drop(x) A_qkvᵀ, rng_state int64[2] = (seed, offset))
//   acelora::lora_qkv_bwd(grad_y, x, weight, lora_A, lora_B, u, rng_state, scale, dropout_p,
//                         training, need_dx) -> (dx, dA, dB)    (dx is empty when not needed)
//   acelora::lora_qkv_dropout_masks(rng_state, tokens, d_in, dropout_p) -> uint8 [3, T, d_in]
//
// W and b are frozen: no gradient is ever computed for them. The dropout masks are never stored;
// both passes regenerate them from rng_state (philox.h). Autograd and the fake (meta) kernels
// are registered from Python (acelora/ops/lora_qkv.py). The CUDA kernels live in acelora._C_cuda.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

#include <mutex>

#include "lora_qkv_common.h"
#include "philox.h"

namespace acelora {
namespace {

template <typename out_t>
void fill_keep_cpu(out_t* out, uint64_t seed, uint64_t offset, int64_t tokens, int64_t d_in, uint32_t threshold,
                   out_t keep_value) {
  const int64_t blocks = (d_in + 7) / 8;
  // One task per (g, t) row; the masks do not depend on how rows are split across threads.
  at::parallel_for(0, 3 * tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const uint32_t g = static_cast<uint32_t>(row / tokens), t = static_cast<uint32_t>(row % tokens);
      out_t* o = out + row * d_in;
      for (int64_t jb = 0; jb < blocks; ++jb) {
        const uint32_t bits = keep_bits8(seed, offset, g, t, static_cast<uint32_t>(jb), threshold);
        const int64_t j0 = jb * 8, n = std::min<int64_t>(8, d_in - j0);
        for (int64_t l = 0; l < n; ++l) o[j0 + l] = ((bits >> l) & 1u) ? keep_value : out_t(0);
      }
    }
  });
}

std::pair<uint64_t, uint64_t> read_rng_state(const at::Tensor& rng_state) {
  TORCH_CHECK(rng_state.scalar_type() == at::kLong && rng_state.numel() == 2,
              "lora_qkv: rng_state must be int64[2] (seed, offset), got ", rng_state.scalar_type(), " ",
              rng_state.sizes());
  auto st = rng_state.contiguous();
  const int64_t* p = st.data_ptr<int64_t>();
  return {static_cast<uint64_t>(p[0]), static_cast<uint64_t>(p[1])};
}

// [3, T, d]: x ⊙ m_g / (1-p), masks generated on the fly (no mask tensor).
at::Tensor drop_cpu(const at::Tensor& rng_state, const at::Tensor& x, double p) {
  auto [seed, offset] = read_rng_state(rng_state);
  const int64_t tokens = x.size(0), d_in = x.size(1), blocks = (d_in + 7) / 8;
  const uint32_t threshold = dropout_threshold(p);
  at::Tensor out = at::empty({3, tokens, d_in}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lora_qkv_drop_cpu", [&] {
    const scalar_t keep = static_cast<scalar_t>(1.0 / (1.0 - p));
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, 3 * tokens, 64, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const uint32_t g = static_cast<uint32_t>(row / tokens), t = static_cast<uint32_t>(row % tokens);
        const scalar_t* xr = xp + static_cast<int64_t>(t) * d_in;
        scalar_t* o = op + row * d_in;
        for (int64_t jb = 0; jb < blocks; ++jb) {
          const uint32_t bits = keep_bits8(seed, offset, g, t, static_cast<uint32_t>(jb), threshold);
          const int64_t j0 = jb * 8, n = std::min<int64_t>(8, d_in - j0);
          for (int64_t l = 0; l < n; ++l) o[j0 + l] = ((bits >> l) & 1u) ? xr[j0 + l] * keep : scalar_t(0);
        }
      }
    });
  });
  return out;
}

// [T, d]: Σ_g m_g / (1-p) ⊙ v_g for v [3, T, d].
at::Tensor masked_sum_cpu(const at::Tensor& rng_state, const at::Tensor& v_, double p) {
  auto [seed, offset] = read_rng_state(rng_state);
  const at::Tensor v = v_.contiguous();
  const int64_t tokens = v.size(1), d_in = v.size(2), blocks = (d_in + 7) / 8;
  const uint32_t threshold = dropout_threshold(p);
  at::Tensor out = at::empty({tokens, d_in}, v.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, v.scalar_type(), "lora_qkv_masked_sum_cpu", [&] {
    using acc = at::opmath_type<scalar_t>;
    const acc keep = static_cast<acc>(1.0 / (1.0 - p));
    const scalar_t* vp = v.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t jb = 0; jb < blocks; ++jb) {
          uint32_t bits[3];
          for (uint32_t g = 0; g < 3; ++g)
            bits[g] = keep_bits8(seed, offset, g, static_cast<uint32_t>(t), static_cast<uint32_t>(jb), threshold);
          const int64_t j0 = jb * 8, n = std::min<int64_t>(8, d_in - j0);
          for (int64_t l = 0; l < n; ++l) {
            acc s = 0;
            for (int g = 0; g < 3; ++g)
              if ((bits[g] >> l) & 1u) s += static_cast<acc>(vp[(g * tokens + t) * d_in + j0 + l]);
            op[t * d_in + j0 + l] = static_cast<scalar_t>(s * keep);
          }
        }
      }
    });
  });
  return out;
}

at::Tensor new_rng_state_cpu() {
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(std::nullopt, at::detail::getDefaultCPUGenerator());
  uint64_t seed;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    seed = gen->random64();
  }
  at::Tensor st = at::empty({2}, at::TensorOptions().dtype(at::kLong));
  st.data_ptr<int64_t>()[0] = static_cast<int64_t>(seed);
  st.data_ptr<int64_t>()[1] = 0;
  return st;
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "lora_qkv: ", name, " must be a CPU tensor here, got ", t.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_qkv_fwd_cpu(
    const at::Tensor& x_, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout_p, bool training) {
  const Dims d = check_args(x_, weight, bias, lora_A, lora_B);
  check_dropout(dropout_p);
  const at::Tensor x = x_.contiguous();
  const bool dropout = uses_dropout(dropout_p, training);
  at::Tensor rng = dropout ? new_rng_state_cpu() : at::zeros({2}, at::TensorOptions().dtype(at::kLong));
  auto [y, u] = composite_forward(x, weight, bias, lora_A, lora_B, scale, dropout, dropout_p, rng,
                                  {drop_cpu, masked_sum_cpu}, d);
  return {y, u, rng};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_qkv_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x_, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& u, const at::Tensor& rng_state, double scale, double dropout_p,
    bool training, bool need_dx) {
  const Dims d = check_args(x_, weight, std::nullopt, lora_A, lora_B);
  check_dropout(dropout_p);
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == d.tokens && grad_y.size(1) == 3 * d.d_out,
              "lora_qkv: grad_y must be [", d.tokens, ", ", 3 * d.d_out, "], got ", grad_y.sizes());
  TORCH_CHECK(u.dim() == 2 && u.size(0) == d.tokens && u.size(1) == 3 * d.r, "lora_qkv: u must be [", d.tokens,
              ", ", 3 * d.r, "], got ", u.sizes());
  check_cpu(rng_state, "rng_state");
  const bool dropout = uses_dropout(dropout_p, training);
  return composite_backward(grad_y.to(x_.scalar_type()).contiguous(), x_.contiguous(), weight, lora_A, lora_B,
                            u.to(x_.scalar_type()), rng_state, scale, dropout, dropout_p, need_dx,
                            {drop_cpu, masked_sum_cpu}, d);
}

at::Tensor lora_qkv_dropout_masks_cpu(const at::Tensor& rng_state, int64_t tokens, int64_t d_in, double dropout_p) {
  check_dropout(dropout_p);
  TORCH_CHECK(tokens >= 0 && d_in >= 0, "lora_qkv: tokens and d_in must be >= 0");
  auto [seed, offset] = read_rng_state(rng_state);
  at::Tensor out = at::empty({3, tokens, d_in}, at::TensorOptions().dtype(at::kByte));
  fill_keep_cpu<uint8_t>(out.data_ptr<uint8_t>(), seed, offset, tokens, d_in, dropout_threshold(dropout_p), 1);
  return out;
}

}  // namespace
}  // namespace acelora

TORCH_LIBRARY(acelora, m) {
  // Random (draws a seed from torch's generator): tagged so that compilers never CSE or recompute it.
  m.def("lora_qkv_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scale, "
        "float dropout_p, bool training) -> (Tensor, Tensor, Tensor)",
        {at::Tag::nondeterministic_seeded});
  m.def("lora_qkv_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor u, "
        "Tensor rng_state, float scale, float dropout_p, bool training, bool need_dx) -> (Tensor, Tensor, Tensor)");
  m.def("lora_qkv_dropout_masks(Tensor rng_state, int tokens, int d_in, float dropout_p) -> Tensor");
}

TORCH_LIBRARY_IMPL(acelora, CPU, m) {
  m.impl("lora_qkv_fwd", &acelora::lora_qkv_fwd_cpu);
  m.impl("lora_qkv_bwd", &acelora::lora_qkv_bwd_cpu);
  m.impl("lora_qkv_dropout_masks", &acelora::lora_qkv_dropout_masks_cpu);
}

// A plain Python module: importing it runs the registrations above.
static PyModuleDef acelora_C_module = {PyModuleDef_HEAD_INIT, "_C", "acelora LoRA-QKV ops (CPU)", -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&acelora_C_module); }
