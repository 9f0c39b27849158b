// Fused streaming-softmax Hopfield update on the CPU, free of torch.
//
// One call computes, for every query, the Partial of DESIGN.md §2 over a bank
// chunk: out = softmax(beta * sim(X, s)) @ V normalised within the chunk, its
// log-sum-exp, and the best row.  The bank is walked once in row blocks with a
// running max, sum and accumulator per query, so no B x N score matrix exists.
//
// Work is cut into independent tiles (leading index, query block, bank split).
// The caller runs tiles on its own thread pool (the ATen binding uses
// at::parallel_for); when the bank is split, each split leaves an unnormalised
// partial in a workspace and `combine` merges them, as flash-decoding does.
#pragma once

#include <cstddef>
#include <cstdint>

namespace hen {

enum class Similarity : int { Dot = 0, L2 = 1, L2Sq = 2 };
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

struct PartialParams {
  // Inputs, row-major with unit stride along the feature dim; strides in elements.
  const void* query;   // (L, B, D)
  const void* memory;  // (Lm, N, D), Lm in {1, L}; memory_lead_stride = 0 when shared
  const void* values;  // (Lm, N, Dv)
  const float* beta;   // (L,)
  DType dtype;
  Similarity similarity;
  int64_t L, B, N, D, Dv;
  int64_t query_lead_stride, query_row_stride;
  int64_t memory_lead_stride, memory_row_stride;
  int64_t values_lead_stride, values_row_stride;
  int64_t offset;  // global index of the chunk's first row, added to top_index
  // Outputs, contiguous: out (L, B, Dv); lse, top_score, top_index (L, B).
  float* out;
  float* lse;
  float* top_score;
  int64_t* top_index;
};

// How the work is cut: chosen from the shape and the thread count (see make_plan).
struct Plan {
  int64_t query_block;     // queries sharing one pass over a bank tile
  int64_t row_block;       // bank rows per streamed block
  int64_t splits;          // bank splits per query block (1: no workspace, no combine)
  int64_t rows_per_split;  // a multiple of row_block
  int64_t query_blocks;    // ceil(B / query_block)
  int64_t tiles(const PartialParams& p) const { return p.L * query_blocks * splits; }
};

// Unnormalised per-split partials, (L, splits, B, ...): only used when splits > 1.
struct Workspace {
  float* acc;          // (L, splits, B, Dv)
  float* max;          // (L, splits, B)
  float* sum;          // (L, splits, B)
  float* top_score;    // (L, splits, B)
  int64_t* top_index;  // (L, splits, B)
};

Plan make_plan(const PartialParams& p, int num_threads);

// Compute tile `tile` in [0, plan.tiles(p)); thread safe across distinct tiles.
void run_tile(const PartialParams& p, const Plan& plan, int64_t tile, const Workspace& ws);

// Merge the splits of queries [begin, end) of the flattened (L * B) range into the outputs.
void combine(const PartialParams& p, const Plan& plan, int64_t begin, int64_t end, const Workspace& ws);

// Which instruction set the tiles run with ("avx2" or "baseline"), for logs and tests.
const char* isa_name();

}  // namespace hen
