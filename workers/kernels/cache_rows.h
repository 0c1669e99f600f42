// How the decode-attention loops read a KV cache's rows: a row format is a template parameter
// of the one copy of each loop (attend_avx2.h, attend_avx512.h, decode_attention.h), so the
// float caches and the int8 cache (workers/kv_int8.py) share the loops and differ only here:
//
//   PlainRows<T>  a head's row is D values of the cache dtype T (float32 / bfloat16 / float16)
//   Int8Rows      D int8 values, then the row's float32 scale in 4 bytes (unaligned)
//
// Members: raw_t (the cache's element), kTail (elements after a head's D values: a head's row
// segment is D + kTail), kScaled (rows carry a scale: the loops fold it into the score for keys
// and into the softmax weight for values, once per row, never per element), load (one element
// to float32), scale(row, D), and where a vector path reads the format: kAvx2 / load8 (8
// elements to a ymm of float32), kAvx512 / load16 (16 to a zmm).
#pragma once

#include "common.h"

namespace flotilla {

template <typename T>
struct PlainRows {
  using raw_t = typename Raw<T>::type;
  static constexpr int64_t kTail = 0;
  static constexpr bool kScaled = false;
  static constexpr bool kAvx2 = std::is_same<T, float>::value;
  static constexpr bool kAvx512 =
      std::is_same<T, float>::value || std::is_same<T, c10::BFloat16>::value;
  static float load(raw_t x) { return Raw<T>::load(x); }
  static float scale(const raw_t*, int64_t) { return 1.0f; }
#if FLOTILLA_AVX2
  static __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
#endif
#if FLOTILLA_AVX512
  static __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
  static __m512 load16(const uint16_t* p) { return bf16x16_load(p); }
#endif
};

struct Int8Rows {
  using raw_t = int8_t;
  static constexpr int64_t kTail = 4;  // the float32 scale's bytes
  static constexpr bool kScaled = true;
  static constexpr bool kAvx2 = true;
  static constexpr bool kAvx512 = true;
  static float load(int8_t x) { return static_cast<float>(x); }
  static float scale(const int8_t* row, int64_t D) {
    float s;
    std::memcpy(&s, row + D, sizeof(float));
    return s;
  }
#if FLOTILLA_AVX2
  static __m256 load8(const int8_t* p) {  // sign-extend to int32, then convert (exact)
    return _mm256_cvtepi32_ps(
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
#endif
#if FLOTILLA_AVX512
  static __m512 load16(const int8_t* p) {
    return _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
#endif
};

}  // namespace flotilla
