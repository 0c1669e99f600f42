// Which instruction-set paths this translation unit compiles, decided once from the compiler's
// target macros, so that every kernel file tests the same names (and build_info reports them):
//
//   FLOTILLA_X86          x86 intrinsics usable (immintrin.h included). 0 on other machines,
//                         and where FLOTILLA_PORTABLE is defined: the portable scalar paths only,
//                         so they can be built and tested on an x86 machine too.
//   FLOTILLA_AVX2         AVX2 + FMA vector paths (the weight-only int8 linear).
//   FLOTILLA_AVX512       AVX-512 F/BW/VL vector paths (norms, rotary, SiLU, argmax, decode
//                         attention).
//   FLOTILLA_AVX512_BF16  AVX512-BF16 dot products and conversions (GEMV, prefill attention).
//   FLOTILLA_AMX          AMX-BF16 tiles (linear, SwiGLU, greedy head, prefill attention,
//                         dense_layers); its epilogues round with AVX512-BF16, so it needs both.
//
// Each is 0 or 1; test them with #if. Python picks among the compiled paths by what the CPU
// has at run time (workers/kernels/dispatch.py reads torch.ops.flotilla.build_info()).
#pragma once

#if (defined(__x86_64__) || defined(__i386__)) && !defined(FLOTILLA_PORTABLE)
#define FLOTILLA_X86 1
#include <immintrin.h>
#else
#define FLOTILLA_X86 0
#endif

#if FLOTILLA_X86 && defined(__AVX2__) && defined(__FMA__)
#define FLOTILLA_AVX2 1
#else
#define FLOTILLA_AVX2 0
#endif

#if FLOTILLA_X86 && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define FLOTILLA_AVX512 1
#else
#define FLOTILLA_AVX512 0
#endif

#if FLOTILLA_AVX512 && defined(__AVX512BF16__)
#define FLOTILLA_AVX512_BF16 1
#else
#define FLOTILLA_AVX512_BF16 0
#endif

#if FLOTILLA_AVX512_BF16 && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define FLOTILLA_AMX 1
#else
#define FLOTILLA_AMX 0
#endif

namespace flotilla {

// A spin-wait hint: lets the sibling hyper-thread run and saves power while polling a flag.
inline void cpu_relax() {
#if FLOTILLA_X86
  _mm_pause();
#elif defined(__aarch64__) && !defined(FLOTILLA_PORTABLE)
  asm volatile("yield" ::: "memory");
#endif
}

}  // namespace flotilla
