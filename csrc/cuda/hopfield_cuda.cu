// Host side of the CUDA kernels: device facts, the plan (which kernel, block
// shape, bank split), dispatch to the kernel instances and the launches.  Free
// of torch; compiled by nvcc, or as C++ with HEN_CUDA_EMULATE for the CPU test
// harness (csrc/emu/).  The kernels themselves compile in their own files
// (simt_*.cu, mma.cu, combine.cu).
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "cuda/combine_kernel.cuh"
#include "cuda/hopfield_cuda.h"
#include "cuda/mma_kernel.cuh"
#include "cuda/simt_kernel.cuh"

namespace hen {
namespace cuda {
namespace {

using cuda_kernels::KernelFn;
using cuda_kernels::LaunchArgs;

constexpr int64_t kDefaultSmem = 48 * 1024;  // beyond this a block must opt in

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t pow2_ceil(int64_t x) {
  int64_t p = 1;
  while (p < x) p <<= 1;
  return p;
}

thread_local std::string t_message;
const char* message(const std::string& m) {
  t_message = m;
  return t_message.c_str();
}

KernelFn simt_kernel_for(DType dt, int qb, int nch, bool same, bool weighted) {
  switch (dt) {
    case DType::F32: return cuda_kernels::simt_f32(qb, nch, same, weighted);
    case DType::F16: return cuda_kernels::simt_f16(qb, nch, same, weighted);
    case DType::BF16: return cuda_kernels::simt_bf16(qb, nch, same, weighted);
  }
  return nullptr;
}

KernelFn mma_kernel_for(DType dt, int hd, bool weighted) {
  switch (dt) {
    case DType::F16: return cuda_kernels::mma_f16(hd, weighted);
    case DType::BF16: return cuda_kernels::mma_bf16(hd, weighted);
    default: return nullptr;
  }
}

// The kernel instance a plan runs (make_plan asks for its occupancy, launch runs it).
KernelFn instance_for(const PartialParams& p, const Plan& plan) {
  return plan.kernel == Kernel::Mma
             ? mma_kernel_for(p.dtype, plan.head_dim, plan.weighted)
             : simt_kernel_for(p.dtype, plan.query_block, plan.chunks, plan.values_are_memory, plan.weighted);
}

// ---- launching ----------------------------------------------------------------------

const char* cuda_error(cudaError_t e, const char* what) {
  return message(std::string("hen_kernels CUDA: ") + what + ": " + cudaGetErrorString(e));
}

template <class... Args>
const char* launch_kernel(void (*fn)(Args...), int64_t blocks, int threads, int64_t smem, void* stream,
                          Args... args) {
#if defined(HEN_CUDA_EMULATE)
  (void)stream;
  hen_emu::launch(blocks, threads, static_cast<size_t>(smem), [&] { fn(args...); });
  return nullptr;
#else
  if (smem > kDefaultSmem) {
    const cudaError_t e = cudaFuncSetAttribute(reinterpret_cast<const void*>(fn),
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return cuda_error(e, "cudaFuncSetAttribute");
  }
  fn<<<static_cast<unsigned>(blocks), threads, static_cast<size_t>(smem), static_cast<cudaStream_t>(stream)>>>(
      args...);
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cuda_error(e, "kernel launch");
#endif
}

bool rows_aligned(const void* base, int64_t lead_stride, int64_t row_stride, int vec) {
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && lead_stride % vec == 0 && row_stride % vec == 0;
}

// Blocks of `fn` resident on one SM with `threads` threads and `smem` bytes of
// dynamic shared memory: the runtime's occupancy calculator knows the registers
// ptxas gave this instance (143 to 206 for most simt instances, so one block of
// 256 threads per SM, where an assumption said two).  Cached per device and
// instance; the emulator supplies the runtime call (csrc/emu/cuda_emulator.h).
const char* resident_blocks(int device, KernelFn fn, int threads, int64_t smem, int* out) {
  static std::mutex mu;
  static std::map<std::tuple<int, const void*, int, int64_t>, int> cache;
  const auto key = std::make_tuple(device, reinterpret_cast<const void*>(fn), threads, smem);
  std::lock_guard<std::mutex> lock(mu);
  const auto hit = cache.find(key);
  if (hit != cache.end()) {
    *out = hit->second;
    return nullptr;
  }
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess) return cuda_error(e, "cudaSetDevice");
  if (smem > kDefaultSmem) {  // the calculator counts dynamic shared memory only up to the opt-in
    e = cudaFuncSetAttribute(reinterpret_cast<const void*>(fn), cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem));
    if (e != cudaSuccess) return cuda_error(e, "cudaFuncSetAttribute");
  }
  int n = 0;
  e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, reinterpret_cast<const void*>(fn), threads,
                                                    static_cast<size_t>(smem));
  if (e != cudaSuccess) return cuda_error(e, "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  if (n < 1) return "hen_kernels CUDA: the plan's kernel does not fit on one SM (registers or shared memory)";
  cache.emplace(key, n);
  *out = n;
  return nullptr;
}

// Bank splits per query block for `work` query blocks (all leading indices) on
// `slots` = resident blocks per SM x SMs: the count, up to the blocks of two
// full waves and at most `most`, whose blocks fill their waves best (fewer
// splits on a tie: less combine work).  `actual` maps a count to the splits its
// rounded rows per split give.
template <class Actual>
int64_t choose_splits(int64_t work, int64_t slots, int64_t most, Actual actual) {
  const int64_t cap = ceil_div(2 * slots, work);
  const int64_t last = cap < most ? cap : most;
  int64_t best = 1;
  double best_fill = 0.0;
  for (int64_t want = 1; want <= last; ++want) {
    const int64_t s = actual(want);
    const int64_t blocks = s * work;
    const double fill = static_cast<double>(blocks) / static_cast<double>(ceil_div(blocks, slots) * slots);
    if (fill > best_fill + 1e-9) best = want, best_fill = fill;
  }
  return best;
}

}  // namespace

const char* device_info(int device, DeviceInfo* info) {
  static std::mutex mu;
  static DeviceInfo cache[64];
  static bool known[64] = {};
  if (device < 0 || device >= 64) return "hen_kernels CUDA: device index out of range";
  std::lock_guard<std::mutex> lock(mu);
  if (!known[device]) {
    DeviceInfo d{};
    d.device = device;
    cudaError_t e = cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, device);
    if (e == cudaSuccess)
      e = cudaDeviceGetAttribute(&d.max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, device);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&d.cc_minor, cudaDevAttrComputeCapabilityMinor, device);
    if (e != cudaSuccess) return cuda_error(e, "cudaDeviceGetAttribute");
    cache[device] = d;
    known[device] = true;
  }
  *info = cache[device];
  return nullptr;
}

const char* make_plan(const PartialParams& p, const DeviceInfo& dev, const PlanHints& hints, Plan* out) {
  if (dev.cc_major < 8)
    return message("hen_kernels CUDA: needs compute capability 8.0 or newer (this build has sm_80 and sm_90 code), got " +
                   std::to_string(dev.cc_major) + "." + std::to_string(dev.cc_minor));
  const int vec = p.dtype == DType::F32 ? 4 : 8;  // elements per 16 bytes
  Plan plan{};
  plan.vector_loads = rows_aligned(p.query, p.query_lead_stride, p.query_row_stride, vec) &&
                      rows_aligned(p.memory, p.memory_lead_stride, p.memory_row_stride, vec) &&
                      rows_aligned(p.values, p.values_lead_stride, p.values_row_stride, vec);
  plan.values_are_memory = p.values_are_memory();
  plan.weighted = p.weights != nullptr;
  const bool l2 = p.similarity != Similarity::Dot;
  const int64_t width = p.D > p.Dv ? p.D : p.Dv;

  // Tensor cores for 16-bit inputs with D, Dv <= 256 and more queries than the
  // simt kernel holds per block; CUDA cores otherwise (docs/design.md §2 regimes).
  int hd = width <= 32 ? 32 : width <= 64 ? 64 : width <= 128 ? 128 : 256;
  const bool mma_ok = p.dtype != DType::F32 && width <= 256 &&
                      cuda_kernels::mma_smem_bytes(hd, plan.values_are_memory, plan.weighted, l2) <= dev.max_smem_optin;
  bool use_mma = mma_ok && p.B > 8;
  if (hints.kernel == Kernel::Mma) {
    if (!mma_ok)
      return "hen_kernels CUDA: the plan hints ask for the mma kernel, which needs 16-bit inputs, D, Dv <= 256 and "
             "its shared memory on this device";
    use_mma = true;
  } else if (hints.kernel == Kernel::Simt) {
    use_mma = false;
  }

  int64_t row_step;  // bank rows a block consumes per step
  if (use_mma) {
    plan.kernel = Kernel::Mma;
    plan.threads = cuda_kernels::kMmaThreads;
    plan.query_block = cuda_kernels::kMmaBlockQ;
    plan.team = 0;
    plan.chunks = 0;
    plan.head_dim = hd;
    plan.vector_loads = plan.vector_loads && p.D % 8 == 0 && p.Dv % 8 == 0;
    plan.smem_bytes = cuda_kernels::mma_smem_bytes(hd, plan.values_are_memory, plan.weighted, l2);
    row_step = cuda_kernels::mma_block_rows(hd);
  } else {
    plan.kernel = Kernel::Simt;
    plan.threads = cuda_kernels::kSimtThreads;
    plan.head_dim = 0;
    const int64_t chunks = ceil_div(width, vec);
    plan.team = static_cast<int>(pow2_ceil(chunks) < cuda_kernels::kSimtThreads ? pow2_ceil(chunks)
                                                                               : cuda_kernels::kSimtThreads);
    plan.chunks = static_cast<int>(pow2_ceil(ceil_div(chunks, plan.team)));
    if (!cuda_kernels::simt_fits(1, plan.chunks, vec))
      return message("hen_kernels CUDA: D and Dv must be <= 8192, got D = " + std::to_string(p.D) +
                     ", Dv = " + std::to_string(p.Dv));
    // Queries per block: the fewest that cover B, within the register budget.
    int qb = 0;
    for (int cand : {1, 4}) {
      if (!cuda_kernels::simt_fits(cand, plan.chunks, vec)) break;
      qb = cand;
      if (cand >= p.B) break;
    }
    if ((hints.query_block == 1 || hints.query_block == 4) &&
        cuda_kernels::simt_fits(hints.query_block, plan.chunks, vec))
      qb = hints.query_block;
    plan.query_block = qb;
    const int teams = cuda_kernels::kSimtThreads / plan.team;
    plan.smem_bytes = 4 * cuda_kernels::simt_smem_floats(qb, plan.chunks, plan.values_are_memory, vec, teams > 1);
    row_step = static_cast<int64_t>(teams) * cuda_kernels::simt_rows(qb, plan.chunks, plan.values_are_memory);
  }
  plan.query_blocks = ceil_div(p.B, plan.query_block);
  if (plan.smem_bytes > dev.max_smem_optin) return "hen_kernels CUDA: the plan needs more shared memory than the device has";
  const KernelFn fn = instance_for(p, plan);
  if (fn == nullptr) return "hen_kernels CUDA: no kernel instance for this plan";
  if (const char* err = resident_blocks(dev.device, fn, plan.threads, plan.smem_bytes, &plan.blocks_per_sm)) return err;

  // Split the bank when the query blocks alone leave SMs idle (recall: few
  // queries, so the bank split supplies the parallelism); each split keeps at
  // least four steps of rows, and the combine stays small.
  const int64_t work = (p.L > 0 ? p.L : 1) * (plan.query_blocks > 0 ? plan.query_blocks : 1);
  const int64_t slots = static_cast<int64_t>(plan.blocks_per_sm) * (dev.sm_count > 0 ? dev.sm_count : 1);
  auto rows_for = [&](int64_t want) { return ceil_div(ceil_div(p.N, want), row_step) * row_step; };
  if (p.N == 0) {
    plan.splits = 1;
    plan.rows_per_split = 0;
  } else if (hints.splits > 0) {
    const int64_t want = hints.splits < p.N ? hints.splits : p.N;
    plan.rows_per_split = ceil_div(p.N, want < cuda_kernels::kCombineMaxSplits ? want : cuda_kernels::kCombineMaxSplits);
    plan.splits = ceil_div(p.N, plan.rows_per_split);
  } else {
    int64_t most = ceil_div(p.N, 4 * row_step);
    most = most < cuda_kernels::kCombineMaxSplits ? most : cuda_kernels::kCombineMaxSplits;
    const int64_t want = choose_splits(work, slots, most, [&](int64_t w) { return ceil_div(p.N, rows_for(w)); });
    plan.rows_per_split = rows_for(want);
    plan.splits = ceil_div(p.N, plan.rows_per_split);
  }
  if (p.L * plan.blocks() > INT32_MAX) return "hen_kernels CUDA: too many blocks for one launch";
  *out = plan;
  return nullptr;
}

const char* launch(const PartialParams& p, const Plan& plan, const Workspace& ws, int device, void* stream) {
  if (p.L == 0 || p.B == 0) return nullptr;
#if !defined(HEN_CUDA_EMULATE)
  const cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess) return cuda_error(e, "cudaSetDevice");
#else
  (void)device;
#endif
  LaunchArgs a{};
  a.query_blocks = plan.query_blocks;
  a.splits = plan.splits;
  a.rows_per_split = plan.rows_per_split;
  a.team = plan.team;
  a.vec = plan.vector_loads ? 1 : 0;
  a.same = plan.values_are_memory ? 1 : 0;
  a.need_norm = p.similarity != Similarity::Dot ? 1 : 0;
  const KernelFn fn = instance_for(p, plan);
  if (fn == nullptr) return "hen_kernels CUDA: no kernel instance for this plan";
  const char* err = launch_kernel(fn, p.L * plan.blocks(), plan.threads, plan.smem_bytes, stream, p, a, ws);
  if (err != nullptr || plan.splits == 1) return err;
  return launch_kernel(&cuda_kernels::combine_kernel, p.L * p.B, cuda_kernels::kCombineThreads,
                       cuda_kernels::combine_smem_bytes(plan.splits), stream, p, plan.splits, ws);
}

#define HEN_STRINGIFY2(...) #__VA_ARGS__
#define HEN_STRINGIFY(...) HEN_STRINGIFY2(__VA_ARGS__)

const char* build_info() {
#if defined(HEN_CUDA_EMULATE)
  return "archs=emulated cuda=none";
#elif defined(__CUDA_ARCH_LIST__)
  return "archs=" HEN_STRINGIFY(__CUDA_ARCH_LIST__) " cuda=" HEN_STRINGIFY(__CUDACC_VER_MAJOR__) "." HEN_STRINGIFY(
      __CUDACC_VER_MINOR__);
#else
  return "archs=unknown cuda=" HEN_STRINGIFY(__CUDACC_VER_MAJOR__) "." HEN_STRINGIFY(__CUDACC_VER_MINOR__);
#endif
}

}  // namespace cuda
}  // namespace hen
