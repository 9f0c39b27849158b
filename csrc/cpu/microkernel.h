// The platform's GEMM microkernels, as the CPU tile kernel sees them: plain
// pointers and sizes, no torch types.  microkernel_aten.cpp implements them with
// ATen's at::native::cpublas::brgemm, the microkernel PyTorch's own CPU flash
// attention calls (oneDNN's JIT brgemm: AMX or AVX-512 BF16 for 16-bit inputs,
// AVX-512 or AVX2 FMA for float32).  That file is the only one of csrc/cpu/ that
// includes ATen: the tile kernel is compiled once per instruction set, and ATen's
// inline functions must not be compiled with those instruction sets (the linker
// would keep one copy, possibly an AVX-512 one, for every caller).
//
// All matrices are row-major: C[M x N] (+)= A[M x K] . B[K x N], with leading
// dimensions in elements.  Where a function is unavailable (no oneDNN ukernel in
// this torch, not x86, an older torch without the brgemm overloads), the tile
// kernel uses its own hand-written products instead (Product::Hand).
#pragma once

#include <cstdint>

#include "hopfield_params.h"

namespace hen {
namespace mk {

// Whether float32 brgemm exists in this build (x86 and a torch that declares it).
bool f32_available();

// C (+)= A . B in float32.
void gemm_f32(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add, const float* A,
              const float* B, float* C);

// Whether 16-bit products with float32 accumulation run on this CPU's matrix
// instructions for `dt` (BF16 or F16): the CPU has them (AMX, AVX-512 BF16 /
// FP16), oneDNN may use them (ONEDNN_MAX_CPU_ISA), and a probe product came out
// right.  Decided once per process.
bool vnni_available(DType dt);

// Whether this CPU has AVX-512 BF16 (its float-to-bfloat16 conversion among others).
bool cpu_has_avx512_bf16();
// Whether this CPU has AMX with bfloat16 tiles.
bool cpu_has_amx_bf16();

// C (+)= A . B with A and B 16-bit of type dt and C float32.  B is in the VNNI
// layout: element (k, n) of the logical K x N matrix at B[(k / 2) * ldb * 2 + n * 2 + k % 2]
// (pairs of consecutive k side by side), K even.
void gemm_vnni(DType dt, int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add,
               const uint16_t* A, const uint16_t* B, float* C);

// The distinct shapes (dtype, M, N, K, leading dimensions, add) this process has handed to
// gemm_f32 and gemm_vnni, or -1 where they are not counted: only with
// HEN_KERNELS_COUNT_BRGEMM_SHAPES=1 in the environment (read once).  ATen compiles and keeps a
// kernel per shape and thread for the process's life, so the tests hold the tile kernels to a
// bounded set of shapes (hopfield_cpu.h, brgemm_queries).
int64_t brgemm_shapes_seen();

// Hand the matrix unit's state back (AMX tile configuration) once a thread is
// done with gemm_vnni for now, as PyTorch's flash attention does.
void release_vnni();

}  // namespace mk
}  // namespace hen
