// bf16 linear layers on AMX tiles: out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]).
//
// oneDNN's AMX GEMM streams a decode batch's weights well up to ~32 rows and then turns
// compute-bound on these small shapes (K = 576: its 64-row call on SmolLM2's layers reads the
// weights at ~13 GB/s against ~19 at 32 rows). Here the weight is packed once, at load, as the
// AMX B-tile layout in 32-column panels: panel p, k-block kb holds two 16 x 64-byte tiles,
// row r of tile t = the pairs (w[32p + 16t + c][32kb + 2r], w[..][32kb + 2r + 1]) for c = 0..15,
// so every tile load is one contiguous KB and each thread walks its panels front to back.
// Each 32-row block of x makes a 2 x 2 block of float32 accumulator tiles; the panel's tiles
// are reused from L1 by the next row block. Rounding: float32 sums, bias added in float32,
// one round-to-nearest-even to bf16 at the end by AVX512-BF16's conversion, which flushes
// float32 denormals to zero (oneDNN's order of sums differs, not its rounding).

#include "common.h"

namespace flotilla {

constexpr int64_t kPanel = 32;       // output columns per panel
constexpr int64_t kTileElems = 512;  // 16 rows x 32 bf16

#if FLOTILLA_AMX
namespace {

// While a panel streams in, one plain load per 1 KB tile, kTouchAhead bytes further on in the
// thread's weights (its panels lie back to back), keeps the hardware prefetchers running ahead
// of the tile loads: 30 layers' 64-row linears 5% faster (in-process A/B, 25 of 30 rounds;
// software prefetches did not help, nor touching every line, nor 4 / 8 / 12 KB ahead).
constexpr int64_t kTouchAhead = 16384;

// Two 16-row blocks of x (a0, a1; a1 may equal a0 when only one is live) times one panel.
// touch_end: the end of the thread's panels, to touch ahead up to (nullptr: no touches).
// Tile registers are not renamed: a load into a tile waits until the products reading it are
// done. So each tile is reloaded for the next k-block right after its last product of this
// one, while the other products run (B0 after both rows' B0 products, then A0, A1, B1),
// instead of all four loads at the top of the iteration: the next weight tiles' latency hides
// behind this block's products. 64-row decode linears with their weights streamed from memory
// ~4.5% faster (in-process A/B, 10 of 10 rounds), the 64-row LM head ~5%; same products in
// the same order, so the same bits.
template <bool kTwo>
inline void panel_tiles(const uint16_t* a0, const uint16_t* a1, int64_t lda, const uint16_t* wp,
                        int64_t KB, float* c, const char* touch_end) {
  __m128i touched = _mm_setzero_si128();
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (kTwo) {
    _tile_zero(2);
    _tile_zero(3);
  }
  if (KB > 0) {  // (K = 0: nothing to load, the sums stay zero)
    _tile_loadd(6, wp, 64);
    _tile_loadd(4, a0, lda * 2);
    if constexpr (kTwo) _tile_loadd(5, a1, lda * 2);
    _tile_loadd(7, wp + kTileElems, 64);
  }
  for (int64_t kb = 0; kb < KB; ++kb) {
    const bool more = kb + 1 < KB;
    const uint16_t* bn = wp + (kb + 1) * 2 * kTileElems;  // the next k-block's two tiles
    if (touch_end) {
      const char* t = reinterpret_cast<const char*>(wp + kb * 2 * kTileElems) + kTouchAhead;
      for (int i = 0; i < 2; ++i, t += 2 * kTileElems)  // 1 KB per tile
        if (t < touch_end)
          touched = _mm_xor_si128(touched, _mm_load_si128(reinterpret_cast<const __m128i*>(t)));
    }
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (kTwo) _tile_dpbf16ps(2, 5, 6);
    if (more) _tile_loadd(6, bn, 64);
    _tile_dpbf16ps(1, 4, 7);
    if (more) _tile_loadd(4, a0 + (kb + 1) * 32, lda * 2);
    if constexpr (kTwo) {
      _tile_dpbf16ps(3, 5, 7);
      if (more) _tile_loadd(5, a1 + (kb + 1) * 32, lda * 2);
    }
    if (more) _tile_loadd(7, bn + kTileElems, 64);
  }
  // (the loads' values are never needed; this keeps the compiler from dropping them)
  asm volatile("" : : "x"(touched));
  _tile_stored(0, c, kPanel * 4);
  _tile_stored(1, c + 16, kPanel * 4);
  if constexpr (kTwo) {
    _tile_stored(2, c + 16 * kPanel, kPanel * 4);
    _tile_stored(3, c + 16 * kPanel + 16, kPanel * 4);
  }
}

// The live lanes of a panel's two 16-column halves, columns n0 .. n0+31 clipped to N.
struct PanelMasks {
  __mmask16 lo, hi;
  PanelMasks(int64_t n0, int64_t N) {
    const int64_t cols = std::min<int64_t>(kPanel, N - n0);
    lo = cols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << cols) - 1);
    hi = cols >= 32 ? 0xFFFF : cols > 16 ? static_cast<__mmask16>((1u << (cols - 16)) - 1) : 0;
  }
};

// float32 -> nearest-even bf16 -> float32 by AVX512-BF16's conversion (the rounding the
// epilogues store with)
inline __m512 round_bf16(__m512 v) { return _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(v)); }

// rows of c (float32, 32 wide) -> out (bf16, row stride ldo), columns n0 .. n0 + 31 clipped to N
inline void store_rows(uint16_t* out, int64_t ldo, const float* c, int64_t rows, int64_t n0,
                       int64_t N, const float* bias) {
  const PanelMasks pm(n0, N);
  const __mmask16 m0 = pm.lo, m1 = pm.hi;
  const __mmask32 m01 = static_cast<__mmask32>(m0) | (static_cast<__mmask32>(m1) << 16);
  __m512 b0 = _mm512_setzero_ps(), b1 = b0;
  if (bias) {
    b0 = _mm512_maskz_loadu_ps(m0, bias + n0);
    b1 = _mm512_maskz_loadu_ps(m1, bias + n0 + 16);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float* cr = c + r * kPanel;
    uint16_t* o = out + r * ldo + n0;
    const __m512 v0 = bias ? _mm512_add_ps(_mm512_loadu_ps(cr), b0) : _mm512_loadu_ps(cr);
    const __m512 v1 = bias ? _mm512_add_ps(_mm512_loadu_ps(cr + 16), b1) : _mm512_loadu_ps(cr + 16);
    // one instruction rounds both halves to nearest-even bf16 (AVX512-BF16)
    const __m512i h = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(v1, v0));
    _mm512_mask_storeu_epi16(o, m01, h);
  }
}

// Gate|up panels (amx_pack_swiglu: tile 0 = gate columns n0 .. n0+15, tile 1 = the same up
// columns): out[r, n0 .. n0+15] = bf16(silu(bf16(gate))) * bf16(up), rounded -- the module
// path's gate_up linear and silu_and_mul, bit for bit, without writing gate|up out.
inline void store_rows_swiglu(uint16_t* out, int64_t ldo, const float* c, int64_t rows,
                              int64_t n0) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* cr = c + r * kPanel;
    const __m512 g = round_bf16(_mm512_loadu_ps(cr)), u = round_bf16(_mm512_loadu_ps(cr + 16));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * ldo + n0),
                        reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(silu_mul16(g, u))));
  }
}

// Greedy sampling without the logits: each row's columns n0 .. n0+31 (clipped to N), rounded
// to bf16 as store_rows rounds them, against the row's best so far. Strictly greater wins, so
// on ties the earlier column stays (panels arrive in column order); NaN never wins -- what
// argmax_rows picks from the stored logits.
inline void argmax_rows_panel(const float* c, int64_t rows, int64_t n0, int64_t N, float* best,
                              int64_t* idx) {
  const PanelMasks pm(n0, N);
  const __mmask16 m0 = pm.lo, m1 = pm.hi;
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  for (int64_t r = 0; r < rows; ++r) {
    const float* cr = c + r * kPanel;
    __m512 a = round_bf16(_mm512_loadu_ps(cr)), b = round_bf16(_mm512_loadu_ps(cr + 16));
    a = _mm512_mask_mov_ps(ninf, m0 & _mm512_cmp_ps_mask(a, a, _CMP_ORD_Q), a);
    b = _mm512_mask_mov_ps(ninf, m1 & _mm512_cmp_ps_mask(b, b, _CMP_ORD_Q), b);
    const float mx = _mm512_reduce_max_ps(_mm512_max_ps(a, b));
    if (!(mx > best[r])) continue;
    const __m512 vm = _mm512_set1_ps(mx);
    const uint32_t ka = _mm512_cmp_ps_mask(a, vm, _CMP_EQ_OQ);
    best[r] = mx;
    idx[r] = n0 + (ka ? __builtin_ctz(ka)
                      : 16 + __builtin_ctz(static_cast<uint32_t>(_mm512_cmp_ps_mask(b, vm, _CMP_EQ_OQ))));
  }
}

}  // namespace
#endif

// x [M, K] contiguous bf16; wp the packed weight [ceil(N/32), ceil(K/32), 2, 16, 32] bf16;
// bias None or [N] float32; out [M, N] contiguous bf16. False (nothing written) when this
// CPU or build has no AMX.
namespace {
enum Epilogue { kLinear, kSwiglu, kArgmax };
// kArgmax: out [M] int64 receives each row's argmax over the first n_argmax columns
template <Epilogue kMode>
bool amx_gemm(at::Tensor out, const at::Tensor& x, const at::Tensor& wp,
              const c10::optional<at::Tensor>& bias, int64_t n_argmax = 0) {
  TORCH_CHECK(x.dim() == 2 && out.dim() == (kMode == kArgmax ? 1 : 2) && wp.dim() == 5 &&
                  out.size(0) == x.size(0),
              "amx_linear: x [M, K], packed w [N/32, K/32, 2, 16, 32], out [M, N] (argmax: [M])");
  // swiglu: out [M, I] from the 2I packed gate|up columns
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t N = kMode == kSwiglu ? 2 * out.size(1) : kMode == kArgmax ? n_argmax : out.size(1);
  TORCH_CHECK(kMode != kArgmax || (N > 0 && N < (int64_t{1} << 31) && !(bias && bias->defined())),
              "amx_argmax: 0 < n < 2^31 columns, no bias");
  TORCH_CHECK(kMode != kSwiglu || out.size(1) % 16 == 0,
              "amx_swiglu: out width must be a multiple of 16");
  const int64_t KB = (K + 31) / 32, P = (N + kPanel - 1) / kPanel;
  TORCH_CHECK(wp.size(0) == P && wp.size(1) == KB && wp.size(2) == 2 && wp.size(3) == 16 &&
                  wp.size(4) == 32,
              "amx_linear: packed weight ", wp.sizes(), " does not match K=", K, ", N=", N);
  TORCH_CHECK(x.is_contiguous() && wp.is_contiguous() && out.is_contiguous() &&
                  x.scalar_type() == at::kBFloat16 && wp.scalar_type() == at::kBFloat16 &&
                  out.scalar_type() == (kMode == kArgmax ? at::kLong : at::kBFloat16),
              "amx_linear: contiguous bfloat16 tensors only (argmax: int64 out)");
  const float* bp = nullptr;
  if (bias && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous() &&
                    bias->scalar_type() == at::kFloat,
                "amx_linear: bias must be a contiguous float32 [N]");
    bp = bias->data_ptr<float>();
  }
#if FLOTILLA_AMX
  if (!amx_ready()) return false;
  if (M == 0) return true;
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* wpp = reinterpret_cast<const uint16_t*>(wp.data_ptr());
  auto* op = kMode == kArgmax ? nullptr : reinterpret_cast<uint16_t*>(out.data_ptr());
  // Rows are read 32 k at a time: a K that is not a multiple of 32, or a last block of fewer
  // than 16 / 32 rows, reads from a zero-padded copy instead of past the end of x.
  const int64_t Kp = KB * 32;
  const int64_t full = K == Kp ? M / 32 * 32 : 0;  // rows read straight from x
  const int64_t rest = M - full, rest_p = (rest + 15) / 16 * 16;
  std::vector<uint16_t> tail(static_cast<size_t>(rest_p * Kp), 0);
  for (int64_t r = 0; r < rest; ++r)
    std::memcpy(tail.data() + r * Kp, xp + (full + r) * K, K * sizeof(uint16_t));
  // 32-row blocks of x: (rows, lda, first row); a few at a time (kChunk rows) so that the
  // block's rows stay in L2 while the thread's panels stream past them
  struct Block {
    const uint16_t* a;
    int64_t lda, row, rows;
  };
  std::vector<Block> blocks;
  for (int64_t m = 0; m < full; m += 32) blocks.push_back({xp + m * K, K, m, 32});
  for (int64_t m = 0; m < rest; m += 32)
    blocks.push_back({tail.data() + m * Kp, Kp, full + m, std::min<int64_t>(32, rest - m)});
  constexpr int64_t kChunk = 8;
  const int64_t nb = static_cast<int64_t>(blocks.size());
  // argmax: each chunk of panels keeps its rows' best (value, column); merged in column order
  struct Best {
    int64_t p0 = -1;
    std::vector<float> val;
    std::vector<int64_t> col;
  };
  std::vector<Best> bests(kMode == kArgmax ? at::get_num_threads() : 0);
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    float* bv = nullptr;
    int64_t* bc = nullptr;
    if constexpr (kMode == kArgmax) {
      Best& b = bests[at::get_thread_num()];
      b.p0 = p0;
      b.val.assign(M, -INFINITY);
      b.col.assign(M, 0);
      bv = b.val.data(), bc = b.col.data();
    }
    amx_config_16x64();
    alignas(64) float c[32 * kPanel];
    const char* wend = reinterpret_cast<const char*>(wpp + p1 * KB * 2 * kTileElems);
    for (int64_t b0 = 0; b0 < nb; b0 += kChunk) {
      const int64_t b1 = std::min(nb, b0 + kChunk);
      for (int64_t p = p0; p < p1; ++p) {
        const uint16_t* w = wpp + p * KB * 2 * kTileElems;
        for (int64_t b = b0; b < b1; ++b) {
          const Block& blk = blocks[b];
          const char* touch = b == b0 ? wend : nullptr;  // the panel's first pass streams it
          if (blk.rows > 16)
            panel_tiles<true>(blk.a, blk.a + 16 * blk.lda, blk.lda, w, KB, c, touch);
          else
            panel_tiles<false>(blk.a, blk.a, blk.lda, w, KB, c, touch);
          if constexpr (kMode == kSwiglu)
            store_rows_swiglu(op + blk.row * (N / 2), N / 2, c, blk.rows, p * 16);
          else if constexpr (kMode == kArgmax)
            argmax_rows_panel(c, blk.rows, p * kPanel, N, bv + blk.row, bc + blk.row);
          else
            store_rows(op + blk.row * N, N, c, blk.rows, p * kPanel, N, bp);
        }
      }
    }
    _tile_release();
  });
  if constexpr (kMode == kArgmax) {
    std::sort(bests.begin(), bests.end(), [](const Best& a, const Best& b) { return a.p0 < b.p0; });
    int64_t* o = out.data_ptr<int64_t>();
    for (int64_t r = 0; r < M; ++r) {
      float v = -INFINITY;
      int64_t col = 0;
      for (const Best& b : bests)
        if (b.p0 >= 0 && b.val[r] > v) v = b.val[r], col = b.col[r];
      o[r] = col;
    }
  }
  return true;
#else
  (void)M, (void)bp;  // checked above all the same: a bad call fails on every build
  return false;
#endif
}
}  // namespace

bool amx_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& wp,
                const c10::optional<at::Tensor>& bias) {
  return amx_gemm<kLinear>(out, x, wp, bias);
}

// out [M, I] = bf16(silu(x Wg^T)) * (x Wu^T) rounded, for gate|up packed by amx_pack_swiglu.
bool amx_swiglu(at::Tensor out, const at::Tensor& x, const at::Tensor& wp) {
  return amx_gemm<kSwiglu>(out, x, wp, c10::nullopt);
}

// out [M] int64 = argmax_rows(amx_linear(x, w)[:, :n]) without writing the [M, n] logits: the
// greedy LM head (64 x 49,152 logits are 6 MB written and read back per decode step).
bool amx_argmax(at::Tensor out, const at::Tensor& x, const at::Tensor& wp, int64_t n) {
  return amx_gemm<kArgmax>(out, x, wp, c10::nullopt, n);
}

}  // namespace flotilla

TORCH_LIBRARY_IMPL(flotilla, CPU, m) {
  m.impl("amx_linear", &flotilla::amx_linear);
  m.impl("amx_swiglu", &flotilla::amx_swiglu);
  m.impl("amx_argmax", &flotilla::amx_argmax);
}
