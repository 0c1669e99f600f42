// Native CPU kernels of the model's hot path, registered as torch ops `flotilla::*`.
//
// Elementwise kernels (rms_norm, fused_add_rms_norm, rotary_embedding, silu_and_mul) reproduce
// torch's own rounding step by step: every intermediate that the eager torch code stores in the
// model dtype (bf16/fp16) is rounded to it here too, so outputs match the eager path exactly up
// to float32 summation order (the AVX-512 SiLU's exp differs from torch's in the last float32
// bits, which survive the bf16 rounding in a handful of elements). Built with
// -ffp-contract=off for the same reason. Also here: the greedy row argmax, the KV-cache write
// and the small-batch bf16 GEMV.
//
// This file also declares the `flotilla::` op schemas of this library (the CPU implementations
// live in this file and its siblings; the shared-memory collectives are parallel/kernels', a
// library of their own that adds its ops to the same namespace).
#include "common.h"

namespace flotilla {

// ---- elementwise -----------------------------------------------------------------------------

template <typename F>
void for_rows(int64_t rows, int64_t cost_per_row, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, cost_per_row));
  at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) f(r);
  });
}

// out = weight * to_dtype(x * rsqrt(mean(x^2) + eps)), x in float32 (transformers' LlamaRMSNorm).
// With `residual`: first residual = to_dtype(residual + x) (in place), then the norm of it into x.
template <typename T>
void rms_norm_impl(const at::Tensor& out, const at::Tensor& x, const at::Tensor* residual,
                   const at::Tensor& weight, double eps_d) {
  using R = Raw<T>;
  using raw_t = typename R::type;
  const int64_t H = x.size(-1), rows = x.numel() / std::max<int64_t>(H, 1);
  const float eps = static_cast<float>(eps_d);
  raw_t* xp = reinterpret_cast<raw_t*>(x.data_ptr());
  raw_t* op = reinterpret_cast<raw_t*>(out.data_ptr());
  raw_t* rp = residual ? reinterpret_cast<raw_t*>(residual->data_ptr()) : nullptr;
  const raw_t* wp = reinterpret_cast<const raw_t*>(weight.data_ptr());
#if FLOTILLA_AVX512
  if constexpr (std::is_same<T, c10::BFloat16>::value) {
    if (H % 16 == 0) {  // explicit vectors: the generic loop below runs ~1.3 cycles per element
      for_rows(rows, H, [&](int64_t r) {
        uint16_t* xr = xp + r * H;
        const uint16_t* src = xr;
        __m512 ss = _mm512_setzero_ps();
        if (rp) {
          uint16_t* res = rp + r * H;
          for (int64_t i = 0; i < H; i += 16) {
            const __m512 v = bf16x16_round_fast(_mm512_add_ps(bf16x16_load(res + i), bf16x16_load(xr + i)));
            bf16x16_store_exact(res + i, v);
            ss = _mm512_add_ps(ss, _mm512_mul_ps(v, v));
          }
          src = res;
        } else {
          for (int64_t i = 0; i < H; i += 16) {
            const __m512 v = bf16x16_load(src + i);
            ss = _mm512_add_ps(ss, _mm512_mul_ps(v, v));
          }
        }
        const float inv =
            1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(H) + eps);
        const __m512 vinv = _mm512_set1_ps(inv);
        uint16_t* orow = op + r * H;
        for (int64_t i = 0; i < H; i += 16) {
          const __m512 y = bf16x16_round_fast(_mm512_mul_ps(bf16x16_load(src + i), vinv));
          bf16x16_store_fast(orow + i, _mm512_mul_ps(bf16x16_load(wp + i), y));
        }
      });
      return;
    }
  }
#endif
  for_rows(rows, H, [&](int64_t r) {
    raw_t* xr = xp + r * H;
    raw_t* orow = op + r * H;
    const raw_t* src = xr;
    if (rp) {
      raw_t* res = rp + r * H;
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) res[i] = R::store(R::load(res[i]) + R::load(xr[i]));
      src = res;
    }
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < H; ++i) {
      const float v = R::load(src[i]);
      ss += v * v;
    }
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(H) + eps);
#pragma omp simd
    for (int64_t i = 0; i < H; ++i)
      orow[i] = R::store(R::load(wp[i]) * rnd<T>(R::load(src[i]) * inv));
  });
}

// One rotary head: dst = src*cos + rotate_half(src)*sin, each product rounded to the dtype like
// the eager code; src and dst may be the same row (each i reads and writes only i, i + half).
template <typename T>
inline void rope_head(typename Raw<T>::type* dst, const typename Raw<T>::type* src,
                      const typename Raw<T>::type* c, const typename Raw<T>::type* s,
                      int64_t half) {
  using R = Raw<T>;
  int64_t i0 = 0;
#if FLOTILLA_AVX512
  if constexpr (std::is_same<T, c10::BFloat16>::value) {
    // the same products, roundings and sums 16 lanes at a time (the loop below vectorizes
    // poorly around its scalar rounding): bit-identical
    for (; i0 + 16 <= half; i0 += 16) {
      const __m512 a = bf16x16_load(src + i0), b = bf16x16_load(src + i0 + half);
      const __m512 nb = _mm512_castsi512_ps(  // -b, signed zeros included
          _mm512_xor_si512(_mm512_castps_si512(b), _mm512_set1_epi32(static_cast<int>(0x80000000u))));
      const __m512 lo =
          _mm512_add_ps(bf16x16_round_fast(_mm512_mul_ps(a, bf16x16_load(c + i0))),
                        bf16x16_round_fast(_mm512_mul_ps(nb, bf16x16_load(s + i0))));
      const __m512 hi =
          _mm512_add_ps(bf16x16_round_fast(_mm512_mul_ps(b, bf16x16_load(c + i0 + half))),
                        bf16x16_round_fast(_mm512_mul_ps(a, bf16x16_load(s + i0 + half))));
      bf16x16_store_fast(dst + i0, lo);
      bf16x16_store_fast(dst + i0 + half, hi);
    }
  }
#endif
#pragma omp simd
  for (int64_t i = i0; i < half; ++i) {
    const float a = R::load(src[i]), b = R::load(src[i + half]);
    const float lo = rnd<T>(a * R::load(c[i])) + rnd<T>(-b * R::load(s[i]));
    const float hi = rnd<T>(b * R::load(c[i + half])) + rnd<T>(a * R::load(s[i + half]));
    dst[i] = R::store(lo);
    dst[i + half] = R::store(hi);
  }
}

// Rotate-half rotary embedding, in place on x [T, heads, D] (token stride free, heads and dims
// contiguous). cos/sin [T, D] in x's dtype.
template <typename T>
void rotary_impl(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  using raw_t = typename Raw<T>::type;
  const int64_t Tn = x.size(0), heads = x.size(1), D = x.size(2), half = D / 2;
  const int64_t ts = x.stride(0);
  raw_t* xp = reinterpret_cast<raw_t*>(x.data_ptr());
  const raw_t* cp = reinterpret_cast<const raw_t*>(cos.data_ptr());
  const raw_t* sp = reinterpret_cast<const raw_t*>(sin.data_ptr());
  for_rows(Tn, heads * D, [&](int64_t t) {
    const raw_t* c = cp + t * D;
    const raw_t* s = sp + t * D;
    for (int64_t h = 0; h < heads; ++h) {
      raw_t* v = xp + t * ts + h * D;
      rope_head<T>(v, v, c, s, half);
    }
  });
}

// The step between the QKV projection and attention in one pass over qkv [T, (H + 2 KVH) D]:
// q rotated into q_out [T, H, D] (contiguous, the attention kernels' layout), k rotated and v
// copied into the paged caches at slots[t]. Bit-identical to rotary_embedding on q and k,
// write_kv_cache and q.contiguous(); every slot is checked before anything is written.
template <typename T>
void rope_qkv_impl(const at::Tensor& q_out, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                   const int64_t* slots) {
  using raw_t = typename Raw<T>::type;
  const int64_t Tn = qkv.size(0), H = q_out.size(1), D = q_out.size(2);
  const int64_t KVH = k_cache.size(2), half = D / 2, row = KVH * D;
  const int64_t ld = qkv.stride(0);
  const raw_t* x = reinterpret_cast<const raw_t*>(qkv.data_ptr());
  raw_t* qo = reinterpret_cast<raw_t*>(q_out.data_ptr());
  raw_t* kc = reinterpret_cast<raw_t*>(k_cache.data_ptr());
  raw_t* vc = reinterpret_cast<raw_t*>(v_cache.data_ptr());
  const raw_t* cp = reinterpret_cast<const raw_t*>(cos.data_ptr());
  const raw_t* sp = reinterpret_cast<const raw_t*>(sin.data_ptr());
  for_rows(Tn, (H + 2 * KVH) * D, [&](int64_t t) {
    const raw_t* xr = x + t * ld;
    const raw_t* c = cp + t * D;
    const raw_t* s = sp + t * D;
    for (int64_t h = 0; h < H; ++h) rope_head<T>(qo + (t * H + h) * D, xr + h * D, c, s, half);
    raw_t* kd = kc + slots[t] * row;
    for (int64_t h = 0; h < KVH; ++h) rope_head<T>(kd + h * D, xr + (H + h) * D, c, s, half);
    std::memcpy(vc + slots[t] * row, xr + (H + KVH) * D, row * sizeof(raw_t));
  });
}

void rope_qkv_cache(at::Tensor q_out, at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& qkv,
                    const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& slots) {
  TORCH_CHECK(q_out.dim() == 3 && q_out.is_contiguous() && q_out.size(2) % 2 == 0,
              "rope_qkv_cache: q_out must be contiguous [T, H, D], D even");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() &&
                  v_cache.is_contiguous() && k_cache.size(3) == q_out.size(2),
              "rope_qkv_cache: caches [blocks, block_size, KVH, D], contiguous");
  const int64_t T = q_out.size(0), H = q_out.size(1), KVH = k_cache.size(2), D = q_out.size(2);
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(0) == T && qkv.size(1) == (H + 2 * KVH) * D &&
                  qkv.stride(1) == 1,
              "rope_qkv_cache: qkv must be [T, (H + 2 KVH) D] with contiguous rows");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.dim() == 2 && cos.size(0) == T &&
                  cos.size(1) == D && sin.sizes() == cos.sizes(),
              "rope_qkv_cache: cos/sin must be contiguous [T, D]");
  const auto dt = q_out.scalar_type();
  TORCH_CHECK(qkv.scalar_type() == dt && k_cache.scalar_type() == dt &&
                  v_cache.scalar_type() == dt && cos.scalar_type() == dt && sin.scalar_type() == dt,
              "rope_qkv_cache: q_out, qkv, the caches and cos/sin must share a dtype");
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == T && slots.scalar_type() == at::kLong &&
                  slots.is_contiguous(),
              "rope_qkv_cache: slots [T] int64");
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(sl[t] >= 0 && sl[t] < num_slots, "rope_qkv_cache: slot ", sl[t],
                " outside the cache's ", num_slots, " slots");
  FLOTILLA_DISPATCH(dt, "rope_qkv_cache",
                    rope_qkv_impl<scalar_t>(q_out, k_cache, v_cache, qkv, cos, sin, sl));
}

// out[t] = to_dtype(silu(gate)) * up for x[t] = [gate | up] (transformers' LlamaMLP).
template <typename T>
void silu_and_mul_impl(const at::Tensor& out, const at::Tensor& x) {
  using R = Raw<T>;
  using raw_t = typename R::type;
  const int64_t n = out.size(-1), rows = out.numel() / std::max<int64_t>(n, 1);
  const raw_t* xp = reinterpret_cast<const raw_t*>(x.data_ptr());
  raw_t* op = reinterpret_cast<raw_t*>(out.data_ptr());
  for_rows(rows, n, [&](int64_t r) {
    const raw_t* g = xp + r * 2 * n;
    const raw_t* u = g + n;
    raw_t* o = op + r * n;
    int64_t i0 = 0;
#if FLOTILLA_AVX512
    if constexpr (std::is_same<T, c10::BFloat16>::value) {
      for (; i0 + 16 <= n; i0 += 16) {
        bf16x16_store_fast(o + i0, silu_mul16(bf16x16_load(g + i0), bf16x16_load(u + i0)));
      }
    }
#endif
#if FLOTILLA_AVX2
    // float32: the loop below does not vectorize (its exp): 8 lanes of the same formula
    if constexpr (std::is_same<T, float>::value) {
      const __m256 one = _mm256_set1_ps(1.0f), hi = _mm256_set1_ps(88.0f);
      for (; i0 + 8 <= n; i0 += 8) {
        const __m256 a = _mm256_loadu_ps(g + i0);
        const __m256 e = exp256(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), a), hi));
        const __m256 silu = _mm256_div_ps(a, _mm256_add_ps(one, e));
        _mm256_storeu_ps(o + i0, _mm256_mul_ps(silu, _mm256_loadu_ps(u + i0)));
      }
    }
#endif
#pragma omp simd
    for (int64_t i = i0; i < n; ++i) {
      const float a = R::load(g[i]);
      const float silu = a / (1.0f + exp_nonpos(-a));
      o[i] = R::store(rnd<T>(silu) * R::load(u[i]));
    }
  });
}

// out[r] = the index of the first maximum of row r of x [rows, V] (NaN never wins; a row of
// NaNs gives 0). bf16 rows are compared as they are: widening to float32 is exact, so this is
// torch's argmax of x.float() without writing the float copy.
template <typename T>
int64_t argmax_row(const typename Raw<T>::type* x, int64_t V) {
  float best = -INFINITY;
  int64_t idx = 0, i = 0;
#if FLOTILLA_AVX512
  if constexpr (std::is_same<T, c10::BFloat16>::value || std::is_same<T, float>::value) {
    if (V >= 16) {
      __m512 bv = _mm512_set1_ps(-INFINITY);
      __m512i bi = _mm512_setzero_si512(), cur = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9,
                                                                   10, 11, 12, 13, 14, 15);
      const __m512i step = _mm512_set1_epi32(16);
      for (; i + 16 <= V; i += 16, cur = _mm512_add_epi32(cur, step)) {
        __m512 v;
        if constexpr (std::is_same<T, float>::value) v = _mm512_loadu_ps(x + i);
        else v = bf16x16_load(x + i);
        const __mmask16 m = _mm512_cmp_ps_mask(v, bv, _CMP_GT_OQ);  // strict: earliest per lane
        bv = _mm512_mask_mov_ps(bv, m, v);
        bi = _mm512_mask_mov_epi32(bi, m, cur);
      }
      alignas(64) float vals[16];
      alignas(64) int32_t ids[16];
      _mm512_store_ps(vals, bv);
      _mm512_store_si512(ids, bi);
      for (int l = 0; l < 16; ++l)
        if (vals[l] > best || (vals[l] == best && ids[l] < idx)) best = vals[l], idx = ids[l];
    }
  }
#elif FLOTILLA_AVX2
  // the same per-lane scan, 2 x 8 lanes at a time (the scalar loop below compares and
  // branches per element); two vectors of running bests so that the blend chains overlap
  if constexpr (std::is_same<T, c10::BFloat16>::value || std::is_same<T, float>::value) {
    if (V >= 16) {
      const auto load8 = [&](int64_t j) -> __m256 {
        if constexpr (std::is_same<T, float>::value) {
          return _mm256_loadu_ps(x + j);
        } else {
          const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + j));
          return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        }
      };
      __m256 bv0 = _mm256_set1_ps(-INFINITY), bv1 = bv0;
      __m256i bi0 = _mm256_setzero_si256(), bi1 = bi0;
      __m256i cur = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256i eight = _mm256_set1_epi32(8), sixteen = _mm256_set1_epi32(16);
      for (; i + 16 <= V; i += 16, cur = _mm256_add_epi32(cur, sixteen)) {
        const __m256 v0 = load8(i), v1 = load8(i + 8);
        const __m256 m0 = _mm256_cmp_ps(v0, bv0, _CMP_GT_OQ);  // strict: earliest per lane
        const __m256 m1 = _mm256_cmp_ps(v1, bv1, _CMP_GT_OQ);
        bv0 = _mm256_blendv_ps(bv0, v0, m0);
        bv1 = _mm256_blendv_ps(bv1, v1, m1);
        bi0 = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(bi0),
                                                   _mm256_castsi256_ps(cur), m0));
        bi1 = _mm256_castps_si256(_mm256_blendv_ps(
            _mm256_castsi256_ps(bi1), _mm256_castsi256_ps(_mm256_add_epi32(cur, eight)), m1));
      }
      alignas(32) float vals[16];
      alignas(32) int32_t ids[16];
      _mm256_store_ps(vals, bv0);
      _mm256_store_ps(vals + 8, bv1);
      _mm256_store_si256(reinterpret_cast<__m256i*>(ids), bi0);
      _mm256_store_si256(reinterpret_cast<__m256i*>(ids + 8), bi1);
      for (int l = 0; l < 16; ++l)
        if (vals[l] > best || (vals[l] == best && ids[l] < idx)) best = vals[l], idx = ids[l];
    }
  }
#endif
  for (; i < V; ++i) {
    const float v = Raw<T>::load(x[i]);
    if (v > best) best = v, idx = i;
  }
  return idx;
}

void argmax_rows(at::Tensor out, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && out.dim() == 1 && out.is_contiguous() &&
                  out.size(0) == x.size(0) && out.scalar_type() == at::kLong,
              "argmax_rows: x [rows, V] contiguous, out [rows] int64");
  TORCH_CHECK(x.size(1) > 0 && x.size(1) < (int64_t{1} << 31), "argmax_rows: 0 < V < 2^31");
  const int64_t rows = x.size(0), V = x.size(1);
  int64_t* op = out.data_ptr<int64_t>();
  FLOTILLA_DISPATCH(x.scalar_type(), "argmax_rows", {
    const auto* xp = reinterpret_cast<const typename Raw<scalar_t>::type*>(x.data_ptr());
    at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) op[r] = argmax_row<scalar_t>(xp + r * V, V);
    });
  });
}

// k_cache/v_cache [blocks, block_size, KVH, D]: row slots[t] = k[t] / v[t] for every token t
// of the step (k, v [T, KVH, D] with each token's heads and dims contiguous, e.g. views into
// the fused QKV output). One pass instead of two index_copy_ calls on strided sources.
void write_kv_cache(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k,
                    const at::Tensor& v, const at::Tensor& slots) {
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4 &&
                  v_cache.sizes() == k_cache.sizes(),
              "write_kv_cache: caches [blocks, block_size, KVH, D], contiguous");
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.size(1) == k_cache.size(2) &&
                  k.size(2) == k_cache.size(3) && k.stride(2) == 1 && v.stride(2) == 1 &&
                  k.stride(1) == k.size(2) && v.stride(1) == v.size(2),
              "write_kv_cache: k/v [T, KVH, D] with each token's heads and dims contiguous");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k_cache.scalar_type() &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "write_kv_cache: k, v and the caches must share a dtype");
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == k.size(0) && slots.scalar_type() == at::kLong &&
                  slots.is_contiguous(),
              "write_kv_cache: slots [T] int64");
  const int64_t T = k.size(0), row = k.size(1) * k.size(2) * k.element_size();
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(sp[t] >= 0 && sp[t] < num_slots, "write_kv_cache: slot ", sp[t],
                " outside the cache's ", num_slots, " slots");
  char* kc = static_cast<char*>(k_cache.data_ptr());
  char* vc = static_cast<char*>(v_cache.data_ptr());
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  const int64_t ks = k.stride(0) * k.element_size(), vs = v.stride(0) * v.element_size();
  at::parallel_for(0, T, std::max<int64_t>(1, 16384 / std::max<int64_t>(row, 1)),
                   [&](int64_t b, int64_t e) {
                     for (int64_t t = b; t < e; ++t) {
                       std::memcpy(kc + sp[t] * row, kp + t * ks, row);
                       std::memcpy(vc + sp[t] * row, vp + t * vs, row);
                     }
                   });
}

void check_rows(const char* name, const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.is_contiguous(), name, ": x must be contiguous");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(-1) && w.scalar_type() == x.scalar_type(),
              name, ": weight must be [hidden] in x's dtype");
}

void rms_norm(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows("rms_norm", x, weight);
  TORCH_CHECK(out.is_contiguous() && out.sizes() == x.sizes() &&
                  out.scalar_type() == x.scalar_type(),
              "rms_norm: out must be contiguous, shaped and typed like x");
  FLOTILLA_DISPATCH(x.scalar_type(), "rms_norm",
                    rms_norm_impl<scalar_t>(out, x, nullptr, weight, eps));
}

void fused_add_rms_norm(at::Tensor x, at::Tensor residual, const at::Tensor& weight, double eps) {
  check_rows("fused_add_rms_norm", x, weight);
  TORCH_CHECK(residual.is_contiguous() && residual.sizes() == x.sizes() &&
                  residual.scalar_type() == x.scalar_type(),
              "fused_add_rms_norm: residual must be contiguous, shaped and typed like x");
  FLOTILLA_DISPATCH(x.scalar_type(), "fused_add_rms_norm",
                    rms_norm_impl<scalar_t>(x, x, &residual, weight, eps));
}

void rotary_embedding(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2) && x.size(2) % 2 == 0,
              "rotary_embedding: x must be [T, heads, D] with heads and dims contiguous, D even");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.dim() == 2 &&
                  cos.size(0) == x.size(0) && cos.size(1) == x.size(2) &&
                  sin.sizes() == cos.sizes() && cos.scalar_type() == x.scalar_type() &&
                  sin.scalar_type() == x.scalar_type(),
              "rotary_embedding: cos/sin must be contiguous [T, D] in x's dtype");
  FLOTILLA_DISPATCH(x.scalar_type(), "rotary_embedding", rotary_impl<scalar_t>(x, cos, sin));
}

void silu_and_mul(at::Tensor out, const at::Tensor& x) {
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && x.size(-1) == 2 * out.size(-1) &&
                  x.numel() == 2 * out.numel() && x.scalar_type() == out.scalar_type(),
              "silu_and_mul: x [.., 2n] and out [.., n], contiguous, same dtype");
  FLOTILLA_DISPATCH(x.scalar_type(), "silu_and_mul", silu_and_mul_impl<scalar_t>(out, x));
}

// ---- small-batch bf16 linear (decode) -------------------------------------------------------
//
// out[m, n] = sum_k x[m, k] * w[n, k] for a handful of rows m: at decode batch sizes a linear
// layer is a stream over its weight from DRAM, and oneDNN's blocked GEMM reaches ~12 GB/s of the
// ~30 GB/s this machine reads. Here each thread walks a contiguous range of weight rows front
// to back (the hardware prefetcher's best case), with AVX512-BF16 dot products (bf16 pairs
// multiplied exactly and summed in float32), all M input rows per weight load.

#if FLOTILLA_AVX512_BF16
template <int M>
void gemv_bf16_rows(uint16_t* out, const uint16_t* x, const uint16_t* w, int64_t N, int64_t K) {
  const int64_t K32 = K / 32 * 32;
  const __mmask32 tail = static_cast<__mmask32>((K - K32) ? ((1ull << (K - K32)) - 1) : 0);
  at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) {
    int64_t n = b;
    if constexpr (M == 1) {
      // one input row: four weight rows at a time, so four independent dot-product chains
      // (and their final reductions) overlap instead of one row's chain setting the pace
      for (; n + 4 <= e && !tail; n += 4) {
        const uint16_t* wr = w + n * K;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t k = 0; k < K32; k += 32) {
          const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k);
          a0 = _mm512_dpbf16_ps(a0, xv, (__m512bh)_mm512_loadu_si512(wr + k));
          a1 = _mm512_dpbf16_ps(a1, xv, (__m512bh)_mm512_loadu_si512(wr + K + k));
          a2 = _mm512_dpbf16_ps(a2, xv, (__m512bh)_mm512_loadu_si512(wr + 2 * K + k));
          a3 = _mm512_dpbf16_ps(a3, xv, (__m512bh)_mm512_loadu_si512(wr + 3 * K + k));
        }
        out[n] = Raw<c10::BFloat16>::store(_mm512_reduce_add_ps(a0));
        out[n + 1] = Raw<c10::BFloat16>::store(_mm512_reduce_add_ps(a1));
        out[n + 2] = Raw<c10::BFloat16>::store(_mm512_reduce_add_ps(a2));
        out[n + 3] = Raw<c10::BFloat16>::store(_mm512_reduce_add_ps(a3));
      }
    }
    for (; n < e; ++n) {
      const uint16_t* wr = w + n * K;
      __m512 acc[M];
      for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
      for (int64_t k = 0; k < K32; k += 32) {
        const __m512bh wv = (__m512bh)_mm512_loadu_si512(wr + k);
        for (int m = 0; m < M; ++m)
          acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_loadu_si512(x + m * K + k), wv);
      }
      if (tail) {
        const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(tail, wr + K32);
        for (int m = 0; m < M; ++m)
          acc[m] = _mm512_dpbf16_ps(
              acc[m], (__m512bh)_mm512_maskz_loadu_epi16(tail, x + m * K + K32), wv);
      }
      for (int m = 0; m < M; ++m)
        out[m * N + n] = Raw<c10::BFloat16>::store(_mm512_reduce_add_ps(acc[m]));
    }
  });
}
#endif

bool gemv_bf16(at::Tensor out, const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && out.dim() == 2 && x.size(1) == w.size(1) &&
                  out.size(0) == x.size(0) && out.size(1) == w.size(0),
              "gemv_bf16: x [M, K], w [N, K], out [M, N]");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && out.is_contiguous() &&
                  x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 &&
                  out.scalar_type() == at::kBFloat16,
              "gemv_bf16: contiguous bfloat16 tensors only");
#if FLOTILLA_AVX512_BF16
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  switch (M) {
#define FLOTILLA_GEMV(R) \
  case R:                \
    gemv_bf16_rows<R>(op, xp, wp, N, K); \
    return true;
    FLOTILLA_GEMV(1)
    FLOTILLA_GEMV(2)
    FLOTILLA_GEMV(3)
    FLOTILLA_GEMV(4)
    FLOTILLA_GEMV(5)
    FLOTILLA_GEMV(6)
    FLOTILLA_GEMV(7)
    FLOTILLA_GEMV(8)
#undef FLOTILLA_GEMV
    default:
      return false;
  }
#else
  return false;  // no AVX512-BF16: the caller uses torch's linear
#endif
}

}  // namespace flotilla

TORCH_LIBRARY(flotilla, m) {
  m.def(
      "paged_decode_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, "
      "Tensor block_tables, Tensor context_lens, float scale, int window) -> ()");
  m.def(
      "paged_prefill_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, "
      "Tensor block_tables, Tensor q_starts, Tensor q_lens, Tensor start_pos, float scale, "
      "int window) -> bool");
  m.def("rms_norm(Tensor(a!) out, Tensor x, Tensor weight, float eps) -> ()");
  m.def("fused_add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def("rotary_embedding(Tensor(a!) x, Tensor cos, Tensor sin) -> ()");
  m.def("silu_and_mul(Tensor(a!) out, Tensor x) -> ()");
  m.def("gemv_bf16(Tensor(a!) out, Tensor x, Tensor w) -> bool");
  m.def("linear_w8(Tensor(a!) out, Tensor x, Tensor w, Tensor scales, Tensor? bias) -> bool");
  m.def("linear_f32(Tensor(a!) out, Tensor x, Tensor w, Tensor? bias) -> bool");
  m.def("pack_f32(Tensor w) -> Tensor");
  m.def("linear_f32_packed(Tensor(a!) out, Tensor x, Tensor w_packed, Tensor? bias) -> bool");
  m.def(
      "linear_w8_gemm(Tensor(a!) out, Tensor x, Tensor w, Tensor scales, Tensor? bias) -> bool");
  m.def("amx_linear(Tensor(a!) out, Tensor x, Tensor w_packed, Tensor? bias) -> bool");
  m.def("amx_swiglu(Tensor(a!) out, Tensor x, Tensor w_packed) -> bool");
  m.def("amx_argmax(Tensor(a!) out, Tensor x, Tensor w_packed, int n) -> bool");
  m.def(
      "dense_layers(Tensor x, Tensor[] weights, Tensor[] kv_caches, Tensor cos, Tensor sin, "
      "Tensor slots, Tensor? decode_tables, Tensor? decode_lens, Tensor? prefill_tables, "
      "Tensor? q_starts, Tensor? q_lens, Tensor? start_pos, int num_heads, int num_kv_heads, "
      "int head_dim, int intermediate, float scale, int[] windows, float eps, int kind, "
      "int small_rows) -> Tensor");
  m.def(
      "rope_qkv_cache(Tensor(a!) q_out, Tensor(b!) k_cache, Tensor(c!) v_cache, Tensor qkv, "
      "Tensor cos, Tensor sin, Tensor slots) -> ()");
  m.def("argmax_rows(Tensor(a!) out, Tensor x) -> ()");
  m.def(
      "write_kv_cache(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor slots) "
      "-> ()");
}

TORCH_LIBRARY_IMPL(flotilla, CPU, m) {
  m.impl("rms_norm", &flotilla::rms_norm);
  m.impl("fused_add_rms_norm", &flotilla::fused_add_rms_norm);
  m.impl("rotary_embedding", &flotilla::rotary_embedding);
  m.impl("silu_and_mul", &flotilla::silu_and_mul);
  m.impl("gemv_bf16", &flotilla::gemv_bf16);
  m.impl("argmax_rows", &flotilla::argmax_rows);
  m.impl("rope_qkv_cache", &flotilla::rope_qkv_cache);
  m.impl("write_kv_cache", &flotilla::write_kv_cache);
}
