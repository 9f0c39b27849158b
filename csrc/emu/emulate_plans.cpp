// The plans of csrc/cuda/hopfield_cuda.cu on emulated devices (issue 16 item 4):
// the resident blocks per SM come from the runtime's occupancy calculator for
// the chosen instance (cached per device and instance), not an assumption, and
// the bank split follows them; weighted plans fall back to the simt kernel
// where the mma kernel's shared memory does not fit.  Part of emulate_test
// (its main runs these after the kernel cases); no kernel runs here.
#include <cstdint>
#include <cstdio>
#include <string>

#include "emu/cuda_emulator.h"
#include "cuda/hopfield_cuda.h"

namespace {

using hen::DType;
using hen::Similarity;
using hen::cuda::Kernel;
using hen::cuda::Plan;
using hen::cuda::PlanHints;

// Emulated devices, each set up once before its first device_info (which caches it).
constexpr int kOneBlock = 0;   // the kernel cases' device: registers allow one block per SM
constexpr int kTwoBlocks = 1;  // registers allow two
constexpr int kMany = 2;       // registers allow eight: shared memory and threads limit
constexpr int kA100 = 3;       // 163 KiB of opt-in shared memory per block, like an A100

void set_up_devices() {
  hen_emu::device(kOneBlock).register_blocks = 1;
  hen_emu::device(kTwoBlocks).register_blocks = 2;
  hen_emu::device(kMany).register_blocks = 8;
  hen_emu::device(kA100).register_blocks = 2;
  hen_emu::device(kA100).max_smem_optin = 163 * 1024;
  hen_emu::device(kA100).smem_per_sm = 164 * 1024;
}

// Parameters for planning only: make_plan reads the pointers for alignment and
// for keys = values, never their data.
hen::PartialParams params(DType dt, Similarity sim, int64_t B, int64_t N, int64_t D, bool weighted) {
  alignas(16) static float data[16];
  hen::PartialParams p{};
  p.query = p.memory = p.values = data;
  p.weights = weighted ? data : nullptr;
  p.dtype = dt;
  p.similarity = sim;
  p.L = 1, p.B = B, p.N = N, p.D = D, p.Dv = D;
  p.query_row_stride = p.memory_row_stride = p.values_row_stride = D;
  return p;
}

// The plan, or an empty optional-like flag with the planner's message.
struct Planned {
  Plan plan{};
  const char* error = nullptr;
};
Planned plan_on(int device, const hen::PartialParams& p, PlanHints hints = {}) {
  hen::cuda::DeviceInfo dev{};
  Planned r;
  if ((r.error = hen::cuda::device_info(device, &dev)) != nullptr) return r;
  r.error = hen::cuda::make_plan(p, dev, hints, &r.plan);
  return r;
}

std::string describe(const Planned& r) {
  if (r.error) return std::string("error: ") + r.error;
  char buf[160];
  std::snprintf(buf, sizeof buf, "%s blocks/SM=%d splits=%lld query_blocks=%lld weighted=%d smem=%lld",
                r.plan.kernel == Kernel::Mma ? "mma" : "simt", r.plan.blocks_per_sm,
                static_cast<long long>(r.plan.splits), static_cast<long long>(r.plan.query_blocks), r.plan.weighted,
                static_cast<long long>(r.plan.smem_bytes));
  return buf;
}

}  // namespace

void plan_checks(const std::string& filter, int& ran, int& failed) {
  set_up_devices();
  using S = Similarity;
  using T = DType;
  auto report = [&](const char* name, bool ok, const std::string& detail) {
    if (!filter.empty() && std::string(name).find(filter) == std::string::npos) return;
    ++ran;
    failed += !ok;
    std::printf("%-4s %-44s %s\n", ok ? "ok" : "FAIL", name, detail.c_str());
    std::fflush(stdout);
  };

  {  // Recall (one query block): the split fills every resident slot once, so it doubles with the occupancy.
    const hen::PartialParams p = params(T::BF16, S::Dot, 1, 1 << 20, 128, false);
    const Planned one = plan_on(kOneBlock, p), two = plan_on(kTwoBlocks, p);
    const bool ok = !one.error && !two.error && one.plan.blocks_per_sm == 1 && two.plan.blocks_per_sm == 2 &&
                    one.plan.splits == 4 && two.plan.splits == 8;
    report("plan-split-follows-occupancy", ok, describe(one) + " | " + describe(two));
  }
  {  // One occupancy query per device and instance, however many plans.
    const int before = hen_emu::device(kMany).occupancy_queries;
    const hen::PartialParams p = params(T::F32, S::L2, 1, 5000, 64, false);
    for (int i = 0; i < 3; ++i) plan_on(kMany, p);
    const int same = hen_emu::device(kMany).occupancy_queries - before;
    plan_on(kMany, params(T::F32, S::L2, 4, 5000, 64, false));  // four queries per block: another instance
    const int other = hen_emu::device(kMany).occupancy_queries - before - same;
    report("plan-occupancy-asked-once-per-instance", same == 1 && other == 1,
           "queries: " + std::to_string(same) + " for three plans, " + std::to_string(other) + " for another instance");
  }
  {  // Shared memory limits the occupancy where registers would allow more.
    const Planned small = plan_on(kMany, params(T::BF16, S::Dot, 64, 4096, 64, false));
    const Planned big = plan_on(kMany, params(T::BF16, S::L2, 64, 4096, 256, true));
    const bool ok = !small.error && !big.error && small.plan.kernel == Kernel::Mma && big.plan.kernel == Kernel::Mma &&
                    small.plan.blocks_per_sm == 8 && big.plan.blocks_per_sm == 1 && big.plan.weighted;
    report("plan-smem-limits-occupancy", ok, describe(small) + " | " + describe(big));
  }
  {  // Query blocks that fill two waves already: no split, no combine.
    const Planned r = plan_on(kOneBlock, params(T::BF16, S::Dot, 64 * 20, 100000, 64, false));
    report("plan-no-split-when-queries-fill-the-gpu", !r.error && r.plan.splits == 1, describe(r));
  }
  {  // Whole waves: 3 query blocks on 8 slots fill best with 5 splits (15 of 16 slots).
    const Planned r = plan_on(kTwoBlocks, params(T::BF16, S::Dot, 3 * 64, 100000, 64, false));
    report("plan-split-fills-whole-waves", !r.error && r.plan.blocks_per_sm == 2 && r.plan.splits == 5, describe(r));
  }
  {  // Weighted l2 at D = 256 needs ~170 KiB for the mma kernel: the simt kernel where that does not fit.
    const hen::PartialParams w = params(T::BF16, S::L2, 64, 4096, 256, true);
    const Planned a100 = plan_on(kA100, w), forced = plan_on(kA100, w, PlanHints{Kernel::Mma, 0, 0});
    const Planned h100 = plan_on(kTwoBlocks, w), plain = plan_on(kA100, params(T::BF16, S::L2, 64, 4096, 256, false));
    const bool ok = !a100.error && a100.plan.kernel == Kernel::Simt && a100.plan.weighted && forced.error != nullptr &&
                    !h100.error && h100.plan.kernel == Kernel::Mma && !plain.error && plain.plan.kernel == Kernel::Mma;
    report("plan-weighted-mma-falls-back-where-smem-lacks", ok,
           describe(a100) + " | forced: " + describe(forced) + " | " + describe(h100));
  }
}
