// combine_kernel: when a plan splits the bank (flash-decoding: enough blocks to
// fill the GPU when B is small), each split of the simt or mma kernel leaves an
// unnormalised partial (max, sum, acc, top) in the Workspace; this merges them
// exactly, one block per query, as the CPU's hen::combine does.
#pragma once

#include <cstdint>

#include "cuda/primitives.cuh"

namespace hen {
namespace cuda_kernels {

constexpr int kCombineThreads = 128;
constexpr int kCombineMaxSplits = 1024;

HEN_HOST_DEVICE constexpr int64_t combine_smem_bytes(int64_t splits) {
  return (kCombineThreads / 32) * (8 + 4 * 4) + splits * 4;
}

// Defined in combine.cu, so it compiles once, beside the kernel instances and
// apart from the host code that launches it.
HEN_GLOBAL void combine_kernel(const PartialParams p, const int64_t splits, const Workspace ws);

}  // namespace cuda_kernels
}  // namespace hen
