// What every kernel of csrc/ computes, and the arguments they all take: the
// Partial of docs/design.md §2 over one bank chunk, for every query: out =
// softmax(beta * sim(X, s)) @ V normalised within the chunk, its log-sum-exp,
// and the best row.  The CPU kernel (cpu/) and the CUDA kernels (cuda/) read
// the same structs, so the one ATen binding (binding.cpp) fills them once for
// either device.  Free of torch and of CUDA headers.
#pragma once

#include <cstdint>

namespace hen {

// The integer codes are the op's `similarity` argument: hen_kernels/constants.py
// SIMILARITY_CODES holds the same numbers on the Python side.
enum class Similarity : int { Dot = 0, L2 = 1, L2Sq = 2 };
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// docs/design.md §5.1: where the expanded ℓ2 form d² = |q|² + |x|² - 2 q.x falls
// below this fraction of |q|² + |x|² it may have cancelled, and d² is recomputed
// directly as sum_d w_d (q_d - x_d)².  hen_kernels/constants.py L2_DIRECT_BELOW
// holds the same number (a test ties the two).
constexpr float kL2DirectBelow = 1.0f / 16.0f;

// docs/design.md §4: the smallest beta the kernels apply (in float32): below it a similarity past
// the float32 range, scored -inf, could have carried weight.  The plain CPU case declines a smaller
// one, so that the Python checks refuse it by name.  hen_kernels/constants.py FLOAT32_MIN_BETA holds
// the same number (a test ties the two).
constexpr double kFloat32MinBeta = 1e-30;

struct PartialParams {
  // Inputs, row-major with unit stride along the feature dim; strides in elements.
  const void* query;   // (L, B, D)
  const void* memory;  // (Lm, N, D), Lm in {1, L}; memory_lead_stride = 0 when shared
  const void* values;  // (Lm, N, Dv)
  const float* beta;   // (L,)
  // Per-query feature weights (L, B, D), contiguous float32, or nullptr: sim uses
  // sum_d w_d q_d x_d (dot) or sum_d w_d (x_d - q_d)^2 (l2 forms), docs/design.md §4.
  const float* weights;
  DType dtype;
  Similarity similarity;
  int64_t L, B, N, D, Dv;
  int64_t query_lead_stride, query_row_stride;
  int64_t memory_lead_stride, memory_row_stride;
  int64_t values_lead_stride, values_row_stride;
  // A query or bank whose leading index is two dims that do not merge into one stride (heads
  // split from a projection's rows: (batch, S, heads * d) viewed as (batch, heads, S, d))
  // is read in place: index l is (l / lead_inner, l % lead_inner), its rows at
  // memory_lead_stride * (l / lead_inner) + memory_lead_inner_stride * (l % lead_inner).
  // lead_inner = 1 for one stride.  The CPU kernel only: the binding hands the CUDA
  // kernels inputs with one stride (a copy).
  int64_t lead_inner;
  int64_t query_lead_inner_stride, memory_lead_inner_stride, values_lead_inner_stride;
  int64_t offset;  // global index of the chunk's first row, added to top_index
  // Outputs, contiguous: out (L, B, Dv); lse, top_score, top_index (L, B).
  float* out;
  float* lse;
  float* top_score;
  int64_t* top_index;

  int64_t query_lead(int64_t l) const { return lead_offset(l, query_lead_stride, query_lead_inner_stride); }
  int64_t memory_lead(int64_t l) const { return lead_offset(l, memory_lead_stride, memory_lead_inner_stride); }
  int64_t values_lead(int64_t l) const { return lead_offset(l, values_lead_stride, values_lead_inner_stride); }
  int64_t lead_offset(int64_t l, int64_t outer, int64_t inner) const {
    return lead_inner <= 1 ? l * outer : (l / lead_inner) * outer + (l % lead_inner) * inner;
  }
  // Keys = values (the same rows at the same strides): one load of each bank tile serves both products.
  bool values_are_memory() const {
    return values == memory && values_lead_stride == memory_lead_stride &&
           values_lead_inner_stride == memory_lead_inner_stride && values_row_stride == memory_row_stride && Dv == D;
  }
};

// When a plan splits the bank (flash-decoding), each split leaves its
// unnormalised partial here and a combine step merges them; the layout is
// (L, splits, B, ...) on both devices.  Unused when splits == 1.
struct Workspace {
  float* acc;          // (L, splits, B, Dv)
  float* max;          // (L, splits, B)
  float* sum;          // (L, splits, B)
  float* top_score;    // (L, splits, B)
  int64_t* top_index;  // (L, splits, B)
};

}  // namespace hen
