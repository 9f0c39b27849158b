// Compile what follows for the instruction set HEN_ISA_LEVEL names (3 = AVX-512,
// 2 = AVX2, 1 = baseline); cpu/isa_end.h ends it.  CMake compiles each per-ISA
// file (tile_kernel.cpp, backward_kernel.cpp) once per level, each copy in its own
// namespace HEN_ISA_NS.  Include this after every library header, so that only
// the file's own functions use the instruction set: inline library code
// instantiated there (std::vector, say) keeps the baseline one, and the linker's
// single copy of it runs on every CPU.  No include guard: each per-ISA file
// includes it once.  Pragmas take no macros: one literal per instruction set.
#if !defined(HEN_ISA_NS) || !defined(HEN_ISA_LEVEL)
#error "HEN_ISA_NS and HEN_ISA_LEVEL name the instruction set this copy is compiled for"
#endif

#if HEN_ISA_LEVEL == 3 && defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c"))), apply_to = function)
#elif HEN_ISA_LEVEL == 2 && defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#elif HEN_ISA_LEVEL == 3
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
#elif HEN_ISA_LEVEL == 2
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
