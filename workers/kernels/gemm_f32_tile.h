// The register tile of the packed float32 GEMM (gemm_f32.cpp), in a header of its own so
// that other kernels can run products on it:
// c[MR rows, kNR columns] += x[MR rows, kc] * wp[kc, kNR] with wp one k-major panel.
#pragma once

#include "common.h"

namespace flotilla {
namespace f32gemm {

#if FLOTILLA_AVX512
struct Isa {  // (compiled on AVX-512 targets; tested here only by compiling)
  using V = __m512;
  static constexpr int kWidth = 16, kMR = 12;
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V bcast(const float* p) { return _mm512_set1_ps(*p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
};
#elif FLOTILLA_AVX2
struct Isa {
  using V = __m256;
  static constexpr int kWidth = 8, kMR = 6;
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
};
#endif

#if FLOTILLA_AVX2 || FLOTILLA_AVX512
constexpr int kNV = 2;                       // weight vectors per k in a panel
constexpr int64_t kNR = kNV * Isa::kWidth;   // output channels per panel
constexpr int kMR = Isa::kMR;                // rows of x per micro-tile

// c[m, 0:kNR] (ldc apart) = init (+ sum over kc of x[m, k] * wp[k, 0:kNR]) for MR rows;
// init: kNR values per row (bias or zeros) on the first k block, or nullptr to add to c.
// pf: the next panel's block, fetched a line per k while this one computes (nullptr: none).
template <int MR>
inline void tile(const float* x, int64_t ldx, const float* wp, int64_t kc, float* c, int64_t ldc,
                 const float* init, const float* pf) {
  using V = Isa::V;
  V acc[MR][kNV];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v)
      acc[m][v] = Isa::load(init ? init + v * Isa::kWidth : c + m * ldc + v * Isa::kWidth);
  for (int64_t k = 0; k < kc; ++k) {
    if (pf) {
#pragma GCC unroll 4
      for (int64_t l = 0; l < kNR; l += 16)  // a cache line each
        _mm_prefetch(reinterpret_cast<const char*>(pf + k * kNR + l), _MM_HINT_T0);
    }
    V w[kNV];
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) w[v] = Isa::load(wp + k * kNR + v * Isa::kWidth);
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const V xb = Isa::bcast(x + m * ldx + k);
#pragma GCC unroll 4
      for (int v = 0; v < kNV; ++v) acc[m][v] = Isa::fma(w[v], xb, acc[m][v]);
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) Isa::store(c + m * ldc + v * Isa::kWidth, acc[m][v]);
}

template <int MR = kMR>
inline void tile_rows(int rows, const float* x, int64_t ldx, const float* wp, int64_t kc,
                      float* c, int64_t ldc, const float* init, const float* pf) {
  if constexpr (MR > 1) {
    if (rows < MR) return tile_rows<MR - 1>(rows, x, ldx, wp, kc, c, ldc, init, pf);
  }
  tile<MR>(x, ldx, wp, kc, c, ldc, init, pf);
}

#endif  // FLOTILLA_AVX2 || FLOTILLA_AVX512

}  // namespace f32gemm
}  // namespace flotilla
