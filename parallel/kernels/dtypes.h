// dtype plumbing shared by the native kernels of parallel/ and workers/: bf16 handled as bit
// patterns (widening is a shift, so loops vectorize on any target), torch's rounding, and a
// dispatch over the float dtypes the kernels take.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>

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
