// torch.ops.flotilla.build_info(): what this library was compiled for and what the CPU it runs
// on has, as one JSON object. workers/kernels/dispatch.py decides every op's path from it, so
// the compile-time #ifs (parallel/kernels/isa.h) and the run-time CPU checks have one reader.
//
//   "compiled": the target's ISA macros (__AVX2__, __AVX512BF16__, __AMX_TILE__, ...)
//   "paths":    the kernel paths compiled in (FLOTILLA_AVX2, _AVX512, _AVX512_BF16, _AMX; x86 at all)
//   "cpu":      the CPU's features at run time (x86: __builtin_cpu_supports, which also checks
//               that the OS saves the registers)
//   "amx_permitted": Linux granted this process the AMX tile data (arch_prctl XTILEDATA)
#include <string>

#include "common.h"

namespace flotilla {
namespace {

void add(std::string& s, const char* name, bool on) {
  if (!on) return;
  if (s.back() != '[') s += ',';
  s += '"';
  s += name;
  s += '"';
}

std::string compiled() {
  std::string s = "[";
  // one line per macro: #ifdef cannot sit inside a call's arguments
#define FLOTILLA_MACRO(M, NAME) add(s, NAME, M)
#ifdef __SSE2__
  FLOTILLA_MACRO(true, "sse2");
#endif
#ifdef __AVX__
  FLOTILLA_MACRO(true, "avx");
#endif
#ifdef __AVX2__
  FLOTILLA_MACRO(true, "avx2");
#endif
#ifdef __FMA__
  FLOTILLA_MACRO(true, "fma");
#endif
#ifdef __F16C__
  FLOTILLA_MACRO(true, "f16c");
#endif
#ifdef __AVX512F__
  FLOTILLA_MACRO(true, "avx512f");
#endif
#ifdef __AVX512BW__
  FLOTILLA_MACRO(true, "avx512bw");
#endif
#ifdef __AVX512VL__
  FLOTILLA_MACRO(true, "avx512vl");
#endif
#ifdef __AVX512BF16__
  FLOTILLA_MACRO(true, "avx512bf16");
#endif
#ifdef __AMX_TILE__
  FLOTILLA_MACRO(true, "amx-tile");
#endif
#ifdef __AMX_BF16__
  FLOTILLA_MACRO(true, "amx-bf16");
#endif
#ifdef __ARM_NEON
  FLOTILLA_MACRO(true, "neon");
#endif
#undef FLOTILLA_MACRO
  return s + "]";
}

std::string paths() {
  std::string s = "[";
  add(s, "x86", FLOTILLA_X86);
  add(s, "avx2", FLOTILLA_AVX2);
  add(s, "avx512", FLOTILLA_AVX512);
  add(s, "avx512_bf16", FLOTILLA_AVX512_BF16);
  add(s, "amx", FLOTILLA_AMX);
  return s + "]";
}

std::string cpu() {
  std::string s = "[";
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
  // (asked whatever the build's target: a portable build still reports the CPU it runs on)
  __builtin_cpu_init();
  add(s, "sse2", __builtin_cpu_supports("sse2"));
  add(s, "avx", __builtin_cpu_supports("avx"));
  add(s, "avx2", __builtin_cpu_supports("avx2"));
  add(s, "fma", __builtin_cpu_supports("fma"));
  add(s, "f16c", __builtin_cpu_supports("f16c"));
  add(s, "avx512f", __builtin_cpu_supports("avx512f"));
  add(s, "avx512bw", __builtin_cpu_supports("avx512bw"));
  add(s, "avx512vl", __builtin_cpu_supports("avx512vl"));
  add(s, "avx512bf16", __builtin_cpu_supports("avx512bf16"));
  add(s, "amx-tile", __builtin_cpu_supports("amx-tile"));
  add(s, "amx-bf16", __builtin_cpu_supports("amx-bf16"));
#endif
  return s + "]";
}

}  // namespace

std::string build_info() {
  std::string s = "{\"compiled\":" + compiled() + ",\"paths\":" + paths() + ",\"cpu\":" + cpu();
  s += ",\"amx_permitted\":";
  s += amx_ready() ? "true" : "false";
#if defined(__VERSION__)
  s += ",\"compiler\":\"" __VERSION__ "\"";
#endif
  return s + "}";
}

}  // namespace flotilla

// No tensor arguments, so no dispatch key to register under: a catch-all kernel.
TORCH_LIBRARY_FRAGMENT(flotilla, m) { m.def("build_info() -> str", &flotilla::build_info); }
