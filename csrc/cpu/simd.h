// Vector helpers of the tile kernel.  tile_kernel.cpp includes this header
// inside its instruction-set namespace, after its target pragma, so each copy is
// compiled for one instruction set (HEN_ISA_LEVEL: 3 AVX-512, 2 AVX2 + FMA + F16C,
// 1 baseline) and stays private to it.  GCC vector extensions keep the code
// portable; intrinsics appear only where they say something the extensions
// cannot (conversions, square roots).
#pragma once

#ifndef HEN_ISA_LEVEL
#error "HEN_ISA_LEVEL must be set (tile_kernel.cpp is compiled once per instruction set)"
#endif

namespace {

#if HEN_ISA_LEVEL >= 3
constexpr int W = 16;
#elif HEN_ISA_LEVEL == 2
constexpr int W = 8;
#else
constexpr int W = 4;
#endif
typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));
typedef uint32_t vu __attribute__((vector_size(W * 4)));
typedef uint16_t vh __attribute__((vector_size(W * 2)));

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
// A broadcast (GCC would build `vf{} + x` with a chain of lane inserts).
inline vf splat(float x) {
#if HEN_ISA_LEVEL >= 3
  return _mm512_set1_ps(x);
#elif HEN_ISA_LEVEL == 2
  return _mm256_set1_ps(x);
#elif defined(__SSE2__)
  return _mm_set1_ps(x);
#else
  vf v;
  for (int i = 0; i < W; ++i) v[i] = x;
  return v;
#endif
}
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
// x as rounded, so that a later operation cannot fuse with it: with -ffp-contract=fast,
// c * beta - m would become one FMA, one rounding fewer than the pass that found m, and
// the best row's weight would no longer be exactly 1.
inline vf rounded(vf x) {
#if defined(__x86_64__) || defined(__i386__)
  asm("" : "+v"(x));
#elif defined(__aarch64__)
  asm("" : "+w"(x));
#else
  volatile float sink[W];
  for (int i = 0; i < W; ++i) sink[i] = x[i];
  for (int i = 0; i < W; ++i) x[i] = sink[i];
#endif
  return x;
}
// Whether any lane of a comparison's result is set: one mask test (a lane-by-lane
// loop compiles to a chain of extracts, paid at every score vector).
inline bool any(vi m) {
#if HEN_ISA_LEVEL >= 3
  return _mm512_test_epi32_mask(__m512i(m), __m512i(m)) != 0;
#elif HEN_ISA_LEVEL == 2
  return !_mm256_testz_si256(__m256i(m), __m256i(m));
#else
  int r = 0;
  for (int i = 0; i < W; ++i) r |= m[i];
  return r != 0;
#endif
}
// Lanes summed in one fixed order: every caller reduces the same way for every row.
inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}

inline vf vsqrt(vf x) {
#if HEN_ISA_LEVEL >= 3
  return _mm512_sqrt_ps(x);
#elif HEN_ISA_LEVEL == 2
  return _mm256_sqrt_ps(x);
#elif defined(__SSE2__)
  return _mm_sqrt_ps(x);
#else
  for (int i = 0; i < W; ++i) x[i] = std::sqrt(x[i]);
  return x;
#endif
}

// exp for arguments <= 0 (scores minus their running max): Cody-Waite range
// reduction and a degree-5 polynomial in Horner form (minimax for the relative error
// on [-ln2/2, ln2/2], its first two coefficients 1, so exp(0) is exactly 1): within
// 2.2 ulp of exp at every float in [-87.3, 0] (2.4 without FMA), 0.10 ulp on average.  The softmax
// weights spend most of a many-query 16-bit call here; the degree-7 form it replaced
// (1.02 ulp) took three operations more, benchmarks/PERFORMANCE.md §5.9.  -inf and
// anything below the float range give 0, NaN stays NaN.
__attribute__((always_inline)) inline vf exp_nonpositive(vf x) {
  const vf lo = splat(-87.3f);
  vi underflow = x < lo;
  x = underflow ? lo : x;
  const vf magic = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  vf n = (x * 1.44269504088896341f + magic) - magic;
  vf r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf q = splat(8.312639780342579e-3f);
  q = q * r + 4.189061373472214e-2f;
  q = q * r + 1.6667115688323975e-1f;
  q = q * r + 4.999922811985016e-1f;
  q = q * r + 1.f;
  q = q * r + 1.f;
#if HEN_ISA_LEVEL >= 3
  return underflow ? vf{} : vf(_mm512_scalef_ps(q, n));  // q * 2^n, one instruction for four
#else
  vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return underflow ? vf{} : q * scale;
#endif
}

// --- 16-bit storage -------------------------------------------------------------

inline float half_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal half: renormalise
    int e = -1;
    do {
      man <<= 1;
      ++e;
    } while (!(man & 0x400));
    bits = sign | uint32_t(112 - e) << 23 | ((man & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float scalar_to_float(DType dt, const void* row, int64_t k) {
  if (dt == DType::F32) return static_cast<const float*>(row)[k];
  const uint16_t h = static_cast<const uint16_t*>(row)[k];
  if (dt == DType::F16) return half_to_float(h);
  const uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// W consecutive elements of a row of dtype dt, as floats.
inline vf load_as_float(DType dt, const void* row, int64_t k) {
  if (dt == DType::F32) return load(static_cast<const float*>(row) + k);
  const uint16_t* s = static_cast<const uint16_t*>(row) + k;
  if (dt == DType::BF16) {  // (widening with the vector extensions compiles to lane shuffles)
#if HEN_ISA_LEVEL >= 3
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s))), 16));
#elif HEN_ISA_LEVEL == 2
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s))), 16));
#else
    vh h;
    std::memcpy(&h, s, sizeof h);
    vu bits = __builtin_convertvector(h, vu) << 16;
    vf f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
#endif
  }
#if HEN_ISA_LEVEL >= 3
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
#elif HEN_ISA_LEVEL == 2
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
#else
  vf f;
  for (int i = 0; i < W; ++i) f[i] = half_to_float(s[i]);
  return f;
#endif
}

// --- the last, partial vector of a row ----------------------------------------------

// Lanes i < n set: the lanes a partial step reads and writes.
template <size_t... i>
constexpr vi lane_numbers(std::index_sequence<i...>) {
  return vi{int(i)...};
}
inline vi first_lanes(int n) { return lane_numbers(std::make_index_sequence<W>{}) < n; }

// The first n (1 <= n <= W) floats from p, the other lanes 0; nothing past p[n - 1] is read
// (rows shorter than a vector: TailStep).
inline vf load_first(const float* p, int n) {
#if HEN_ISA_LEVEL >= 3
  return _mm512_maskz_loadu_ps(__mmask16((1u << n) - 1), p);
#elif HEN_ISA_LEVEL == 2
  return _mm256_maskload_ps(p, __m256i(first_lanes(n)));
#else
  vf v = vf{};
  for (int i = 0; i < n; ++i) v[i] = p[i];
  return v;
#endif
}

// The first n lanes of v into p[0, n).
inline void store_first(float* p, vf v, int n) {
#if HEN_ISA_LEVEL >= 3
  _mm512_mask_storeu_ps(p, __mmask16((1u << n) - 1), v);
#elif HEN_ISA_LEVEL == 2
  _mm256_maskstore_ps(p, __m256i(first_lanes(n)), v);
#else
  for (int i = 0; i < n; ++i) p[i] = v[i];
#endif
}

// n elements of a row of dtype dt into floats.
inline void row_to_float(DType dt, const void* row, float* dst, int64_t n) {
  int64_t k = 0;
  for (; k + W <= n; k += W) store(dst + k, load_as_float(dt, row, k));
  for (; k < n; ++k) dst[k] = scalar_to_float(dt, row, k);
}

// load_as_float for elements k .. k + n - 1 (1 <= n <= W) of a row, the other lanes 0;
// nothing past element k + n - 1 is read (rows shorter than a vector).
inline vf load_as_float_first(DType dt, const void* row, int64_t k, int n) {
  if (dt == DType::F32) return load_first(static_cast<const float*>(row) + k, n);
  const uint16_t* s = static_cast<const uint16_t*>(row) + k;
#if HEN_ISA_LEVEL >= 3
  const __m256i h = _mm256_maskz_loadu_epi16(__mmask16((1u << n) - 1), s);
  if (dt == DType::BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
#else
  uint16_t part[W] = {};  // (no 16-bit masked load below AVX-512)
  for (int i = 0; i < n; ++i) part[i] = s[i];
  return load_as_float(dt, part, 0);
#endif
}

// The step that ends a row of D elements whose first k are done (0 < D - k < W), the same
// for every row: one whole vector ending at the row's end where the row holds one (lanes
// W - n .. W - 1 are the row's last n elements, the lanes before zeroed), else the first n
// lanes of a masked load (below AVX-512, 16-bit rows have no masked load: a copy).
struct TailStep {
  int64_t at;  // the element in lane 0
  int n;       // elements left
  bool whole;  // one whole vector ending at the row's end
  TailStep(int64_t D, int64_t k) : at(D >= W ? D - W : k), n(int(D - k)), whole(D >= W) {}
  // The n elements of a row of dtype dt, in their lanes, the other lanes 0.
  vf row(DType dt, const void* r) const {
    if (!whole) return load_as_float_first(dt, r, at, n);
    return lane_numbers(std::make_index_sequence<W>{}) >= W - n ? load_as_float(dt, r, at) : vf{};
  }
  vf floats(const float* p) const { return row(DType::F32, p); }
  // An accumulator row's lanes, the done ones included where whole (a product of the zero
  // lanes above adds 0 to them), and back.
  vf load_acc(const float* p) const { return whole ? load(p + at) : load_first(p + at, n); }
  void store_acc(float* p, vf v) const { whole ? store(p + at, v) : store_first(p + at, v, n); }
};

// W floats stored as 16-bit dt, rounded to nearest even (finite and NaN inputs;
// the weights of the softmax are all this path stores).
inline void store_16(DType dt, uint16_t* dst, vf v) {
  if (dt == DType::BF16) {
    vu bits;
    std::memcpy(&bits, &v, sizeof bits);
    bits = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
#if HEN_ISA_LEVEL >= 3
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(__m512i(bits)));
#else
    const vh h = __builtin_convertvector(bits, vh);
    std::memcpy(dst, &h, sizeof h);
#endif
    return;
  }
#if HEN_ISA_LEVEL >= 3
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
#elif HEN_ISA_LEVEL == 2
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
#else
  (void)dst, (void)v;  // the 16-bit products run only with AVX-512 (make_plan)
  std::abort();
#endif
}

// W softmax weights (in [0, 1] or NaN) rounded to 16-bit dt and widened back: what
// the value product multiplies by once stored (a value dt holds converts exactly), so
// that the kernel can normalise by their own sum.  bfloat16 rounds half up, two
// operations where store_16's ties-to-even takes five; a tie (one weight in 2^16)
// moves by one ulp of bfloat16 either way.
inline vf as_stored_16(DType dt, vf v) {
  if (dt == DType::BF16) {
    vu bits;
    std::memcpy(&bits, &v, sizeof bits);
    bits = (bits + 0x8000u) & 0xffff0000u;
    std::memcpy(&v, &bits, sizeof v);
    return v;
  }
#if HEN_ISA_LEVEL >= 3
  return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
#elif HEN_ISA_LEVEL == 2
  return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
#else
  std::abort();  // as store_16
#endif
}

// W floats stored as bfloat16 by AVX-512 BF16's conversion: the same rounding as
// store_16 (to nearest even; the softmax weights are never subnormal), in one
// instruction instead of seven.  Only where Plan::native_bf16 says the CPU has it;
// inline assembly because this copy's instruction set (cpu/isa_begin.h) lacks it.
#if HEN_ISA_LEVEL >= 3 && HEN_COMPILER_BF16
#define HEN_NATIVE_BF16 1
inline void store_bf16_native(uint16_t* dst, vf v) {
  __m256i r;
  asm("vcvtneps2bf16 %1, %0" : "=v"(r) : "v"(v));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), r);
}
#else
#define HEN_NATIVE_BF16 0
inline void store_bf16_native(uint16_t*, vf) { std::abort(); }  // make_plan never asks for it here
#endif

// --- W x W transpose in registers -------------------------------------------------

// Swapping the off-diagonal h x h blocks of every 2h x 2h block, for h = W/2 down
// to 1, transposes the matrix; each swap is one two-input shuffle per row.
template <int h, size_t... k>
constexpr vi swap_lo(std::index_sequence<k...>) {
  return vi{((int(k) & h) == 0 ? int(k) : int(W + k - h))...};
}
template <int h, size_t... k>
constexpr vi swap_hi(std::index_sequence<k...>) {
  return vi{((int(k) & h) == 0 ? int(k + h) : int(W + k))...};
}
template <int h>
__attribute__((always_inline)) inline void transpose_stage(vf* r) {
  constexpr vi lo = swap_lo<h>(std::make_index_sequence<W>{});
  constexpr vi hi = swap_hi<h>(std::make_index_sequence<W>{});
  for (int i = 0; i < W; ++i) {
    if (i & h) continue;
    const vf a = r[i], b = r[i + h];
    r[i] = __builtin_shuffle(a, b, lo);
    r[i + h] = __builtin_shuffle(a, b, hi);
  }
}
__attribute__((always_inline)) inline void transpose(vf* r) {
  if constexpr (W >= 16) transpose_stage<8>(r);
  if constexpr (W >= 8) transpose_stage<4>(r);
  transpose_stage<2>(r);
  transpose_stage<1>(r);
}

}  // namespace
