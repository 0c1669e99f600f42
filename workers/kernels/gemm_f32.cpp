// float32 linear layers on prepacked weights: out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]).
//
// A BLIS-style outer-product GEMM for the decode and prefill batches of a float32 model on a
// CPU whose torch GEMM (MKL on an AVX2 EPYC) reaches only 60-110 GFLOP/s at 16-128 rows.
// The weight is packed once, at load (pack_f32), into panels of kNR output channels, k-major:
// panel p holds w[kNR p + j, k] at [p][k][j], zero-padded past N, so a thread reads its panels
// as one contiguous stream and each weight byte comes from memory once per call. A micro-tile
// of MR rows of x x kNR outputs keeps MR x kNR / width accumulators in registers; per k it
// loads kNR / width weight vectors, broadcasts MR values of x and issues MR x kNR / width FMAs
// (AVX2: MR = 6, kNR = 16: 12 ymm accumulators, 2 weights, 1 broadcast; AVX-512: MR = 12,
// kNR = 32: 24 zmm). Threads claim the panels in chunks (parallel_chunks); within one, long K is
// cut into blocks of ~kKc so that a block of x (rows x block) stays in L2 while the panels'
// blocks stream past it from memory and each panel block (L1) is reused by every row tile; the
// outputs then accumulate in place, a group of panels at a time, so that they stay in L2 too.
// While a panel block is computed, the next panel's block is requested a cache line per k
// (its first row tile; a prefetch never faults), so the weight stream runs ahead of the FMAs.
// Rows past kMc are done kMc at a time (prefill), each pass over the weights from L3 or memory.
// The sums run in k order, one chain per output (bias first), so every row gets the same bits
// whatever the batch. float32 only (x, out, bias); other dtypes, and builds without a vector
// path, decline and the caller takes torch's linear.

#include "common.h"
#include "gemm_f32_tile.h"

#include <memory>

namespace flotilla {
namespace f32gemm {

#if FLOTILLA_AVX2 || FLOTILLA_AVX512
constexpr int64_t kKc = 384;               // k block target: K = 576 in 2 blocks, 1536 in 4
constexpr int64_t kMc = 32 * kMR;          // rows per pass over the weights
constexpr int64_t kOutGroup = 256 * 1024;  // bytes of outputs a thread accumulates at a time

// Rows [m0, m1) of x times panel p over k in [k0, k1): into out directly where the panel's
// columns are all real, else through a kNR-wide buffer (the padded columns are dropped).
// pf: the next panel's block (prefetched during the first row tile), or nullptr.
void panel_rows(const float* x, int64_t K, const float* wpk, int64_t kc, float* out, int64_t N,
                int64_t n0, int64_t m0, int64_t m1, const float* bias, bool first,
                const float* pf) {
  alignas(64) float init[kNR] = {};
  const int64_t cols = std::min<int64_t>(kNR, N - n0);
  if (first && bias)
    for (int64_t j = 0; j < cols; ++j) init[j] = bias[n0 + j];
  for (int64_t m = m0; m < m1; m += kMR) {
    const int rows = static_cast<int>(std::min<int64_t>(kMR, m1 - m));
    const float* fetch = m == m0 ? pf : nullptr;
    if (cols == kNR) {
      tile_rows(rows, x + m * K, K, wpk, kc, out + m * N + n0, N, first ? init : nullptr, fetch);
      continue;
    }
    alignas(64) float buf[kMR * kNR] = {};
    if (!first)
      for (int r = 0; r < rows; ++r)
        std::memcpy(buf + r * kNR, out + (m + r) * N + n0, cols * sizeof(float));
    tile_rows(rows, x + m * K, K, wpk, kc, buf, kNR, first ? init : nullptr, fetch);
    for (int r = 0; r < rows; ++r)
      std::memcpy(out + (m + r) * N + n0, buf + r * kNR, cols * sizeof(float));
  }
}

// The weight as the GEMM reads it: panel p's rows [k0, k0 + kn) as kn x kNR floats, k-major.
// Packed: a pointer into the panels (and the next panel's block to prefetch).
struct PackedPanels {
  static constexpr bool kBuffered = false;
  const float* wp;
  int64_t K;
  const float* block(int64_t p, int64_t k0, int64_t /*kn*/, int64_t /*N*/, float* /*buf*/) const {
    return wp + (p * K + k0) * kNR;
  }
  const float* next(int64_t p, int64_t k0) const { return wp + (p * K + k0) * kNR; }
};

// int8 [N, K] weights with float32 scales, [N] (G = 0) or [N, K / G] (group-wise): each
// block dequantized (q * scale, the bits of workers/quantization.dequantize) into a thread's
// buffer, then reused by every row tile of the pass, so a prefill of M rows converts each
// weight ceil(M / kMc) times, not M times. A block need not start or end on a group: each
// row's run of k is cut where its scale changes.
struct Int8Panels {
  static constexpr bool kBuffered = true;
  const int8_t* q;
  const float* scale;
  int64_t K, G;
  const float* block(int64_t p, int64_t k0, int64_t kn, int64_t N, float* buf) const {
    const int64_t n0 = p * kNR, cols = std::min<int64_t>(kNR, N - n0);
    for (int64_t j = 0; j < cols; ++j) {
      const int8_t* row = q + (n0 + j) * K + k0;
      if (G == 0) {
        const float s = scale[n0 + j];
        for (int64_t k = 0; k < kn; ++k) buf[k * kNR + j] = static_cast<float>(row[k]) * s;
        continue;
      }
      const float* rs = scale + (n0 + j) * (K / G);
      for (int64_t k = 0; k < kn;) {
        const int64_t g = (k0 + k) / G, end = std::min(kn, (g + 1) * G - k0);
        const float s = rs[g];
        for (; k < end; ++k) buf[k * kNR + j] = static_cast<float>(row[k]) * s;
      }
    }
    for (int64_t j = cols; j < kNR; ++j)
      for (int64_t k = 0; k < kn; ++k) buf[k * kNR + j] = 0.f;
    return buf;
  }
  const float* next(int64_t, int64_t) const { return nullptr; }  // (the buffer stays in L1)
};

template <class Panels>
void gemm(float* out, const float* x, const Panels& w, const float* bias, int64_t M, int64_t N,
          int64_t K) {
  const int64_t panels = (N + kNR - 1) / kNR;
  const int64_t kblocks = std::max<int64_t>(1, (K + kKc / 2) / kKc);
  const int64_t kc = (K + kblocks - 1) / kblocks;
  // Panels claimed in chunks (common.h, WorkQueue: a preempted thread holds back one chunk,
  // not half the call): ~4 chunks a thread, each >= ~32 KB of weights to amortise the claim.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, K * kNR * 4));
  const int64_t chunk =
      std::max<int64_t>(grain, panels / std::max<int64_t>(1, 4 * at::get_num_threads()));
  parallel_chunks(panels, chunk, [&](int64_t pb, int64_t pe) {
    // a block's buffer where the panels are made as the pass reaches them (none for packed)
    std::unique_ptr<float[]> buf(Panels::kBuffered ? new float[kc * kNR] : nullptr);
    for (int64_t m0 = 0; m0 < M; m0 += kMc) {
      const int64_t m1 = std::min(M, m0 + kMc);
      const int64_t group =
          kblocks == 1 ? pe - pb : std::max<int64_t>(1, kOutGroup / ((m1 - m0) * kNR * 4));
      for (int64_t g0 = pb; g0 < pe; g0 += group) {
        const int64_t g1 = std::min(pe, g0 + group);
        for (int64_t k0 = 0; k0 < K; k0 += kc) {
          const int64_t kn = std::min(kc, K - k0);
          for (int64_t p = g0; p < g1; ++p) {
            const float* next = p + 1 < g1 ? w.next(p + 1, k0) : nullptr;
            panel_rows(x + k0, K, w.block(p, k0, kn, N, buf.get()), kn, out, N, p * kNR, m0,
                       m1, bias, k0 == 0, next);
          }
        }
      }
    }
  });
}
#endif  // FLOTILLA_AVX2 || FLOTILLA_AVX512

}  // namespace f32gemm

// w [N, K] float32 -> panels [ceil(N / kNR), K, kNR] (zero-padded); an empty tensor where the
// build has no vector path (the caller keeps torch's linear).
at::Tensor pack_f32(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "pack_f32: float32 w [N, K]");
#if FLOTILLA_AVX2 || FLOTILLA_AVX512
  using f32gemm::kNR;
  const at::Tensor wc = w.contiguous();
  const int64_t N = wc.size(0), K = wc.size(1), panels = (N + kNR - 1) / kNR;
  at::Tensor out = wc.new_zeros({panels, K, kNR});
  const float* src = wc.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t pb, int64_t pe) {
    for (int64_t p = pb; p < pe; ++p)
      for (int64_t j = 0; j < std::min<int64_t>(kNR, N - p * kNR); ++j)
        for (int64_t k = 0; k < K; ++k) dst[(p * K + k) * kNR + j] = src[(p * kNR + j) * K + k];
  });
  return out;
#else
  return w.new_empty({0});
#endif
}

bool linear_f32_packed(at::Tensor out, const at::Tensor& x, const at::Tensor& wp,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && wp.dim() == 3 && out.dim() == 2 && x.size(1) == wp.size(1) &&
                  out.size(0) == x.size(0) && wp.size(0) * wp.size(2) >= out.size(1) &&
                  (!bias || bias->numel() == out.size(1)),
              "linear_f32_packed: x [M, K], w_packed [P, K, NR] (P NR >= N), bias [N], "
              "out [M, N]");
  TORCH_CHECK(x.is_contiguous() && wp.is_contiguous() && out.is_contiguous() &&
                  (!bias || bias->is_contiguous()),
              "linear_f32_packed: contiguous tensors only");
  const auto f32 = at::kFloat;
  if (x.scalar_type() != f32 || out.scalar_type() != f32 || wp.scalar_type() != f32 ||
      (bias && bias->scalar_type() != f32))
    return false;
#if FLOTILLA_AVX2 || FLOTILLA_AVX512
  using f32gemm::kNR;
  const int64_t M = x.size(0), N = out.size(1), K = x.size(1);
  if (wp.size(2) != kNR || wp.size(0) != (N + kNR - 1) / kNR) return false;  // another build's
  if (M == 0 || N == 0) return true;
  if (K == 0) {
    if (bias)
      out.copy_(bias->view({1, N}).expand({M, N}));
    else
      out.zero_();
    return true;
  }
  f32gemm::gemm(out.data_ptr<float>(), x.data_ptr<float>(),
                f32gemm::PackedPanels{wp.data_ptr<float>(), K},
                bias ? bias->data_ptr<float>() : nullptr, M, N, K);
  return true;
#else
  return false;  // no vector path in this build: the caller uses torch's linear
#endif
}

// The same GEMM on int8 weights [N, K] with float32 scales, per channel [N] or per group of G
// columns [N, K / G]: out = x (q * scale)^T (+ bias), the product of F.linear on
// workers/quantization.dequantize's weight, for prefill-sized row counts (linear_w8 serves a
// few rows). No packed copy: each panel block is dequantized into a thread's buffer as the pass
// reaches it. float32 x / out / bias only.
bool linear_w8_gemm(at::Tensor out, const at::Tensor& x, const at::Tensor& w,
                    const at::Tensor& scales, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && out.dim() == 2 && x.size(1) == w.size(1) &&
                  out.size(0) == x.size(0) && out.size(1) == w.size(0) &&
                  w8_group_size(scales, w.size(0), w.size(1)) >= 0 &&
                  (!bias || bias->numel() == w.size(0)),
              "linear_w8_gemm: x [M, K], w [N, K], scales [N] or [N, K / G], bias [N], "
              "out [M, N]");
  TORCH_CHECK(w.scalar_type() == at::kChar && scales.scalar_type() == at::kFloat,
              "linear_w8_gemm: int8 weights, float32 scales");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && out.is_contiguous() &&
                  scales.is_contiguous() && (!bias || bias->is_contiguous()),
              "linear_w8_gemm: contiguous tensors only");
  const auto f32 = at::kFloat;
  if (x.scalar_type() != f32 || out.scalar_type() != f32 || (bias && bias->scalar_type() != f32))
    return false;
#if FLOTILLA_AVX2 || FLOTILLA_AVX512
  const int64_t M = x.size(0), N = w.size(0), K = x.size(1);
  if (M == 0 || N == 0) return true;
  if (K == 0) {
    if (bias)
      out.copy_(bias->view({1, N}).expand({M, N}));
    else
      out.zero_();
    return true;
  }
  f32gemm::gemm(out.data_ptr<float>(), x.data_ptr<float>(),
                f32gemm::Int8Panels{w.data_ptr<int8_t>(), scales.data_ptr<float>(), K,
                                    w8_group_size(scales, N, K)},
                bias ? bias->data_ptr<float>() : nullptr, M, N, K);
  return true;
#else
  return false;  // no vector path in this build: the caller dequantizes for torch's linear
#endif
}

}  // namespace flotilla

TORCH_LIBRARY_IMPL(flotilla, CPU, m) {
  m.impl("pack_f32", &flotilla::pack_f32);
  m.impl("linear_f32_packed", &flotilla::linear_f32_packed);
  m.impl("linear_w8_gemm", &flotilla::linear_w8_gemm);
}
