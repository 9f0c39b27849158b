// microkernel.h on ATen's at::native::cpublas::brgemm.  Compiled without any
// instruction-set flags (see microkernel.h); torch 2.11 to 2.13 declare the
// overloads used here behind the CPUBLAS_BRGEMM_* macros, so each is guarded.
#include <ATen/Context.h>
#include <ATen/native/CPUBlas.h>

#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <set>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif

#include "cpu/microkernel.h"

namespace hen {
namespace mk {
namespace cb = at::native::cpublas;

namespace {
#if defined(__x86_64__) || defined(_M_X64)
constexpr bool kX86 = true;
#else
constexpr bool kX86 = false;
#endif

// CPUID leaf 7 (read directly: older compilers' __builtin_cpu_supports lacks these
// names).  Whether the OS lets oneDNN use them is what the probe below finds out.
struct Leaf7 {
  bool amx_bf16 = false, avx512_fp16 = false, avx512_bf16 = false, amx_fp16 = false;
};
Leaf7 leaf7() {
  Leaf7 f;
#if defined(__x86_64__) && defined(__GNUC__)
  unsigned a0, b0, c0, d0, a1, b1, c1, d1;
  if (!__get_cpuid_count(7, 0, &a0, &b0, &c0, &d0) || !__get_cpuid_count(7, 1, &a1, &b1, &c1, &d1)) return f;
  f.amx_bf16 = d0 >> 22 & 1, f.avx512_fp16 = d0 >> 23 & 1, f.avx512_bf16 = a1 >> 5 & 1, f.amx_fp16 = a1 >> 21 & 1;
#endif
  return f;
}

bool cpu_has_16bit_matrix(DType dt) {
  const Leaf7 f = leaf7();
  return dt == DType::BF16 ? f.amx_bf16 || f.avx512_bf16 : f.amx_fp16 || f.avx512_fp16;
}

uint16_t to_bits(DType dt, float f) {
  if (dt == DType::BF16) return c10::BFloat16(f).x;
  return c10::Half(f).x;
}

// A 32 x 20 x 8 product of small integers (exact in 16 bits and in float32):
// the answer must come back exactly, else this path is not used.
bool probe(DType dt) {
  constexpr int64_t M = 32, N = 20, K = 8;
  std::vector<float> a(M * K), b(K * N);
  for (int64_t i = 0; i < M * K; ++i) a[i] = float(i % 7) - 3.f;
  for (int64_t i = 0; i < K * N; ++i) b[i] = float(i % 5) - 2.f;
  std::vector<uint16_t> a16(M * K), b16(K * N);
  for (int64_t i = 0; i < M * K; ++i) a16[i] = to_bits(dt, a[i]);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N; ++n) b16[(k / 2) * N * 2 + n * 2 + k % 2] = to_bits(dt, b[k * N + n]);
  std::vector<float> c(M * N, 123.f);
  try {
    gemm_vnni(dt, M, N, K, K, N, N, false, a16.data(), b16.data(), c.data());
    release_vnni();
  } catch (const std::exception&) {
    return false;
  }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      float want = 0.f;
      for (int64_t k = 0; k < K; ++k) want += a[m * K + k] * b[k * N + n];
      if (c[m * N + n] != want) return false;
    }
  return true;
}
bool counting_shapes() {
  static const bool on = [] {
    const char* e = std::getenv("HEN_KERNELS_COUNT_BRGEMM_SHAPES");
    return e && std::strcmp(e, "1") == 0;
  }();
  return on;
}

struct ShapeLog {
  std::mutex mu;
  std::set<std::array<int64_t, 8>> seen;
};
ShapeLog& shape_log() {
  static ShapeLog log;
  return log;
}

void count_shape(int64_t dt, int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add) {
  if (!counting_shapes()) return;
  ShapeLog& log = shape_log();
  std::lock_guard<std::mutex> lock(log.mu);
  log.seen.insert({dt, M, N, K, lda, ldb, ldc, int64_t(add)});
}
}  // namespace

int64_t brgemm_shapes_seen() {
  if (!counting_shapes()) return -1;
  ShapeLog& log = shape_log();
  std::lock_guard<std::mutex> lock(log.mu);
  return int64_t(log.seen.size());
}

bool cpu_has_avx512_bf16() {
  static const bool has = leaf7().avx512_bf16;
  return has;
}

bool cpu_has_amx_bf16() {
  static const bool has = leaf7().amx_bf16;
  return has;
}

bool f32_available() {
#if defined(CPUBLAS_BRGEMM_F32F32F32)
  return kX86;
#else
  return false;
#endif
}

void gemm_f32(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add, const float* A,
              const float* B, float* C) {
#if defined(CPUBLAS_BRGEMM_F32F32F32)
  count_shape(int64_t(DType::F32), M, N, K, lda, ldb, ldc, add);
  cb::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, false);
#else
  (void)M, (void)N, (void)K, (void)lda, (void)ldb, (void)ldc, (void)add, (void)A, (void)B, (void)C;
  TORCH_CHECK(false, "hen_kernels: float32 brgemm is not in this torch build");
#endif
}

void gemm_vnni(DType dt, int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add,
               const uint16_t* A, const uint16_t* B, float* C) {
  count_shape(int64_t(dt), M, N, K, lda, ldb, ldc, add);
  if (dt == DType::BF16) {
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
    cb::brgemm(M, N, K, lda, ldb, ldc, add, reinterpret_cast<const at::BFloat16*>(A),
               reinterpret_cast<const at::BFloat16*>(B), C, true);
    return;
#endif
  } else if (dt == DType::F16) {
#if defined(CPUBLAS_BRGEMM_F16F16F32)
    cb::brgemm(M, N, K, lda, ldb, ldc, add, reinterpret_cast<const at::Half*>(A), reinterpret_cast<const at::Half*>(B),
               C, true);
    return;
#endif
  }
  (void)M, (void)N, (void)K, (void)lda, (void)ldb, (void)ldc, (void)add, (void)A, (void)B, (void)C;
  TORCH_CHECK(false, "hen_kernels: no 16-bit brgemm for this dtype in this torch build");
}

void release_vnni() {
#if defined(CPUBLAS_BRGEMM_BF16BF16F32) || defined(CPUBLAS_BRGEMM_F16F16F32)
  cb::brgemm_release();
#endif
}

bool vnni_available(DType dt) {
  if (!kX86 || dt == DType::F32) return false;
  // Both probes run once, on the first call, under the static's guard.
  static const bool bf16 = cpu_has_16bit_matrix(DType::BF16) && probe(DType::BF16);
  static const bool f16 = cpu_has_16bit_matrix(DType::F16) && probe(DType::F16);
  // brgemm refuses the VNNI path whenever the user has switched oneDNN off.
  return (dt == DType::BF16 ? bf16 : f16) && at::globalContext().userEnabledMkldnn();
}

}  // namespace mk
}  // namespace hen
