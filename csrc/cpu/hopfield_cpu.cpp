// Planning, split combine and instruction-set dispatch for the CPU kernel.
#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/hopfield_cpu.h"

namespace hen {
namespace avx2 {
void run_tile(const PartialParams&, const Plan&, int64_t, const Workspace&);
}
namespace baseline {
void run_tile(const PartialParams&, const Plan&, int64_t, const Workspace&);
}

namespace {
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}
}  // namespace

// Block sizes keep a tile's working set in a 512 KiB L2: the accumulators
// (query_block x Dv floats) within 256 KiB and a bank block (row_block x D)
// within 128 KiB.  Splitting the bank gives every thread several tiles even
// when there are few queries (the recall regime); each split still covers
// whole row blocks, and the workspace it needs grows with splits x B x Dv,
// never with N.
Plan make_plan(const PartialParams& p, int num_threads) {
  Plan plan{};
  plan.query_block = std::min<int64_t>(std::max<int64_t>(p.B, 1),
                                       std::clamp<int64_t>(65536 / std::max<int64_t>(p.Dv, 1), 4, 64));
  plan.row_block = std::clamp<int64_t>(32768 / std::max<int64_t>(p.D, 1) / 8 * 8, 16, 256);
  const int64_t query_tiles = std::max<int64_t>(p.L * ceil_div(std::max<int64_t>(p.B, 1), plan.query_block), 1);
  const int64_t want = ceil_div(4 * std::max(num_threads, 1), query_tiles);
  const int64_t most = std::max<int64_t>(ceil_div(p.N, 4 * plan.row_block), 1);
  plan.splits = std::clamp<int64_t>(want, 1, most);
  plan.rows_per_split = ceil_div(ceil_div(std::max<int64_t>(p.N, 1), plan.splits), plan.row_block) * plan.row_block;
  plan.splits = ceil_div(std::max<int64_t>(p.N, 1), plan.rows_per_split);
  plan.query_blocks = ceil_div(p.B, plan.query_block);
  return plan;
}

void run_tile(const PartialParams& p, const Plan& plan, int64_t tile, const Workspace& ws) {
  if (has_avx2())
    avx2::run_tile(p, plan, tile, ws);
  else
    baseline::run_tile(p, plan, tile, ws);
}

const char* isa_name() { return has_avx2() ? "avx2" : "baseline"; }

void combine(const PartialParams& p, const Plan& plan, int64_t begin, int64_t end, const Workspace& ws) {
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t S = plan.splits, Dv = p.Dv;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t l = row / p.B, b = row % p.B;
    auto slot = [&](int64_t s) { return (l * S + s) * p.B + b; };
    float m = neg_inf, best = neg_inf;
    int64_t best_index = -1;
    bool nan = false;
    for (int64_t s = 0; s < S; ++s) {
      const int64_t k = slot(s);
      nan |= std::isnan(ws.sum[k]);
      m = std::max(m, ws.max[k]);
      // Ties go to the smaller global row, as a single pass would answer.
      if (ws.top_score[k] > best || (ws.top_score[k] == best && ws.top_index[k] >= 0 &&
                                     (best_index < 0 || ws.top_index[k] < best_index))) {
        best = ws.top_score[k];
        best_index = ws.top_index[k];
      }
    }
    float* o = p.out + row * Dv;
    std::fill(o, o + Dv, 0.f);
    float sum = 0.f;
    if (nan) {
      std::fill(o, o + Dv, NAN);
      sum = NAN;
    } else if (m != neg_inf) {
      for (int64_t s = 0; s < S; ++s) {
        const int64_t k = slot(s);
        if (ws.max[k] == neg_inf) continue;
        const float w = std::exp(ws.max[k] - m);
        sum += ws.sum[k] * w;
        const float* a = ws.acc + k * Dv;
        for (int64_t d = 0; d < Dv; ++d) o[d] += w * a[d];
      }
      const float inv = 1.f / sum;
      for (int64_t d = 0; d < Dv; ++d) o[d] *= inv;
    }
    p.lse[row] = nan ? NAN : (sum > 0.f ? m + std::log(sum) : neg_inf);
    p.top_score[row] = best;
    p.top_index[row] = best_index;
  }
}

}  // namespace hen
