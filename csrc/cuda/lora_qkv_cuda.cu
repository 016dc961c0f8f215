// acelora._C_cuda: CUDA kernels of the acelora::lora_qkv_* ops (schemas in csrc/lora_qkv.cpp).
//
// Forward (r <= 4, d_in % 8 == 0; other shapes use the ATen composite of lora_qkv_common.h):
//   1. lora_down_kernel reads x once and writes Xcat = [x | U | 0] with U = drop(x) A_qkvᵀ [T, 3r]
//      (the three dropout masks are regenerated from philox, never stored).
//   2. one cuBLAS GEMM y = b + Xcat Wcatᵀ with Wcat = [W | s·blockdiag(B) | 0]: the rank-3r
//      up-projection rides along in the K dimension of the frozen GEMM (K = d_in + 3r, padded to 8).
// Backward:
//   1. one cuBLAS GEMM dXcat = dY Wcat: columns [0, d_in) are dY W, columns [d_in, d_in+3r) are dU.
//   2. dB = s · dYᵀ U (diagonal blocks), a skinny GEMM.
//   3. lora_bwd_kernel reads x and dXcat once: dX = dY W + Σ_g m_g/(1-p) ⊙ (dU_g A_g) and per-chunk
//      partial sums of dA_g = dU_gᵀ (m_g/(1-p) ⊙ x), reduced deterministically afterwards.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <Python.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <mutex>
#include <type_traits>

#include "../lora_qkv_common.h"
#include "../philox.h"

namespace acelora {
namespace {

constexpr int kMaxRank = 4;      // rank handled by the fused kernels (the paper's r = 4)
constexpr int kTokenChunk = 64;  // tokens per block in the backward kernel

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// 8 consecutive elements as 16-byte vector loads/stores (pointer must be 16-byte aligned).
template <typename T, typename A>
__device__ __forceinline__ void load8(const T* p, A* v) {
  constexpr int kVecs = sizeof(T) * 8 / 16;
  alignas(16) T tmp[8];
#pragma unroll
  for (int i = 0; i < kVecs; ++i) reinterpret_cast<uint4*>(tmp)[i] = __ldg(reinterpret_cast<const uint4*>(p) + i);
#pragma unroll
  for (int l = 0; l < 8; ++l) v[l] = static_cast<A>(tmp[l]);
}

template <typename T, typename A>
__device__ __forceinline__ void store8(T* p, const A* v) {
  constexpr int kVecs = sizeof(T) * 8 / 16;
  alignas(16) T tmp[8];
#pragma unroll
  for (int l = 0; l < 8; ++l) tmp[l] = static_cast<T>(v[l]);
#pragma unroll
  for (int i = 0; i < kVecs; ++i) reinterpret_cast<uint4*>(p)[i] = reinterpret_cast<const uint4*>(tmp)[i];
}

__global__ void rng_state_kernel(at::PhiloxCudaState philox, int64_t* out) {
  auto seeds = at::cuda::philox::unpack(philox);
  out[0] = static_cast<int64_t>(std::get<0>(seeds));
  out[1] = static_cast<int64_t>(std::get<1>(seeds));
}

template <typename out_t>
__global__ void fill_keep_kernel(out_t* __restrict__ out, const int64_t* __restrict__ rng, int64_t tokens,
                                 int64_t d_in, uint32_t threshold, out_t keep_value) {
  const uint64_t seed = static_cast<uint64_t>(rng[0]), offset = static_cast<uint64_t>(rng[1]);
  const int64_t blocks = (d_in + 7) / 8, total = 3 * tokens * blocks;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t row = i / blocks, jb = i % blocks;
    const uint32_t bits = keep_bits8(seed, offset, static_cast<uint32_t>(row / tokens),
                                     static_cast<uint32_t>(row % tokens), static_cast<uint32_t>(jb), threshold);
    out_t* o = out + row * d_in + jb * 8;
    const int64_t n = min(static_cast<int64_t>(8), d_in - jb * 8);
    for (int64_t l = 0; l < n; ++l) o[l] = ((bits >> l) & 1u) ? keep_value : out_t(0);
  }
}

// One warp per token: U[t, g*r+k] = keep_scale · Σ_j m_g[t,j] x[t,j] A[g*r+k, j]; also copies x
// into Xcat so the frozen GEMM can consume [x | U] in one pass.
template <typename scalar_t>
__global__ void lora_down_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ A,
                                 const int64_t* __restrict__ rng, scalar_t* __restrict__ xcat,
                                 scalar_t* __restrict__ u, int64_t tokens, int d_in, int r, int kp,
                                 bool dropout, uint32_t threshold, float keep_scale) {
  using acc = acc_t<scalar_t>;
  const int lane = threadIdx.x & 31;
  const int64_t t = blockIdx.x * (int64_t)(blockDim.x >> 5) + (threadIdx.x >> 5);
  if (t >= tokens) return;
  uint64_t seed = 0, offset = 0;
  if (dropout) {
    seed = static_cast<uint64_t>(rng[0]);
    offset = static_cast<uint64_t>(rng[1]);
  }
  acc sums[3][kMaxRank];
#pragma unroll
  for (int g = 0; g < 3; ++g)
#pragma unroll
    for (int k = 0; k < kMaxRank; ++k) sums[g][k] = 0;
  const scalar_t* xr = x + t * d_in;
  scalar_t* xc = xcat + t * kp;
  const int nb = d_in / 8;
  for (int jb = lane; jb < nb; jb += 32) {
    acc xv[8];
    load8(xr + jb * 8, xv);
    store8(xc + jb * 8, xv);
#pragma unroll
    for (int g = 0; g < 3; ++g) {
      const uint32_t bits = dropout ? keep_bits8(seed, offset, g, static_cast<uint32_t>(t), jb, threshold) : 0xFFu;
      acc xm[8];
#pragma unroll
      for (int l = 0; l < 8; ++l) xm[l] = ((bits >> l) & 1u) ? xv[l] : acc(0);
#pragma unroll
      for (int k = 0; k < kMaxRank; ++k) {
        if (k < r) {
          acc av[8];
          load8(A + (int64_t)(g * r + k) * d_in + jb * 8, av);
          acc s = 0;
#pragma unroll
          for (int l = 0; l < 8; ++l) s += xm[l] * av[l];
          sums[g][k] += s;
        }
      }
    }
  }
#pragma unroll
  for (int g = 0; g < 3; ++g)
#pragma unroll
    for (int k = 0; k < kMaxRank; ++k)
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) sums[g][k] += __shfl_xor_sync(0xFFFFFFFFu, sums[g][k], off);
  // Lanes 0..kp-d_in-1 write the tail of the Xcat row: U then zero padding.
  for (int c = lane; c < kp - d_in; c += 32) {
    acc val = 0;
#pragma unroll
    for (int g = 0; g < 3; ++g)
#pragma unroll
      for (int k = 0; k < kMaxRank; ++k)
        if (k < r && c == g * r + k) val = sums[g][k] * static_cast<acc>(keep_scale);
    xc[d_in + c] = static_cast<scalar_t>(val);
    if (c < 3 * r) u[t * 3 * r + c] = static_cast<scalar_t>(val);
  }
}

// Block (x: features in groups of 8, y: a chunk of kTokenChunk tokens).
//   dx[t, j]      = gx[t, j] + keep_scale · Σ_g m_g[t,j] Σ_k dU[t,g,k] A[g,k,j]
//   ws[c, g*r+k, j] = keep_scale · Σ_{t in chunk c} dU[t,g,k] m_g[t,j] x[t,j]
template <typename scalar_t>
__global__ void lora_bwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ A,
                                const scalar_t* __restrict__ gx, int64_t ld_gx, const scalar_t* __restrict__ dU,
                                int64_t ld_du, const int64_t* __restrict__ rng, scalar_t* __restrict__ dx,
                                acc_t<scalar_t>* __restrict__ ws, int64_t tokens, int d_in, int r, bool dropout,
                                uint32_t threshold, float keep_scale) {
  using acc = acc_t<scalar_t>;
  __shared__ acc du_s[kTokenChunk][3 * kMaxRank];
  const int64_t t0 = (int64_t)blockIdx.y * kTokenChunk;
  const int nt = static_cast<int>(min(static_cast<int64_t>(kTokenChunk), tokens - t0));
  for (int i = threadIdx.x; i < nt * 3 * r; i += blockDim.x) {
    const int tt = i / (3 * r), c = i % (3 * r);
    du_s[tt][c] = static_cast<acc>(dU[(t0 + tt) * ld_du + c]);
  }
  __syncthreads();
  const int jb = blockIdx.x * blockDim.x + threadIdx.x;
  if (jb >= d_in / 8) return;
  uint64_t seed = 0, offset = 0;
  if (dropout) {
    seed = static_cast<uint64_t>(rng[0]);
    offset = static_cast<uint64_t>(rng[1]);
  }
  const acc ks = static_cast<acc>(keep_scale);
  acc da[3][kMaxRank][8];
#pragma unroll
  for (int g = 0; g < 3; ++g)
#pragma unroll
    for (int k = 0; k < kMaxRank; ++k)
#pragma unroll
      for (int l = 0; l < 8; ++l) da[g][k][l] = 0;
  for (int tt = 0; tt < nt; ++tt) {
    const int64_t t = t0 + tt;
    acc xv[8], dxv[8];
    load8(x + t * d_in + jb * 8, xv);
    if (dx != nullptr) load8(gx + t * ld_gx + jb * 8, dxv);
#pragma unroll
    for (int g = 0; g < 3; ++g) {
      const uint32_t bits = dropout ? keep_bits8(seed, offset, g, static_cast<uint32_t>(t), jb, threshold) : 0xFFu;
      acc xm[8], back[8];
#pragma unroll
      for (int l = 0; l < 8; ++l) {
        xm[l] = ((bits >> l) & 1u) ? xv[l] * ks : acc(0);
        back[l] = 0;
      }
#pragma unroll
      for (int k = 0; k < kMaxRank; ++k) {
        if (k < r) {
          const acc du = du_s[tt][g * r + k];
          acc av[8];
          load8(A + (int64_t)(g * r + k) * d_in + jb * 8, av);
#pragma unroll
          for (int l = 0; l < 8; ++l) {
            da[g][k][l] += du * xm[l];
            back[l] += du * av[l];
          }
        }
      }
      if (dx != nullptr) {
#pragma unroll
        for (int l = 0; l < 8; ++l) dxv[l] += ((bits >> l) & 1u) ? back[l] * ks : acc(0);
      }
    }
    if (dx != nullptr) store8(dx + t * d_in + jb * 8, dxv);
  }
  acc* w = ws + (int64_t)blockIdx.y * 3 * r * d_in;
#pragma unroll
  for (int g = 0; g < 3; ++g)
#pragma unroll
    for (int k = 0; k < kMaxRank; ++k)
      if (k < r) {
#pragma unroll
        for (int l = 0; l < 8; ++l) w[(int64_t)(g * r + k) * d_in + jb * 8 + l] = da[g][k][l];
      }
}

// ------------------------------------------------------------------------------------------------

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

bool fused_ok(const Dims& d, const at::Tensor& x, const at::Tensor& A) {
  return d.r <= kMaxRank && d.d_in % 8 == 0 && d.tokens > 0 && d.tokens < (int64_t(1) << 31) &&
         aligned16(x) && aligned16(A);
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "lora_qkv: ", name, " must be a CUDA tensor here, got ", t.device());
}

at::Tensor new_rng_state_cuda(const at::Tensor& like) {
  at::Tensor st = at::empty({2}, like.options().dtype(at::kLong));
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(std::nullopt,
                                                                  at::cuda::detail::getDefaultCUDAGenerator());
  at::PhiloxCudaState philox;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    philox = gen->philox_cuda_state(4);  // our counters carry the offset: one step per call suffices
  }
  rng_state_kernel<<<1, 1, 0, c10::cuda::getCurrentCUDAStream()>>>(philox, st.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return st;
}

int fill_grid(int64_t work) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + 255) / 256, 65535)));
}

at::Tensor dropout_scale_cuda(const at::Tensor& rng_state, int64_t tokens, int64_t d_in, double p,
                              at::ScalarType dtype) {
  at::Tensor out = at::empty({3, tokens, d_in}, rng_state.options().dtype(dtype));
  if (out.numel() == 0) return out;
  const int64_t work = 3 * tokens * ((d_in + 7) / 8);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "lora_qkv_dropout_scale_cuda", [&] {
    fill_keep_kernel<scalar_t><<<fill_grid(work), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        out.data_ptr<scalar_t>(), rng_state.data_ptr<int64_t>(), tokens, d_in, dropout_threshold(p),
        static_cast<scalar_t>(1.0 / (1.0 - p)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// The composite path's masks on CUDA: materialise the [3, T, d] scale tensor (shapes the fused
// kernels do not cover only).
at::Tensor drop_cuda(const at::Tensor& rng_state, const at::Tensor& x, double p) {
  return x.unsqueeze(0) * dropout_scale_cuda(rng_state, x.size(0), x.size(1), p, x.scalar_type());
}

at::Tensor masked_sum_cuda(const at::Tensor& rng_state, const at::Tensor& v, double p) {
  return (v * dropout_scale_cuda(rng_state, v.size(1), v.size(2), p, v.scalar_type())).sum(0);
}

// Wcat = [W | s·blockdiag(B) | 0] of [3 d_out, kp].
at::Tensor concat_weight(const at::Tensor& weight, const at::Tensor& lora_B, double scale, const Dims& d, int64_t kp) {
  at::Tensor wcat = at::zeros({3 * d.d_out, kp}, weight.options());
  wcat.narrow(1, 0, d.d_in).copy_(weight);
  wcat.narrow(1, d.d_in, 3 * d.r).copy_(block_diag_B(lora_B, d.d_out).mul(scale));
  return wcat;
}

int64_t padded_k(const Dims& d) { return (d.d_in + 3 * d.r + 7) / 8 * 8; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_qkv_fwd_cuda(
    const at::Tensor& x_, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A_, const at::Tensor& lora_B, double scale, double dropout_p, bool training) {
  const Dims d = check_args(x_, weight, bias, lora_A_, lora_B);
  check_dropout(dropout_p);
  check_cuda(x_, "x");
  c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), lora_A = lora_A_.contiguous();
  const bool dropout = uses_dropout(dropout_p, training);
  at::Tensor rng = dropout ? new_rng_state_cuda(x) : at::zeros({2}, x.options().dtype(at::kLong));
  if (!fused_ok(d, x, lora_A)) {
    auto [y, u] = composite_forward(x, weight, bias, lora_A, lora_B, scale, dropout, dropout_p, rng,
                                    {drop_cuda, masked_sum_cuda}, d);
    return {y, u, rng};
  }
  const int64_t kp = padded_k(d);
  at::Tensor xcat = at::empty({d.tokens, kp}, x.options());
  at::Tensor u = at::empty({d.tokens, 3 * d.r}, x.options());
  constexpr int kWarps = 8;
  const int64_t grid = (d.tokens + kWarps - 1) / kWarps;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lora_qkv_down_cuda", [&] {
    lora_down_kernel<scalar_t><<<grid, kWarps * 32, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), lora_A.data_ptr<scalar_t>(), rng.data_ptr<int64_t>(), xcat.data_ptr<scalar_t>(),
        u.data_ptr<scalar_t>(), d.tokens, static_cast<int>(d.d_in), static_cast<int>(d.r), static_cast<int>(kp),
        dropout, dropout_threshold(dropout_p), static_cast<float>(dropout ? 1.0 / (1.0 - dropout_p) : 1.0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const at::Tensor wcat = concat_weight(weight, lora_B, scale, d, kp);
  at::Tensor y = (bias.has_value() && bias->defined()) ? at::addmm(*bias, xcat, wcat.t()) : at::mm(xcat, wcat.t());
  return {y, u, rng};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_qkv_bwd_cuda(
    const at::Tensor& grad_y_, const at::Tensor& x_, const at::Tensor& weight, const at::Tensor& lora_A_,
    const at::Tensor& lora_B, const at::Tensor& u_, const at::Tensor& rng_state, double scale, double dropout_p,
    bool training, bool need_dx) {
  const Dims d = check_args(x_, weight, std::nullopt, lora_A_, lora_B);
  check_dropout(dropout_p);
  check_cuda(x_, "x");
  check_cuda(rng_state, "rng_state");
  TORCH_CHECK(grad_y_.dim() == 2 && grad_y_.size(0) == d.tokens && grad_y_.size(1) == 3 * d.d_out,
              "lora_qkv: grad_y must be [", d.tokens, ", ", 3 * d.d_out, "], got ", grad_y_.sizes());
  TORCH_CHECK(u_.dim() == 2 && u_.size(0) == d.tokens && u_.size(1) == 3 * d.r, "lora_qkv: u must be [",
              d.tokens, ", ", 3 * d.r, "], got ", u_.sizes());
  TORCH_CHECK(rng_state.scalar_type() == at::kLong && rng_state.numel() == 2,
              "lora_qkv: rng_state must be int64[2] (seed, offset)");
  c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), lora_A = lora_A_.contiguous(), rng = rng_state.contiguous();
  const at::Tensor grad_y = grad_y_.to(x.scalar_type()).contiguous(), u = u_.to(x.scalar_type()).contiguous();
  const bool dropout = uses_dropout(dropout_p, training);
  if (!fused_ok(d, x, lora_A)) {
    return composite_backward(grad_y, x, weight, lora_A, lora_B, u, rng, scale, dropout, dropout_p, need_dx,
                              {drop_cuda, masked_sum_cuda}, d);
  }
  const int64_t kp = padded_k(d);
  at::Tensor gx, du;  // dY W (ld kp) and dU (ld kp or 3r)
  int64_t ld_du;
  if (need_dx) {
    gx = at::mm(grad_y, concat_weight(weight, lora_B, scale, d, kp));  // [T, kp] = [dY W | dU | 0]
    du = gx.narrow(1, d.d_in, 3 * d.r);
    ld_du = kp;
  } else {
    du = at::mm(grad_y, block_diag_B(lora_B, d.d_out)).mul_(scale);
    ld_du = 3 * d.r;
  }
  at::Tensor dB = diag_blocks(at::mm(grad_y.t(), u).mul_(scale), d.d_out, d.r);
  at::Tensor dx = need_dx ? at::empty({d.tokens, d.d_in}, x.options()) : at::empty({0}, x.options());
  const int64_t chunks = (d.tokens + kTokenChunk - 1) / kTokenChunk;
  const int nb = static_cast<int>(d.d_in / 8);
  const int threads = std::min(256, (nb + 31) / 32 * 32);
  const dim3 grid((nb + threads - 1) / threads, static_cast<unsigned>(chunks));
  TORCH_CHECK(chunks < 65536, "lora_qkv: too many tokens for the fused backward (", d.tokens, ")");
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor ws = at::empty({chunks, 3 * d.r, d.d_in}, x.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lora_qkv_bwd_cuda", [&] {
    lora_bwd_kernel<scalar_t><<<grid, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), lora_A.data_ptr<scalar_t>(), need_dx ? gx.data_ptr<scalar_t>() : nullptr, kp,
        du.data_ptr<scalar_t>(), ld_du, rng.data_ptr<int64_t>(), need_dx ? dx.data_ptr<scalar_t>() : nullptr,
        ws.data_ptr<acc_t<scalar_t>>(), d.tokens, nb * 8, static_cast<int>(d.r), dropout,
        dropout_threshold(dropout_p), static_cast<float>(dropout ? 1.0 / (1.0 - dropout_p) : 1.0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  at::Tensor dA = ws.sum(0).to(x.scalar_type());
  return {dx, dA, dB};
}

at::Tensor lora_qkv_dropout_masks_cuda(const at::Tensor& rng_state, int64_t tokens, int64_t d_in, double dropout_p) {
  check_dropout(dropout_p);
  TORCH_CHECK(tokens >= 0 && d_in >= 0, "lora_qkv: tokens and d_in must be >= 0");
  TORCH_CHECK(rng_state.scalar_type() == at::kLong && rng_state.numel() == 2,
              "lora_qkv: rng_state must be int64[2] (seed, offset)");
  c10::cuda::CUDAGuard guard(rng_state.device());
  const at::Tensor rng = rng_state.contiguous();
  at::Tensor out = at::empty({3, tokens, d_in}, rng.options().dtype(at::kByte));
  if (out.numel() == 0) return out;
  fill_keep_kernel<uint8_t><<<fill_grid(3 * tokens * ((d_in + 7) / 8)), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
      out.data_ptr<uint8_t>(), rng.data_ptr<int64_t>(), tokens, d_in, dropout_threshold(dropout_p), 1);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace acelora

TORCH_LIBRARY_IMPL(acelora, CUDA, m) {
  m.impl("lora_qkv_fwd", &acelora::lora_qkv_fwd_cuda);
  m.impl("lora_qkv_bwd", &acelora::lora_qkv_bwd_cuda);
  m.impl("lora_qkv_dropout_masks", &acelora::lora_qkv_dropout_masks_cuda);
}

static PyModuleDef acelora_C_cuda_module = {PyModuleDef_HEAD_INIT, "_C_cuda", "acelora LoRA-QKV ops (CUDA)", -1,
                                           nullptr};
PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&acelora_C_cuda_module); }
