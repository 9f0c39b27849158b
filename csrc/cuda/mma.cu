// mma_kernel instances for float16 and bfloat16 (see mma_kernel.cuh).
#include "cuda/mma_kernel.cuh"

namespace hen {
namespace cuda_kernels {

KernelFn mma_f16(int hd, bool weighted) { return mma_table<DType::F16>(hd, weighted); }
KernelFn mma_bf16(int hd, bool weighted) { return mma_table<DType::BF16>(hd, weighted); }

}  // namespace cuda_kernels
}  // namespace hen
