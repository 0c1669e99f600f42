// Small-batch linears that stream their weight at memory bandwidth (decode):
//   linear_w8:  out[m, n] = (sum_k x[m, k] * w[n, k]) * scale[n] (+ bias[n]), w int8 [N, K]
//               (symmetric, one float32 scale per output row: workers/quantization.py), or
//               with group-wise scales [N, K / G]: sum_k x[m, k] * (w[n, k] * scale[n, k / G]);
//   linear_f32: out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]), w float32 [N, K].
// x and out float32 or bf16. A decode step streams every weight from DRAM once, so the weight
// bytes set the time: int8 reads 1 byte per weight instead of 4; float32 is here because
// torch's GEMM (MKL) streams a [<=32, K] x [N, K]^T product at only 4-13 GB/s on an AVX2 EPYC
// where this loop reaches ~20 (benchmarks/RESULTS.md); with the weight packed at load (the
// default, model.prepack) float32 layers take gemm_f32.cpp's outer-product kernel instead,
// which streams as fast at 1-4 rows and stays ahead of MKL where this loop falls behind it
// (past ~16 rows: each weight vector here is reused by only 3 rows, and every output is a
// horizontal sum), so linear_f32 serves unpacked float32 weights only. The arithmetic is
// float32: int8 weights are widened to int32 then float in registers, and every weight vector
// is multiplied into float32 accumulators by FMA. Group-wise scales cannot wait for the end of
// the row, so each weight vector is first multiplied by its group's scale (the bits of
// quantization.dequantize's q * s; one mul per vector, shared by the input rows); G must be a
// multiple of the vector width, so that no vector straddles two groups (else the op declines).
// A micro-kernel takes kRows weight rows x up to kCols input rows, so that each weight vector
// is loaded (and converted) once per kCols rows and the accumulators stay in registers (AVX2:
// 4 x 3 = 12 of the 16 ymm; a group's scale is broadcast from memory per use). Threads split
// the output channels (at::parallel_for), each walking its weight rows front to back. bf16
// activations are widened to float32 once per call (M x K values, in L1/L2). No vector path
// in the build (portable, pre-AVX2): the ops decline and the caller takes torch's path.

#include "common.h"

namespace flotilla {
namespace {

// One vector ISA: the register type and the four operations the micro-kernel needs.
#if FLOTILLA_AVX2
struct Avx2 {
  using V = __m256;
  static constexpr int kWidth = 8;
  static constexpr int kCols = 3;  // 4 x 3 accumulators + a weight + an input vector
  static V zero() { return _mm256_setzero_ps(); }
  static V load_w(const int8_t* p) {  // 8 int8 -> 8 float32
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  }
  static V load_w(const float* p) { return _mm256_loadu_ps(p); }
  static V load_x(const float* p) { return _mm256_loadu_ps(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static float sum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
};
#endif

#if FLOTILLA_AVX512
struct Avx512 {  // (compiled on AVX-512 targets; tested here only by compiling)
  using V = __m512;
  static constexpr int kWidth = 16;
  static constexpr int kCols = 4;  // 16 of the 32 zmm
  static V zero() { return _mm512_setzero_ps(); }
  static V load_w(const int8_t* p) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
  }
  static V load_w(const float* p) { return _mm512_loadu_ps(p); }
  static V load_x(const float* p) { return _mm512_loadu_ps(p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V bcast(const float* p) { return _mm512_set1_ps(*p); }
  static float sum(V v) { return _mm512_reduce_add_ps(v); }
};
#endif

#if FLOTILLA_AVX2 || FLOTILLA_AVX512
constexpr int kRows = 4;  // weight rows per micro-kernel
template <typename W>
constexpr int64_t kLine = 64 / sizeof(W);  // weights per cache line

// Group-wise scales of the weight rows from row n on: row r's scale for columns [g G, g G + G)
// at s[r * ng + g] (kGrouped instantiations only).
struct Groups {
  const float* s = nullptr;
  int64_t ng = 0, G = 0;
  Groups from(int64_t n) const { return {s ? s + n * ng : nullptr, ng, G}; }
};

// dot[r][c] = sum_k w[r * K + k] * x[c * K + k] for R weight rows and C input rows; kGrouped:
// each w[r * K + k] times its group's scale first.
template <class S, int R, int C, bool kGrouped, typename W>
inline void micro(const W* w, const float* x, int64_t K, const Groups& gs,
                  float (&dot)[kRows][4]) {
  using V = typename S::V;
  const int64_t kv = K / S::kWidth * S::kWidth;
  V acc[R][C];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[r][c] = S::zero();
  // (kGrouped) the current group's scales (row r's at sg[r * ng]) and where that group ends,
  // advanced within the one loop over k: with a loop per group GCC kept acc in memory
  const float* sg = gs.s;
  int64_t group_end = gs.G;
  for (int64_t k = 0; k < kv; k += S::kWidth) {
    if constexpr (kGrouped) {
      if (k == group_end) {
        ++sg;
        group_end += gs.G;
      }
    }
    // Each weight row is a short stream (K bytes) and R of them interleave, which the hardware
    // prefetchers follow poorly: one line per row of the next block, requested a block ahead,
    // streams the LM head's 28 MB 1.6x faster at 1-2 rows (a prefetch never faults, so the
    // last block may ask past the end).
    if ((k & (kLine<W> - 1)) == 0)
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(w + (kRows + r) * K + k), _MM_HINT_T0);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      V wv = S::load_w(w + r * K + k);
      if constexpr (kGrouped) wv = S::mul(wv, S::bcast(sg + r * gs.ng));
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) acc[r][c] = S::fma(wv, S::load_x(x + c * K + k), acc[r][c]);
    }
  }
  // (unrolled: with constant indices acc stays in registers; else, with the scale loads
  // above, GCC stored acc to the stack on every k: 1.3-1.5x the time)
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      float s = S::sum(acc[r][c]);
      for (int64_t k = kv; k < K; ++k) {
        float wk = static_cast<float>(w[r * K + k]);
        if constexpr (kGrouped) wk *= gs.s[r * gs.ng + k / gs.G];
        s += wk * x[c * K + k];
      }
      dot[r][c] = s;
    }
}

template <class S, int R, bool kGrouped, typename W>
inline void micro_cols(int C, const W* w, const float* x, int64_t K, const Groups& gs,
                       float (&dot)[kRows][4]) {
  static_assert(S::kCols <= 4, "dot holds up to 4 input rows");
  switch (C) {
    case 1: micro<S, R, 1, kGrouped>(w, x, K, gs, dot); break;
    case 2: micro<S, R, 2, kGrouped>(w, x, K, gs, dot); break;
    case 3: micro<S, R, 3, kGrouped>(w, x, K, gs, dot); break;
    default:
      if constexpr (S::kCols >= 4) micro<S, R, 4, kGrouped>(w, x, K, gs, dot);
  }
}

// scale: one per output row, or nullptr where there is none to apply at the end (float32
// weights; group-wise scales, applied per weight vector: kGrouped, gs)
template <class S, typename T, bool kGrouped = false, typename W>
void linear_small_impl(const at::Tensor& out, const float* x, const W* w, const float* scale,
                       const float* bias, int64_t M, int64_t N, int64_t K,
                       const Groups& gs = {}) {
  using R = Raw<T>;
  auto* op = reinterpret_cast<typename R::type*>(out.data_ptr());
  const int64_t blocks = (N + kRows - 1) / kRows;
  // ~16 KB of weights per task at least: enough to amortise the thread hand-off
  const int64_t grain =
      std::max<int64_t>(1, 16384 / std::max<int64_t>(1, kRows * K * int64_t(sizeof(W))));
  at::parallel_for(0, blocks, grain, [&](int64_t b, int64_t e) {
    float dot[kRows][4];
    for (int64_t blk = b; blk < e; ++blk) {
      const int64_t n0 = blk * kRows;
      const int rows = static_cast<int>(std::min<int64_t>(kRows, N - n0));
      for (int64_t m0 = 0; m0 < M; m0 += S::kCols) {
        const int cols = static_cast<int>(std::min<int64_t>(S::kCols, M - m0));
        const float* xm = x + m0 * K;
        if (rows == kRows) {
          micro_cols<S, kRows, kGrouped>(cols, w + n0 * K, xm, K, gs.from(n0), dot);
        } else {
          for (int r = 0; r < rows; ++r) {  // the last rows of N, one at a time
            float one[kRows][4];
            micro_cols<S, 1, kGrouped>(cols, w + (n0 + r) * K, xm, K, gs.from(n0 + r), one);
            for (int c = 0; c < cols; ++c) dot[r][c] = one[0][c];
          }
        }
        for (int r = 0; r < rows; ++r) {
          const int64_t n = n0 + r;
          const float s = scale ? scale[n] : 1.0f, bn = bias ? bias[n] : 0.0f;
          for (int c = 0; c < cols; ++c) op[(m0 + c) * N + n] = R::store(dot[r][c] * s + bn);
        }
      }
    }
  });
}

// a float32 copy of a float32 / bf16 tensor's values (a view where it is float32 already)
const float* as_float(const at::Tensor& t, std::vector<float>& buf) {
  if (t.scalar_type() == at::kFloat) return t.data_ptr<float>();
  buf.resize(t.numel());
  const auto* p = reinterpret_cast<const uint16_t*>(t.data_ptr());
  for (int64_t i = 0; i < t.numel(); ++i) buf[i] = Raw<c10::BFloat16>::load(p[i]);
  return buf.data();
}
#endif  // FLOTILLA_AVX2 || FLOTILLA_AVX512

bool float_or_bf16(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16;
}

}  // namespace

bool linear_w8(at::Tensor out, const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
               const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && out.dim() == 2 && x.size(1) == w.size(1) &&
                  out.size(0) == x.size(0) && out.size(1) == w.size(0) &&
                  w8_group_size(scales, w.size(0), w.size(1)) >= 0 &&
                  (!bias || bias->numel() == w.size(0)),
              "linear_w8: x [M, K], w [N, K], scales [N] or [N, K / G], bias [N], out [M, N]");
  TORCH_CHECK(w.scalar_type() == at::kChar && scales.scalar_type() == at::kFloat,
              "linear_w8: int8 weights, float32 scales");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && out.is_contiguous() &&
                  scales.is_contiguous() && (!bias || bias->is_contiguous()),
              "linear_w8: contiguous tensors only");
  if (!float_or_bf16(x) || !float_or_bf16(out) || (bias && !float_or_bf16(*bias))) return false;
#if FLOTILLA_AVX2 || FLOTILLA_AVX512
#if FLOTILLA_AVX512
  using S = Avx512;
#else
  using S = Avx2;
#endif
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  const int64_t G = w8_group_size(scales, N, K);
  if (G % S::kWidth != 0) return false;  // a vector would straddle two groups' scales
  std::vector<float> xbuf, bbuf;
  const float* xf = as_float(x, xbuf);
  const float* bf = bias ? as_float(*bias, bbuf) : nullptr;
  const auto* wp = reinterpret_cast<const int8_t*>(w.data_ptr());
  const float* sp = scales.data_ptr<float>();
  const bool f32 = out.scalar_type() == at::kFloat;
  if (G > 0) {  // every weight vector scaled by its group's scale, none left for the end
    const Groups gs{sp, K / G, G};
    if (f32)
      linear_small_impl<S, float, true>(out, xf, wp, nullptr, bf, M, N, K, gs);
    else
      linear_small_impl<S, c10::BFloat16, true>(out, xf, wp, nullptr, bf, M, N, K, gs);
  } else if (f32) {
    linear_small_impl<S, float>(out, xf, wp, sp, bf, M, N, K);
  } else {
    linear_small_impl<S, c10::BFloat16>(out, xf, wp, sp, bf, M, N, K);
  }
  return true;
#else
  return false;  // no vector path in this build: the caller dequantizes and uses torch
#endif
}

bool linear_f32(at::Tensor out, const at::Tensor& x, const at::Tensor& w,
                const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && out.dim() == 2 && x.size(1) == w.size(1) &&
                  out.size(0) == x.size(0) && out.size(1) == w.size(0) &&
                  (!bias || bias->numel() == w.size(0)),
              "linear_f32: x [M, K], w [N, K], bias [N], out [M, N]");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && out.is_contiguous() &&
                  (!bias || bias->is_contiguous()),
              "linear_f32: contiguous tensors only");
  if (w.scalar_type() != at::kFloat || !float_or_bf16(x) || !float_or_bf16(out) ||
      (bias && !float_or_bf16(*bias)))
    return false;
#if FLOTILLA_AVX2 || FLOTILLA_AVX512
#if FLOTILLA_AVX512
  using S = Avx512;
#else
  using S = Avx2;
#endif
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  std::vector<float> xbuf, bbuf;
  const float* xf = as_float(x, xbuf);
  const float* bf = bias ? as_float(*bias, bbuf) : nullptr;
  const float* wp = w.data_ptr<float>();
  if (out.scalar_type() == at::kFloat)
    linear_small_impl<S, float>(out, xf, wp, nullptr, bf, M, N, K);
  else
    linear_small_impl<S, c10::BFloat16>(out, xf, wp, nullptr, bf, M, N, K);
  return true;
#else
  return false;  // no vector path in this build: the caller uses torch's linear
#endif
}

}  // namespace flotilla

TORCH_LIBRARY_IMPL(flotilla, CPU, m) {
  m.impl("linear_w8", &flotilla::linear_w8);
  m.impl("linear_f32", &flotilla::linear_f32);
}
