// Per-row and per-pair helpers shared by the forward and backward tile kernels
// (tile_kernel.cpp, backward_kernel.cpp): the direct ℓ2 form, row norms, VNNI
// packing, padded and widened copies of bank tiles.  Included inside an
// instruction-set namespace, after simd.h and hand_products.h.
#pragma once

namespace {

template <typename T>
T* grow(std::vector<T>& v, int64_t n) {
  if (v.size() < size_t(n)) v.resize(size_t(n));
  return v.data();
}

// --- per-pair and per-row helpers ---------------------------------------------------

// sum_d w_d (q_d - x_d)² in float32 from the inputs (w null: unweighted): the ℓ2
// form that does not cancel near zero (docs/design.md §5.1).
float direct_sq(const float* q, const float* w, DType xdt, const void* x, int64_t D) {
  vf acc = vf{};
  int64_t k = 0;
  for (; k + W <= D; k += W) {
    const vf d = load(q + k) - load_as_float(xdt, x, k);
    acc += w ? load(w + k) * d * d : d * d;
  }
  float t = hsum(acc);
  for (; k < D; ++k) {
    const float d = q[k] - scalar_to_float(xdt, x, k);
    t += w ? w[k] * d * d : d * d;
  }
  return t;
}

// The pairs of a score vector: lane i pairs query row q + i * q_step (weights
// w + i * q_step, or none) with bank row x + i * x_step bytes.  W queries against
// one row (q_step = D, x_step = 0), or one query against W rows (0, the row stride).
struct LanePairs {
  const float* q;
  int64_t q_step;
  const float* w;
  const char* x;
  int64_t x_step;
};

// The lanes of d2 that `flag` marks, for lanes i < live, recomputed directly.  Out of
// line: rare, and its loop would keep the caller's score lambda from being inlined.
__attribute__((noinline)) vf recompute_flagged(vf d2, vi flag, int live, LanePairs lp, int64_t D, DType xdt) {
  for (int i = 0; i < live; ++i)
    if (flag[i])
      d2[i] = direct_sq(lp.q + i * lp.q_step, lp.w ? lp.w + i * lp.q_step : nullptr, xdt, lp.x + i * lp.x_step, D);
  return d2;
}

// docs/design.md §5.1 for one vector of pairs: d² = sum - 2c from the products
// (sum = |q|²_w + |x|²_w), recomputed directly where it may have cancelled (when
// `recompute`; `pairs()` gives their LanePairs), and never below 0 (rounding may leave
// a tiny negative; NaN stays NaN).  The pairs are built only there: a LanePairs passed
// by value was written to the stack for every vector (measured, layer regime, the same
// bits: ℓ2 calls 7-11 % faster in bfloat16 and 3-5 % in float32 without).  `flagged`, when
// given, is set to the recomputed lanes where there are any (the backward's near pairs).
struct FlaggedLanes {
  vi lanes;
  bool any = false;
};
template <typename Pairs>
inline vf l2_distance_sq(vf sum, vf c, bool recompute, int live, Pairs&& pairs, int64_t D, DType xdt,
                         FlaggedLanes* flagged = nullptr) {
  vf d2 = sum - 2.f * c;
  const vi flag = d2 < splat(kL2DirectBelow) * sum;
  if (recompute && any(flag)) [[unlikely]] {
    d2 = recompute_flagged(d2, flag, live, pairs(), D, xdt);
    if (flagged) flagged->lanes = flag, flagged->any = true;
  }
  return d2 < vf{} ? vf{} : d2;
}

// The rest of eight rows' sum_d w_d x_jd² (w_d = 1 without w) from depth k on, W elements at
// a time and the tail as finish_dots takes it, added to acc and reduced into out[0..8).
template <DType DT>
inline void finish_norms(const char* x, int64_t ldx, int64_t D, int64_t k, vf* acc, float* out, const float* w) {
  if (w)
    for (; k + W <= D; k += W) {
      const vf wk = load(w + k);
      for (int b = 0; b < 8; ++b) {
        const vf v = lf<DT>(x + b * ldx, k);
        acc[b] += wk * v * v;
      }
    }
  else
    for (; k + W <= D; k += W)
      for (int b = 0; b < 8; ++b) {
        const vf v = lf<DT>(x + b * ldx, k);
        acc[b] += v * v;
      }
  if (k < D) {
    const TailStep t(D, k);
    if (w) {
      const vf wk = t.floats(w);
      for (int b = 0; b < 8; ++b) {
        const vf v = t.row(DT, x + b * ldx);
        acc[b] += wk * v * v;
      }
    } else {
      for (int b = 0; b < 8; ++b) {
        const vf v = t.row(DT, x + b * ldx);
        acc[b] += v * v;
      }
    }
  }
  reduce_lanes<8>(acc, out);
}

// out[j] = sum_d w_d x_jd² (w_d = 1 without w) in float32 for `rows` rows (a multiple of 8)
// of dtype DT, eight rows at a time, reduced by the same folds whatever a row's place.
template <DType DT>
void row_norms(const char* x, int64_t ldx, int64_t rows, int64_t D, float* out, const float* w = nullptr) {
  for (int64_t j = 0; j < rows; j += 8) {
    vf acc[8];
    for (int b = 0; b < 8; ++b) acc[b] = vf{};
    int64_t k = 0;
    if constexpr (DT == DType::BF16)  // in pairs, as dot_block takes them
      if (!w)
        for (; k + 2 * W <= D; k += 2 * W)
          for (int b = 0; b < 8; ++b) {
            vf e, o;
            load_bf16_pairs(x + (j + b) * ldx, k, e, o);
            acc[b] += e * e + o * o;
          }
    finish_norms<DT>(x + j * ldx, ldx, D, k, acc, out + j, w);
  }
}

#if HEN_NATIVE_BF16
// row_norms of bfloat16 rows, unweighted, with each 2W elements on the pair dot product, as
// pair_block sums its norms: one instruction where row_norms widens, multiplies twice and
// adds.  For a tile whose scores a microkernel computed (AMX), where |x|² is a pass of its
// own: eight ℓ2 bf16 queries over 262144 x 512 took 24.2 ms against 24.8 with row_norms.
HEN_BF16_PAIRS void pair_row_norms(const char* x, int64_t ldx, int64_t rows, int64_t D, float* out) {
  for (int64_t j = 0; j < rows; j += 8) {
    vf acc[8];
    for (int b = 0; b < 8; ++b) acc[b] = vf{};
    int64_t k = 0;
    for (; k + 2 * W <= D; k += 2 * W)
      for (int b = 0; b < 8; ++b) {
        const vf v = load_raw(x + (j + b) * ldx + 2 * k);
        dot_pairs(acc[b], v, v);
      }
    finish_norms<DType::BF16>(x + j * ldx, ldx, D, k, acc, out + j, nullptr);
  }
}
#endif

// sum_d x_d² in float32.
float sum_sq(DType dt, const void* x, int64_t D) {
  vf acc = vf{};
  int64_t k = 0;
  for (; k + W <= D; k += W) {
    const vf v = load_as_float(dt, x, k);
    acc += v * v;
  }
  float t = hsum(acc);
  for (; k < D; ++k) {
    const float v = scalar_to_float(dt, x, k);
    t += v * v;
  }
  return t;
}

// Rows r0, r0 + 1 of a 16-bit (K x N) matrix, interleaved: the VNNI layout of microkernel.h.
void pack_pairs(const uint16_t* r0, const uint16_t* r1, int64_t N, uint32_t* out) {
  int64_t n = 0;
#if HEN_ISA_LEVEL >= 3
  // unpack interleaves within 128-bit lanes; the two permutes put the lanes back in order.
  const __m512i first = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
  const __m512i second = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
  for (; n + 32 <= N; n += 32) {
    const __m512i a = _mm512_loadu_si512(r0 + n), b = _mm512_loadu_si512(r1 + n);
    const __m512i lo = _mm512_unpacklo_epi16(a, b), hi = _mm512_unpackhi_epi16(a, b);
    _mm512_storeu_si512(out + n, _mm512_permutex2var_epi64(lo, first, hi));
    _mm512_storeu_si512(out + n + 16, _mm512_permutex2var_epi64(lo, second, hi));
  }
#endif
  for (; n + W <= N; n += W) {
    vh a, b;
    std::memcpy(&a, r0 + n, sizeof a);
    std::memcpy(&b, r1 + n, sizeof b);
    const vu v = __builtin_convertvector(a, vu) | (__builtin_convertvector(b, vu) << 16);
    std::memcpy(out + n, &v, sizeof v);
  }
  for (; n < N; ++n) out[n] = uint32_t(r0[n]) | (uint32_t(r1[n]) << 16);
}

// A 16-bit (rows x cols) matrix with rows lds elements apart, rows even, as the VNNI B
// operand of microkernel.h: rows 2i and 2i + 1 interleaved, ld pairs from one to the next.
void vnni_rows(const uint16_t* src, int64_t lds, int64_t rows, int64_t cols, int64_t ld, uint16_t* dst) {
  for (int64_t j = 0; j < rows; j += 2)
    pack_pairs(src + j * lds, src + (j + 1) * lds, cols, reinterpret_cast<uint32_t*>(dst) + (j / 2) * ld);
}

// dst[k * ld + i] = word k of row i, for `rows` rows of `words` 32-bit words, row i at src +
// i * row_bytes (any alignment): W x W blocks transposed in registers (bits moved, never
// computed on), the edges one word at a time.  Once per query block for the score
// product's B operand: the word-at-a-time loop alone took about a quarter of run_tile's
// samples with 512 bf16 queries a bank of 512 x 128 (Xeon, AMX, perf).
void transpose_words(const char* src, int64_t row_bytes, int64_t rows, int64_t words, uint32_t* dst, int64_t ld) {
  int64_t i0 = 0;
  for (; i0 + W <= rows; i0 += W) {
    int64_t k0 = 0;
    for (; k0 + W <= words; k0 += W) {
      vf b[W];
      for (int r = 0; r < W; ++r) std::memcpy(&b[r], src + (i0 + r) * row_bytes + 4 * k0, sizeof(vf));
      transpose(b);
      for (int r = 0; r < W; ++r) std::memcpy(dst + (k0 + r) * ld + i0, &b[r], sizeof(vf));
    }
    for (; k0 < words; ++k0)
      for (int64_t i = i0; i < i0 + W; ++i) std::memcpy(dst + k0 * ld + i, src + i * row_bytes + 4 * k0, 4);
  }
  for (; i0 < rows; ++i0)
    for (int64_t k = 0; k < words; ++k) std::memcpy(dst + k * ld + i0, src + i0 * row_bytes + 4 * k, 4);
}

// The transpose of a 16-bit (rows x cols) matrix with rows lds elements apart, cols even, as
// the VNNI B operand: element (k, i) of the transpose at (k / 2) * 2 ld + 2 i + k % 2, i.e.
// the pair of columns k / 2 of row i is word (k / 2) * ld + i.  Columns i >= rows of the image
// are the caller's (zero padding).
void vnni_transposed(const uint16_t* src, int64_t lds, int64_t rows, int64_t cols, int64_t ld, uint16_t* dst) {
  transpose_words(reinterpret_cast<const char*>(src), 2 * lds, rows, cols / 2, reinterpret_cast<uint32_t*>(dst), ld);
  if (cols % 2)  // (the VNNI products take even depths only; kept whole for any caller)
    for (int64_t i = 0; i < rows; ++i) dst[(cols / 2) * ld * 2 + i * 2] = src[i * lds + cols - 1];
}

// The (cols x rows) transpose of a row-major (rows x cols) float matrix, into buf: the float32
// products' B operand of queries (Q^T, w^T, dout^T).
float* transposed(const float* m, int64_t rows, int64_t cols, std::vector<float>& buf) {
  float* t = grow(buf, cols * rows);
  transpose_words(reinterpret_cast<const char*>(m), 4 * cols, rows, cols, reinterpret_cast<uint32_t*>(t), rows);
  return t;
}

// Copy R rows of `cols` elements (row stride `stride` elements of `es` bytes) into a tile
// of `rows` rows `ld` >= cols apart (ld 0: cols), zero below R and right of cols: a tail
// tile is padded, never computed by another path, and an odd depth is made even for the
// VNNI products (a zero pair element adds nothing).
const char* pad_rows(const char* src, int64_t stride, size_t es, int64_t R, int64_t rows, int64_t cols,
                     std::vector<float>& buf, int64_t ld = 0) {
  if (ld == 0) ld = cols;
  char* d = reinterpret_cast<char*>(grow(buf, int64_t((es * size_t(rows * ld) + 3) / 4)));
  for (int64_t j = 0; j < R; ++j) {
    std::memcpy(d + es * size_t(j * ld), src + es * size_t(j * stride), es * size_t(cols));
    std::memset(d + es * size_t(j * ld + cols), 0, es * size_t(ld - cols));
  }
  std::memset(d + es * size_t(R * ld), 0, es * size_t((rows - R) * ld));
  return d;
}

// A row stride (in floats) for `cols` floats that is not a multiple of 1 KiB: rows 1, 2, 4
// or 8 KiB apart fall into the same few cache sets as the microkernel streams them.
// Measured: float32 bank rows of D = 2048 ran 16 % faster from a stride of D + 16, and
// the widened bf16 tiles 26-32 % faster at D = 512-2048 (AVX2 forced on an EPYC Zen 4).
inline int64_t padded_stride(int64_t cols) { return cols % 256 == 0 ? cols + 16 : cols; }

// Whether a float32 tile with rows `stride` floats apart is worth copying to padded_stride
// rows for the float32 brgemm products of a block of `queries` queries over `cols` features:
// with AVX2, from 1 KiB strides on and only where the products outweigh the copy.
// Measured (EPYC Zen 4 with AVX2 forced, copy included): B = 64 4-16 % faster at
// D = 512-2048, B = 32 at D = 2048 9 % faster; but recall's B = 8 at D = 512 20 % slower
// (memory-bound: the copy is another pass over the tile) and B = 16 or 32 at D = 512 4-10 %
// slower.  With AVX-512 the copy cost more than it saved (7-9 % at B = 64).
inline bool restride_float_tile(int64_t stride, int64_t queries, int64_t cols) {
  return HEN_ISA_LEVEL == 2 && stride % 256 == 0 && queries * cols >= 64 * 512;
}

// `rows` rows of dtype dt as float rows, padded_stride(cols) apart (returned in ld_out).
float* float_rows(DType dt, const char* src, int64_t ld, int64_t rows, int64_t cols, std::vector<float>& buf,
                  int64_t& ld_out) {
  ld_out = padded_stride(cols);
  float* dst = grow(buf, rows * ld_out);
  const size_t es = dt == DType::F32 ? 4 : 2;
  for (int64_t j = 0; j < rows; ++j) row_to_float(dt, src + es * size_t(j * ld), dst + j * ld_out, cols);
  return dst;
}

}  // namespace
