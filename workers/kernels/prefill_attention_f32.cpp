// paged_prefill_attention for float32 (AVX2+FMA or AVX-512 builds; paged_prefill_attention in
// prefill_attention.cpp hands float32 here): same layout and visibility rules as the bf16
// kernel there. Without it a float32 model's prefill chunks took torch's SDPA one chunk at a
// time, each after gathering its context out of the cache.
//
// Both products run on the packed float32 GEMM's register tile (gemm_f32_tile.h). A task is
// (chunk, KV head, span of up to kSpan positions): it packs the keys its rows can see as
// k-major panels of kNR keys ([key panel][D][kNR]) and the values as panels of kNR dims
// ([D / kNR][key][kNR]), then, kInner positions x G query heads at a time: scores = Q K^T
// (queries pre-scaled), an exact softmax per row over its visible keys (float32, invisible
// keys 0), out = P V / sum. The sums run in float32 in key order; the result matches SDPA's
// to float32 rounding, not bit for bit. Head dims that are not a multiple of kNR decline.
#include "common.h"
#include "gemm_f32_tile.h"

namespace flotilla {

#if FLOTILLA_AVX2 || FLOTILLA_AVX512
namespace f32prefill {  // (named: the kernel-target test compiles every source in one unit)

using f32gemm::kMR;
using f32gemm::kNR;
using f32gemm::tile_rows;

constexpr int64_t kSpan = 128;  // positions per task: its keys are packed once
constexpr int64_t kInner = 32;  // positions per score block (x G rows; the block stays in L2)

struct Task {
  int64_t chunk, head, p0, p1, cost;
};

struct Scratch {
  std::vector<float> kpack, vpack, q, s, o, l;
};

void run_task(const Task& tk, float* out, const float* q, const float* kc, const float* vc,
              const int32_t* table, const int32_t* qs, const int32_t* sp, int64_t H, int64_t KVH,
              int64_t D, int64_t bs, float scale, int64_t window, Scratch& s) {
  const int64_t G = H / KVH, h = tk.head, s0 = sp[tk.chunk], q0 = qs[tk.chunk];
  const int64_t row_stride = KVH * D;
  // keys [k0, k1) are visible to some position of the task
  const int64_t k1 = s0 + tk.p1;
  const int64_t k0 = window > 0 ? std::max<int64_t>(0, s0 + tk.p0 - window + 1) : 0;
  const int64_t L = k1 - k0, LP = (L + kNR - 1) / kNR * kNR, DP = D / kNR;
  s.kpack.assign(LP * D, 0.0f);
  s.vpack.assign(DP * LP * kNR, 0.0f);
  for (int64_t t = 0; t < L; ++t) {
    const int64_t pos = k0 + t;
    const int64_t off = (static_cast<int64_t>(table[pos / bs]) * bs + pos % bs) * row_stride + h * D;
    float* kt = s.kpack.data() + (t / kNR) * D * kNR + t % kNR;
    for (int64_t d = 0; d < D; ++d) kt[d * kNR] = kc[off + d];
    for (int64_t dp = 0; dp < DP; ++dp)
      std::memcpy(s.vpack.data() + (dp * LP + t) * kNR, vc + off + dp * kNR, kNR * sizeof(float));
  }
  alignas(64) float zeros[kNR] = {};
  for (int64_t b0 = tk.p0; b0 < tk.p1; b0 += kInner) {
    const int64_t b1 = std::min(tk.p1, b0 + kInner), rows = (b1 - b0) * G;
    // this block's rows see keys [k0, kb) at most: their panels only
    const int64_t kb = s0 + b1 - k0, KP = (kb + kNR - 1) / kNR * kNR;
    s.q.resize(rows * D);
    for (int64_t p = b0; p < b1; ++p) {
      const float* src = q + ((q0 + p) * H + h * G) * D;
      float* dst = s.q.data() + (p - b0) * G * D;
#pragma omp simd
      for (int64_t e = 0; e < G * D; ++e) dst[e] = src[e] * scale;
    }
    s.s.resize(rows * KP);
    for (int64_t kp = 0; kp < KP / kNR; ++kp)
      for (int64_t m = 0; m < rows; m += kMR)
        tile_rows(static_cast<int>(std::min<int64_t>(kMR, rows - m)), s.q.data() + m * D, D,
                  s.kpack.data() + kp * D * kNR, D, s.s.data() + m * KP + kp * kNR, KP, zeros,
                  nullptr);
    s.l.resize(rows);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t pos = s0 + b0 + r / G;  // row r: position b0 + r / G, head r % G
      const int64_t lo = window > 0 ? std::max<int64_t>(k0, pos - window + 1) - k0 : 0;
      const int64_t hi = pos + 1 - k0;
      float* sr = s.s.data() + r * KP;
      float m = -INFINITY;
#pragma omp simd reduction(max : m)
      for (int64_t t = lo; t < hi; ++t) m = sr[t] > m ? sr[t] : m;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t t = lo; t < hi; ++t) {
        const float e = exp_nonpos(sr[t] - m);
        sr[t] = e;
        sum += e;
      }
      std::fill(sr, sr + lo, 0.0f);
      std::fill(sr + hi, sr + KP, 0.0f);
      s.l[r] = sum;
    }
    s.o.resize(rows * D);
    for (int64_t dp = 0; dp < DP; ++dp)
      for (int64_t m = 0; m < rows; m += kMR) {
        // a tile's last row sees the most keys: sum over those only (the rest are 0)
        const int64_t mr = std::min<int64_t>(kMR, rows - m);
        const int64_t kn = s0 + b0 + (m + mr - 1) / G + 1 - k0;
        tile_rows(static_cast<int>(mr), s.s.data() + m * KP, KP, s.vpack.data() + dp * LP * kNR,
                  kn, s.o.data() + m * D + dp * kNR, D, zeros, nullptr);
      }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t p = b0 + r / G, g = r % G;
      float* dst = out + ((q0 + p) * H + h * G + g) * D;
      const float inv = 1.0f / s.l[r];
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) dst[d] = s.o[r * D + d] * inv;
    }
  }
}

}  // namespace f32prefill
#endif

bool prefill_attention_f32(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& block_tables,
                           const at::Tensor& q_starts, const at::Tensor& q_lens,
                           const at::Tensor& start_pos, double scale, int64_t window) {
#if FLOTILLA_AVX2 || FLOTILLA_AVX512
  const int64_t C = q_starts.size(0), H = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), KVH = k_cache.size(2), max_blocks = block_tables.size(1);
  using f32prefill::kSpan;
  using f32prefill::Task;
  if (D % f32gemm::kNR != 0) return false;
  const int32_t* qs = q_starts.data_ptr<int32_t>();
  const int32_t* ql = q_lens.data_ptr<int32_t>();
  const int32_t* sp = start_pos.data_ptr<int32_t>();
  std::vector<Task> tasks;
  for (int64_t c = 0; c < C; ++c)
    for (int64_t p0 = 0; p0 < ql[c]; p0 += kSpan) {
      const int64_t p1 = std::min<int64_t>(ql[c], p0 + kSpan);
      int64_t keys = sp[c] + p1;
      if (window > 0) keys = std::min<int64_t>(keys, window + p1 - p0);
      for (int64_t h = 0; h < KVH; ++h) tasks.push_back({c, h, p0, p1, (keys + 64) * (p1 - p0)});
    }
  std::vector<int64_t> costs(tasks.size());
  for (size_t i = 0; i < tasks.size(); ++i) costs[i] = tasks[i].cost;
  const auto bins = balance_by_cost(costs);  // longest first onto the least loaded thread
  float* op = out.data_ptr<float>();
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  at::parallel_for(0, static_cast<int64_t>(bins.size()), 1, [&](int64_t begin, int64_t end) {
    f32prefill::Scratch s;
    for (int64_t b = begin; b < end; ++b)
      for (const int64_t t : bins[b]) {
        const Task& tk = tasks[t];
        f32prefill::run_task(tk, op, qp, kp, vp, tables + tk.chunk * max_blocks, qs, sp, H, KVH, D, bs,
                 static_cast<float>(scale), window, s);
      }
  });
  return true;
#else
  (void)out;
  (void)q;
  (void)k_cache;
  (void)v_cache;
  (void)block_tables;
  (void)q_starts;
  (void)q_lens;
  (void)start_pos;
  (void)scale;
  (void)window;
  return false;  // no vector path in this build: the caller runs SDPA
#endif
}

}  // namespace flotilla
