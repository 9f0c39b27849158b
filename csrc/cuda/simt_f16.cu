// simt_kernel instances for F16 (see simt_kernel.cuh); one file per dtype so
// the instances compile in parallel.
#include "cuda/simt_kernel.cuh"

namespace hen {
namespace cuda_kernels {

KernelFn simt_f16(int qb, int nch, bool same, bool weighted) {
  return simt_table<DType::F16>(qb, nch, same, weighted);
}

}  // namespace cuda_kernels
}  // namespace hen
