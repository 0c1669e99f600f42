// Shared-memory collectives for the CPU ranks of one node (parallel/shm_comm.py): their own
// small library (parallel/native_build.py), so parallel/ needs nothing from workers/. Plain
// loops, no ISA paths: the sums are memory-bound and vectorize on any target, rank by rank in
// the same order everywhere, so the result is the same bits whatever the build's target.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <type_traits>

#include "dtypes.h"
#include "isa.h"

namespace flotilla {

// ---- shared-memory all-reduce (ranks of one node) --------------------------------------------
//
// `buf` maps one shared file (every rank of the group maps the same one):
//   [world flags, 64 bytes apart][2 phases x world slots of slot_bytes]
// Call k (seq = k, counting from 1, the same on every rank) copies this rank's chunk into its
// slot of phase seq & 1, publishes flag[rank] = seq (release), waits until every flag >= seq
// (acquire), then sums the world slots in rank order -- so every rank gets bitwise the same
// result -- and rounds once to the dtype. A rank reuses a phase's slot two calls later, which it
// can only reach after every peer has published the call in between, i.e. finished reading.
// Tensors larger than a slot go in chunks, one seq each. Returns the last seq used.

constexpr int64_t kFlagStride = 64;

template <typename T>
void shm_sum_chunk(T* out, const uint8_t* data, int64_t world, int64_t slot_bytes, int phase,
                   int64_t off, int64_t count) {
  using R = Raw<T>;
  using raw_t = typename R::type;
  raw_t* o = reinterpret_cast<raw_t*>(out) + off;
  const auto slot = [&](int64_t r) {
    return reinterpret_cast<const raw_t*>(data + (phase * world + r) * slot_bytes);
  };
  at::parallel_for(0, count, 4096, [&](int64_t b, int64_t e) {
    const raw_t* s0 = slot(0);
#pragma omp simd
    for (int64_t i = b; i < e; ++i) o[i] = s0[i];
    if (std::is_same<T, float>::value) {
      for (int64_t r = 1; r < world; ++r) {
        const raw_t* sr = slot(r);
#pragma omp simd
        for (int64_t i = b; i < e; ++i) o[i] = R::store(R::load(o[i]) + R::load(sr[i]));
      }
      return;
    }
    // bf16/fp16: accumulate in float32 (chunk of 256 on the stack), round once.
    float acc[256];
    for (int64_t i0 = b; i0 < e; i0 += 256) {
      const int64_t m = std::min<int64_t>(256, e - i0);
      for (int64_t i = 0; i < m; ++i) acc[i] = R::load(s0[i0 + i]);
      for (int64_t r = 1; r < world; ++r) {
        const raw_t* sr = slot(r) + i0;
#pragma omp simd
        for (int64_t i = 0; i < m; ++i) acc[i] += R::load(sr[i]);
      }
#pragma omp simd
      for (int64_t i = 0; i < m; ++i) o[i0 + i] = R::store(acc[i]);
    }
  });
}

struct ShmView {
  uint8_t* base;
  uint8_t* data;
  int64_t slot_bytes;
  int64_t rank, world;
  double timeout_s;
  std::chrono::steady_clock::time_point deadline;

  ShmView(at::Tensor& buf, int64_t rank_, int64_t world_, double timeout)
      : rank(rank_), world(world_), timeout_s(timeout) {
    TORCH_CHECK(buf.scalar_type() == at::kByte && buf.is_contiguous(),
                "shm collectives: buf must be a contiguous uint8 mapping");
    TORCH_CHECK(0 <= rank && rank < world, "shm collectives: rank out of range");
    base = buf.data_ptr<uint8_t>();
    data = base + world * kFlagStride;
    slot_bytes = ((buf.numel() - world * kFlagStride) / (2 * world)) / 64 * 64;
    TORCH_CHECK(slot_bytes > 0, "shm collectives: buffer too small");
    deadline = std::chrono::steady_clock::now() +
               std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                   std::chrono::duration<double>(timeout));
  }
  std::atomic<int64_t>* flag(int64_t r) const {
    return reinterpret_cast<std::atomic<int64_t>*>(base + r * kFlagStride);
  }
  uint8_t* slot(int phase, int64_t r) const { return data + (phase * world + r) * slot_bytes; }
  // Publish this rank's slot for call `seq`, then wait for every peer's.
  void publish_and_wait(int64_t seq) const {
    flag(rank)->store(seq, std::memory_order_release);
    for (int64_t r = 0; r < world; ++r) {
      int64_t spins = 0;
      while (flag(r)->load(std::memory_order_acquire) < seq) {
        if (++spins < 4096) {
          cpu_relax();
          continue;
        }
        spins = 0;
        sched_yield();  // let a peer (or its threads) run on this core
        TORCH_CHECK(std::chrono::steady_clock::now() < deadline, "shm collective: rank ", r,
                    " did not arrive within ", timeout_s, " s (seq ", seq, ")");
      }
    }
  }
};

int64_t shm_all_reduce(at::Tensor x, at::Tensor buf, int64_t rank, int64_t world, int64_t seq,
                       double timeout_s) {
  TORCH_CHECK(x.is_contiguous(), "shm_all_reduce: x must be contiguous");
  const ShmView shm(buf, rank, world, timeout_s);
  const int64_t elem = x.element_size(), per_chunk = shm.slot_bytes / elem, n = x.numel();
  uint8_t* xp = reinterpret_cast<uint8_t*>(x.data_ptr());
  for (int64_t off = 0; off < n; off += per_chunk) {
    ++seq;
    const int64_t count = std::min(per_chunk, n - off);
    const int phase = static_cast<int>(seq & 1);
    std::memcpy(shm.slot(phase, rank), xp + off * elem, count * elem);
    shm.publish_and_wait(seq);
    FLOTILLA_DISPATCH(x.scalar_type(), "shm_all_reduce",
                      shm_sum_chunk<scalar_t>(reinterpret_cast<scalar_t*>(xp), shm.data, world,
                                              shm.slot_bytes, phase, off, count));
  }
  return seq;
}

// out [world, *x.shape]: out[r] = rank r's x. Same protocol, copying instead of summing.
int64_t shm_all_gather(at::Tensor out, const at::Tensor& x, at::Tensor buf, int64_t rank,
                       int64_t world, int64_t seq, double timeout_s) {
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && out.numel() == world * x.numel() &&
                  out.scalar_type() == x.scalar_type(),
              "shm_all_gather: out must be contiguous [world, *x.shape] in x's dtype");
  const ShmView shm(buf, rank, world, timeout_s);
  const int64_t nbytes = x.numel() * x.element_size();
  const uint8_t* xp = reinterpret_cast<const uint8_t*>(x.data_ptr());
  uint8_t* op = reinterpret_cast<uint8_t*>(out.data_ptr());
  for (int64_t off = 0; off < nbytes; off += shm.slot_bytes) {
    ++seq;
    const int64_t count = std::min(shm.slot_bytes, nbytes - off);
    const int phase = static_cast<int>(seq & 1);
    std::memcpy(shm.slot(phase, rank), xp + off, count);
    shm.publish_and_wait(seq);
    for (int64_t r = 0; r < world; ++r) std::memcpy(op + r * nbytes + off, shm.slot(phase, r), count);
  }
  return seq;
}

}  // namespace flotilla

// A fragment of the `flotilla` op namespace: the workers/ library (loaded or not) defines the
// rest of it.
TORCH_LIBRARY_FRAGMENT(flotilla, m) {
  m.def(
      "shm_all_reduce(Tensor(a!) x, Tensor(b!) buf, int rank, int world, int seq, "
      "float timeout_s) -> int");
  m.def(
      "shm_all_gather(Tensor(a!) out, Tensor x, Tensor(b!) buf, int rank, int world, int seq, "
      "float timeout_s) -> int");
}

TORCH_LIBRARY_IMPL(flotilla, CPU, m) {
  m.impl("shm_all_reduce", &flotilla::shm_all_reduce);
  m.impl("shm_all_gather", &flotilla::shm_all_gather);
}
