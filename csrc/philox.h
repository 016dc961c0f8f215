// Counter-based dropout masks shared by the C++ (CPU) and CUDA paths of the LoRA-QKV op.
//
// A mask bit is a pure function of (seed, offset, group g, token t, feature j), so the forward
// pass never stores masks: the backward pass regenerates exactly the same ones, on any device.
// One Philox-4x32-10 call yields 4 x 32 random bits = 8 sixteen-bit lanes, i.e. the masks of 8
// consecutive features of one (g, t) row. A feature is kept when its lane is >= threshold, where
// threshold = round(p * 65536): the keep probability is 1 - p up to 1/65536.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define ACELORA_HD __host__ __device__ __forceinline__
#else
#define ACELORA_HD inline
#endif

namespace acelora {

struct U32x4 {
  uint32_t v[4];
};

ACELORA_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t prod = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(prod >> 32);
  lo = static_cast<uint32_t>(prod);
}

// Philox-4x32 with 10 rounds (Salmon et al., SC'11).
ACELORA_HD U32x4 philox4x32_10(U32x4 ctr, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kM0, ctr.v[0], hi0, lo0);
    mulhilo32(kM1, ctr.v[2], hi1, lo1);
    U32x4 next;
    next.v[0] = hi1 ^ ctr.v[1] ^ k0;
    next.v[1] = lo1;
    next.v[2] = hi0 ^ ctr.v[3] ^ k1;
    next.v[3] = lo0;
    ctr = next;
    k0 += kW0;
    k1 += kW1;
  }
  return ctr;
}

// Keep-bits of features [8*jb, 8*jb + 8) of row (g, t): bit l set = feature 8*jb + l kept.
ACELORA_HD uint32_t keep_bits8(uint64_t seed, uint64_t offset, uint32_t g, uint32_t t, uint32_t jb,
                               uint32_t threshold) {
  U32x4 ctr;
  ctr.v[0] = jb;
  ctr.v[1] = t;
  ctr.v[2] = static_cast<uint32_t>(offset);
  // g < 3 takes two bits; the high half of the offset the rest.
  ctr.v[3] = (static_cast<uint32_t>(offset >> 32) << 2) | g;
  const U32x4 r = philox4x32_10(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  uint32_t bits = 0;
  for (int l = 0; l < 8; ++l) {
    const uint32_t lane = (r.v[l >> 1] >> ((l & 1) * 16)) & 0xFFFFu;
    bits |= static_cast<uint32_t>(lane >= threshold) << l;
  }
  return bits;
}

inline uint32_t dropout_threshold(double p) {
  double t = p * 65536.0 + 0.5;
  if (t < 0) t = 0;
  if (t > 65535) t = 65535;
  return static_cast<uint32_t>(t);
}

}  // namespace acelora
