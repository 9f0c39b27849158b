// A small CPU emulator of the CUDA features the kernels use (through
// csrc/cuda/primitives.cuh), so the kernels run on a machine without a GPU
// (tests/test_cuda_emulated.py builds csrc/emu/emulate_test.cpp with
// HEN_CUDA_EMULATE).  Test-only: never part of the extension.
//
// A block's threads are fibers (ucontext) on one OS thread; a fiber runs until
// it waits at a barrier.  __syncthreads is a block barrier.  Warp-wide
// operations (shuffles, ldmatrix, mma.sync) deposit every lane's operands at a
// warp barrier and give each lane its share as the PTX ISA documents it, so a
// lane that skips one deadlocks (reported) as divergent code would misbehave on
// a GPU.  Shared memory starts as 0xFF bytes (NaN in every float format), so a
// read of an element no thread wrote shows up as a NaN in the results; shared
// memory accesses of ldmatrix and cp.async are bounds- and alignment-checked,
// and so are the kernels' 16-byte global loads.  Blocks run one after another.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

// ---- CUDA runtime stand-ins used by hopfield_cuda.cu -------------------------------
typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
inline const char* cudaGetErrorString(cudaError_t) { return "emulated error"; }
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount,
  cudaDevAttrMaxSharedMemoryPerBlockOptin,
  cudaDevAttrComputeCapabilityMajor,
  cudaDevAttrComputeCapabilityMinor
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };

namespace hen_emu {

// An emulated device: few SMs, so that plans split small banks.  The emulator
// has no registers, so the occupancy calculator's register limit is a number a
// test sets (`register_blocks`: blocks per SM that the instance's registers
// allow); shared memory and threads limit it as on an H100.
struct Device {
  int sm_count = 4;
  int max_smem_optin = 227 * 1024;
  int smem_per_sm = 228 * 1024;
  int threads_per_sm = 2048;
  int register_blocks = 1;
  int occupancy_queries = 0;  // calls of cudaOccupancyMaxActiveBlocksPerMultiprocessor
};
constexpr int kDevices = 4;
inline Device& device(int i) {
  static Device d[kDevices];
  if (i < 0 || i >= kDevices) {
    std::fprintf(stderr, "cuda_emulator: device %d out of range\n", i);
    std::abort();
  }
  return d[i];
}
inline int& current_device() {
  static int d = 0;
  return d;
}
inline Device& device() { return device(current_device()); }

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda_emulator: %s\n", what);
  std::abort();
}

struct Fiber {
  ucontext_t ctx;
  bool done = false;
  bool blocked = false;
};

struct Barrier {
  int expected = 0;
  int arrived = 0;
  std::vector<int> waiting;
};

struct WarpBuf {
  uint64_t v[32];
  const void* addr[32];
  uint32_t a[32][4];
  uint32_t b[32][2];
  float c[32][4];
};

struct BlockState {
  int64_t block = 0;
  int nthreads = 0;
  std::vector<Fiber> fibers;
  ucontext_t sched;
  int current = -1;
  Barrier cta;
  std::vector<Barrier> warps;
  std::vector<WarpBuf> wbuf;
  std::vector<char> votes;
  unsigned char* smem = nullptr;
  size_t smem_size = 0;
  const std::function<void()>* body = nullptr;
};

inline BlockState*& state() {
  static BlockState* s = nullptr;
  return s;
}

inline int thread_index() { return state()->current; }
inline int64_t block_index() { return state()->block; }
inline unsigned char* dynamic_smem() { return state()->smem; }

inline void wait(Barrier& b) {
  BlockState& s = *state();
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    for (int t : b.waiting) s.fibers[t].blocked = false;
    b.waiting.clear();
    return;
  }
  b.waiting.push_back(s.current);
  s.fibers[s.current].blocked = true;
  swapcontext(&s.fibers[s.current].ctx, &s.sched);
}

inline void sync_block() { wait(state()->cta); }
inline void sync_warp() {
  BlockState& s = *state();
  wait(s.warps[s.current / 32]);
}
inline int lane() { return state()->current % 32; }
inline WarpBuf& warp_buf() { return state()->wbuf[state()->current / 32]; }

inline void check_smem(const void* p, size_t bytes, size_t align) {
  const BlockState& s = *state();
  const unsigned char* c = static_cast<const unsigned char*>(p);
  if (c < s.smem || c + bytes > s.smem + s.smem_size) fail("shared memory access out of bounds");
  if (reinterpret_cast<uintptr_t>(p) % align != 0) fail("misaligned shared memory access");
}
inline void check_aligned(const void* p, size_t align) {
  if (reinterpret_cast<uintptr_t>(p) % align != 0) fail("misaligned vector access to global memory");
}

template <class T>
inline T shfl_xor(T v, int mask) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 64 bits");
  if (mask <= 0 || mask >= 32) fail("shfl_xor mask out of range");
  WarpBuf& w = warp_buf();
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof v);
  w.v[lane()] = bits;
  sync_warp();
  const uint64_t other = w.v[lane() ^ mask];
  sync_warp();
  T r;
  std::memcpy(&r, &other, sizeof r);
  return r;
}

// __any_sync over the full warp: every lane must take part.
inline bool any_in_warp(bool pred) {
  WarpBuf& w = warp_buf();
  w.v[lane()] = pred ? 1u : 0u;
  sync_warp();
  bool any = false;
  for (int i = 0; i < 32; ++i) any |= w.v[i] != 0;
  sync_warp();
  return any;
}

// __syncthreads_or: a block barrier that also tells whether any thread had pred.
inline bool any_in_block(bool pred) {
  BlockState& s = *state();
  s.votes[s.current] = pred;
  sync_block();
  bool any = false;
  for (int i = 0; i < s.nthreads; ++i) any |= s.votes[i] != 0;
  sync_block();
  return any;
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8i..8i+7 give the row
// addresses of matrix i; lane l receives, per matrix, elements (l/4, 2(l%4)+{0,1})
// or, transposed, (2(l%4)+{0,1}, l/4), the lower column in the low half.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p, bool trans) {
  check_smem(p, 16, 16);
  WarpBuf& w = warp_buf();
  const int ln = lane();
  w.addr[ln] = p;
  sync_warp();
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    if (!trans) {
      const uint16_t* row = static_cast<const uint16_t*>(w.addr[i * 8 + ln / 4]);
      lo = row[2 * (ln % 4)];
      hi = row[2 * (ln % 4) + 1];
    } else {
      const uint16_t* r0 = static_cast<const uint16_t*>(w.addr[i * 8 + 2 * (ln % 4)]);
      const uint16_t* r1 = static_cast<const uint16_t*>(w.addr[i * 8 + 2 * (ln % 4) + 1]);
      lo = r0[ln / 4];
      hi = r1[ln / 4];
    }
    r[i] = static_cast<uint32_t>(lo) | static_cast<uint32_t>(hi) << 16;
  }
  sync_warp();
}

inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline float half_bits_to_float(uint16_t h) {
  _Float16 v;
  std::memcpy(&v, &h, 2);
  return static_cast<float>(v);
}
inline uint16_t float_to_bf16(float f) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (f != f) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline uint16_t float_to_half(float f) {
  const _Float16 v = static_cast<_Float16>(f);
  uint16_t h;
  std::memcpy(&h, &v, 2);
  return h;
}
inline uint32_t pack_bf16x2(float lo, float hi) {
  return static_cast<uint32_t>(float_to_bf16(lo)) | static_cast<uint32_t>(float_to_bf16(hi)) << 16;
}
inline uint32_t pack_f16x2(float lo, float hi) {
  return static_cast<uint32_t>(float_to_half(lo)) | static_cast<uint32_t>(float_to_half(hi)) << 16;
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: g = lane / 4, t = lane % 4;
// A regs {a0a1, a2a3, a4a5, a6a7} hold (g, 2t..), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..);
// B regs {b0b1, b2b3} hold (k = 2t.., n = g), (k = 2t+8.., n = g);
// C/D hold (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1).
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  WarpBuf& w = warp_buf();
  const int ln = lane();
  for (int i = 0; i < 4; ++i) w.a[ln][i] = a[i], w.c[ln][i] = d[i];
  w.b[ln][0] = b0, w.b[ln][1] = b1;
  sync_warp();
  auto elem = [bf16](uint32_t word, int k) {
    const uint16_t h = static_cast<uint16_t>((k % 2) ? word >> 16 : word & 0xffffu);
    return bf16 ? bits_to_float(static_cast<uint32_t>(h) << 16) : half_bits_to_float(h);
  };
  auto A = [&](int row, int k) {
    return elem(w.a[(row % 8) * 4 + (k % 8) / 2][(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k);
  };
  auto B = [&](int k, int col) { return elem(w.b[col * 4 + (k % 8) / 2][k >= 8 ? 1 : 0], k); };
  const int g = ln / 4, t = ln % 4;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
    double sum = 0.0;
    for (int k = 0; k < 16; ++k) sum += static_cast<double>(A(row, k)) * B(k, col);
    out[i] = static_cast<float>(w.c[ln][i] + sum);
  }
  sync_warp();
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

inline void cp_async_16(void* smem, const void* global, bool valid) {
  check_smem(smem, 16, 16);
  if (valid) {
    check_aligned(global, 16);
    std::memcpy(smem, global, 16);
  } else {
    std::memset(smem, 0, 16);
  }
}

inline float exp_f(float x) { return std::exp(x); }
inline float log_f(float x) { return std::log(x); }
inline float sqrt_f(float x) { return std::sqrt(x); }

inline void fiber_main() {
  BlockState& s = *state();
  (*s.body)();
  s.fibers[s.current].done = true;
}

// Run `blocks` blocks of `threads` threads, each calling body() as one thread.
inline void launch(int64_t blocks, int threads, size_t smem, const std::function<void()>& body) {
  if (threads <= 0 || threads % 32 != 0 || threads > 1024) fail("block size must be a multiple of 32, at most 1024");
  if (smem > static_cast<size_t>(device().max_smem_optin)) fail("dynamic shared memory above the device limit");
  constexpr size_t kStack = 256 * 1024;
  // Fiber stacks are kept across blocks and launches: allocating (and faulting
  // in) 256 of them per block was most of the emulator's time.
  static std::vector<std::vector<char>> stacks;
  if (stacks.size() < static_cast<size_t>(threads)) stacks.resize(static_cast<size_t>(threads));
  for (auto& st : stacks) st.resize(kStack);
  for (int64_t b = 0; b < blocks; ++b) {
    BlockState s;
    s.block = b;
    s.nthreads = threads;
    s.body = &body;
    s.cta.expected = threads;
    s.warps.resize(threads / 32);
    for (auto& w : s.warps) w.expected = 32;
    s.wbuf.resize(threads / 32);
    s.votes.assign(static_cast<size_t>(threads), 0);
    s.smem_size = smem;
    s.smem = static_cast<unsigned char*>(std::malloc(smem > 0 ? smem : 1));
    std::memset(s.smem, 0xff, smem);
    s.fibers.resize(threads);
    for (int i = 0; i < threads; ++i) {
      Fiber& f = s.fibers[static_cast<size_t>(i)];
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = stacks[static_cast<size_t>(i)].data();
      f.ctx.uc_stack.ss_size = kStack;
      f.ctx.uc_link = &s.sched;
      makecontext(&f.ctx, fiber_main, 0);
    }
    state() = &s;
    for (;;) {
      bool all_done = true, ran = false;
      for (int i = 0; i < threads; ++i) {
        if (s.fibers[i].done) continue;
        all_done = false;
        if (s.fibers[i].blocked) continue;
        s.current = i;
        ran = true;
        swapcontext(&s.sched, &s.fibers[i].ctx);
      }
      if (all_done) break;
      if (!ran) fail("deadlock: every live thread waits at a barrier the others never reach");
    }
    state() = nullptr;
    std::free(s.smem);
  }
}

}  // namespace hen_emu

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  const hen_emu::Device& d = hen_emu::device(device);
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = d.sm_count; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = d.max_smem_optin; break;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
  }
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) {
  hen_emu::device(device);  // range check
  hen_emu::current_device() = device;
  return cudaSuccess;
}
inline cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) { return cudaSuccess; }
// The occupancy calculator of the current device: the smallest of the limits
// by registers (set by the test), shared memory and threads.
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void*, int threads, size_t smem) {
  hen_emu::Device& d = hen_emu::device();
  ++d.occupancy_queries;
  int n = d.register_blocks;
  if (smem > 0 && static_cast<int>(d.smem_per_sm / smem) < n) n = static_cast<int>(d.smem_per_sm / smem);
  if (d.threads_per_sm / threads < n) n = d.threads_per_sm / threads;
  *blocks = n;
  return cudaSuccess;
}
