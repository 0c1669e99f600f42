// Shared by the CPU kernels of workers/kernels: dtype plumbing (bf16 as bit patterns, so loops
// vectorize), torch-compatible rounding, a call-free exp, and dtype dispatch.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace flotilla {

template <typename T>
struct Raw {
  using type = T;
  static inline float load(T x) { return static_cast<float>(x); }
  static inline T store(float x) { return static_cast<T>(x); }
};

template <>
struct Raw<c10::BFloat16> {
  using type = uint16_t;  // bit pattern: widening is a shift, so the loops vectorize
  static inline float load(uint16_t x) {
    uint32_t u = static_cast<uint32_t>(x) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static inline uint16_t store(float x) {  // round to nearest even, like torch
    uint32_t u;
    std::memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
  }
};

// exp(x) for x <= 0 (scores minus their max): 2^(x log2 e) split into 2^round and 2^frac,
// frac in [-0.5, 0.5] by a degree-6 Taylor polynomial (relative error ~1e-7). Written without
// calls so that the compiler vectorizes the softmax loop. kExpPoly: the polynomial's
// coefficients, highest degree first (Horner).
constexpr float kExpPoly[7] = {1.5403530393381608e-4f, 1.3333558146428443e-3f,
                               9.6181291076284772e-3f, 5.5504108664821580e-2f,
                               2.4022650695910071e-1f, 6.9314718055994531e-1f, 1.0f};

inline float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float t = x * 1.4426950408889634f;
  // round to nearest by the 1.5 * 2^23 trick: no libm call, so the loop vectorizes
  const float r = (t + 12582912.0f) - 12582912.0f;
  const float f = t - r;
  float p = kExpPoly[0];
  for (int i = 1; i < 7; ++i) p = p * f + kExpPoly[i];
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(r) + 127) << 23;
  float s;
  std::memcpy(&s, &bits, 4);
  return p * s;
}

#if defined(__AVX512F__)
// exp_nonpos for 16 lanes at once (same split and polynomial, fused multiply-adds).
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
  const __m512 r = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, r);
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExpPoly[i]));
  return _mm512_scalef_ps(p, r);
}
#endif

// Round a float to the storage dtype and back (identity for float32).
template <typename T>
inline float rnd(float x) {
  return Raw<T>::load(Raw<T>::store(x));
}

#define FLOTILLA_DISPATCH(dtype, NAME, ...)                              \
  switch (dtype) {                                                       \
    case at::kFloat: {                                                   \
      using scalar_t = float;                                            \
      __VA_ARGS__;                                                       \
      break;                                                             \
    }                                                                    \
    case at::kBFloat16: {                                                \
      using scalar_t = c10::BFloat16;                                    \
      __VA_ARGS__;                                                       \
      break;                                                             \
    }                                                                    \
    case at::kHalf: {                                                    \
      using scalar_t = c10::Half;                                        \
      __VA_ARGS__;                                                       \
      break;                                                             \
    }                                                                    \
    default:                                                             \
      TORCH_CHECK(false, NAME ": unsupported dtype ", dtype);            \
  }

}  // namespace flotilla
