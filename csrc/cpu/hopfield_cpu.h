// The fused streaming-softmax Hopfield update on the CPU, free of torch.
//
// It computes the Partial of hopfield_params.h.  The bank is walked once in
// row blocks with a running max, sum and accumulator per query, so no B x N
// score matrix exists.
//
// Work is cut into independent tiles (leading index, query block, bank split).
// The caller runs tiles on its own thread pool (the ATen binding uses
// at::parallel_for); when the bank is split, each split leaves an unnormalised
// partial in the Workspace and `combine` merges them, as flash-decoding does.
#pragma once

#include <cstddef>
#include <cstdint>

#include "hopfield_params.h"

namespace hen {

// How the work is cut: chosen from the shape and the thread count (see make_plan).
struct Plan {
  int64_t query_block;     // queries sharing one pass over a bank tile
  int64_t row_block;       // bank rows per streamed block
  int64_t splits;          // bank splits per query block (1: no workspace, no combine)
  int64_t rows_per_split;  // a multiple of row_block
  int64_t query_blocks;    // ceil(B / query_block)
  int64_t tiles(const PartialParams& p) const { return p.L * query_blocks * splits; }
};

Plan make_plan(const PartialParams& p, int num_threads);

// Compute tile `tile` in [0, plan.tiles(p)); thread safe across distinct tiles.
void run_tile(const PartialParams& p, const Plan& plan, int64_t tile, const Workspace& ws);

// Merge the splits of queries [begin, end) of the flattened (L * B) range into the outputs.
void combine(const PartialParams& p, const Plan& plan, int64_t begin, int64_t end, const Workspace& ws);

// Which instruction set the tiles run with ("avx2" or "baseline"), for logs and tests.
const char* isa_name();

}  // namespace hen
