// The CUDA kernels' host interface, free of torch and of CUDA headers.
//
// The kernels compute the same Partial as the CPU kernel (hopfield_params.h,
// docs/design.md §2) from the same hen::PartialParams, with every pointer in
// it on one CUDA device.  The ATen binding (binding.cpp) checks the tensors,
// asks for a Plan, allocates the Workspace when the plan splits the bank, and
// launches on the current stream; nothing here allocates memory.
//
// Kernels (each header says why it exists and which regime it serves):
//   simt     simt_kernel.cuh: CUDA cores, any dtype, D and Dv up to 8192: the
//            recall regime (few queries, huge bank, any D) and the fallback
//            for float32 and for D > 256.
//   mma      mma_kernel.cuh: tensor cores (mma.sync m16n8k16, fp16/bf16 in,
//            fp32 accumulate), D, Dv <= 256, more than a handful of queries:
//            the layer regime, and recall with tens of queries at small D.
//   combine  combine_kernel.cuh: merges the per-split partials of either
//            kernel (flash-decoding).
// Both compute kernels take PartialParams::weights (docs/design.md §5.1) through
// instances of their own, chosen by the plan.
#pragma once

#include <cstdint>
#include <optional>

#include "hopfield_params.h"

namespace hen {
namespace cuda {

enum class Kernel : int { Simt = 0, Mma = 1 };

// What the planner needs to know about the device.
struct DeviceInfo {
  int device;          // its index, for the occupancy queries of make_plan
  int sm_count;
  int max_smem_optin;  // bytes of dynamic shared memory a block may opt in to
  int cc_major, cc_minor;
};

// How one call is cut.  Tiles are (leading index, query block, bank split);
// with splits > 1 every tile leaves an unnormalised partial in the Workspace
// (layout of hopfield_params.h: (L, splits, B, ...)) and `combine` merges them.
struct Plan {
  Kernel kernel;
  int threads;            // per block
  int query_block;        // queries per block
  int team;               // simt: threads that share one bank row (a power of 2)
  int chunks;             // simt: 16-byte chunks of a row per thread (1, 2, 4 or 8)
  int head_dim;           // mma: D and Dv padded to 32, 64, 128 or 256
  bool vector_loads;      // 16-byte loads are aligned for every row
  bool values_are_memory; // one tile serves keys and values
  bool weighted;          // the instance that takes PartialParams::weights
  int blocks_per_sm;      // blocks of the chosen instance resident per SM (the runtime's occupancy calculator)
  int64_t query_blocks;   // ceil(B / query_block)
  int64_t splits;         // bank splits per query block
  int64_t rows_per_split; // bank rows per split (a multiple of the kernel's row step)
  int64_t smem_bytes;     // dynamic shared memory per block
  int64_t blocks() const { return query_blocks * splits; }  // per leading index
};

// Choices the planner would otherwise make, forced by tests so that small
// shapes reach every kernel, query block and bank split; production calls pass
// none (PlanHints{}).  A kernel the shape cannot take is an error; a query
// block that does not fit the registers is ignored.
struct PlanHints {
  std::optional<Kernel> kernel;  // none: chosen from the dtype, D and B
  int query_block = 0;           // simt: 1 or 4 queries per block; 0: chosen
  int64_t splits = 0;            // bank splits (at most N and the combine's limit); 0: chosen
};

// Each returns nullptr on success, else a message (a static string or one
// owned by the calling thread, valid until its next call).

// The device's SM count and shared memory limit, cached per device.
const char* device_info(int device, DeviceInfo* info);

// Pick kernel, block shape and bank split from the shape and the device.  The
// split follows the chosen instance's real occupancy (resident blocks per SM,
// asked of the runtime once per device and instance): enough blocks to fill the
// GPU, in whole waves where possible.
const char* make_plan(const PartialParams& p, const DeviceInfo& dev, const PlanHints& hints, Plan* plan);

// Launch the plan on `stream` (a cudaStream_t) of device `device`.  `ws` must
// hold plan.splits partials per query when plan.splits > 1.
const char* launch(const PartialParams& p, const Plan& plan, const Workspace& ws, int device, void* stream);

// What was compiled: "archs=800,900 cuda=13.0" (the __CUDA_ARCH_LIST__ of this build).
const char* build_info();

}  // namespace cuda
}  // namespace hen
