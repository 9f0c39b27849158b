// combine_kernel (see combine_kernel.cuh).
#include "cuda/combine_kernel.cuh"

namespace hen {
namespace cuda_kernels {

HEN_GLOBAL void HEN_LAUNCH_BOUNDS(kCombineThreads)
    combine_kernel(const PartialParams p, const int64_t splits, const Workspace ws) {
  constexpr int W = kCombineThreads / 32;
  int64_t* red_i = reinterpret_cast<int64_t*>(dynamic_smem());  // [W] top index
  float* red_f = reinterpret_cast<float*>(red_i + W);            // [W][4]: max, NaN seen, top score, sum
  float* weight = red_f + 4 * W;                                 // [splits]
  const int tid = thread_index(), warp = tid / 32, lane = tid % 32;
  const int64_t row = block_index(), l = row / p.B, b = row % p.B;
  const int64_t Dv = p.Dv;
  auto slot = [&](int64_t s) { return (l * splits + s) * p.B + b; };

  // The largest max, whether any split is poisoned, and the best top (ties to the smaller row).
  float big = neg_inf(), nan = 0.f, bs = neg_inf();
  int64_t bi = -1;
  for (int64_t s = tid; s < splits; s += kCombineThreads) {
    const int64_t k = slot(s);
    big = max_f(big, ws.max[k]);
    if (is_nan(ws.sum[k])) nan = 1.f;
    if (better(ws.top_score[k], ws.top_index[k], bs, bi)) bs = ws.top_score[k], bi = ws.top_index[k];
  }
  for (int off = 16; off >= 1; off >>= 1) {
    big = max_f(big, shfl_xor(big, off));
    nan = max_f(nan, shfl_xor(nan, off));
    const float os = shfl_xor(bs, off);
    const int64_t oi = shfl_xor(bi, off);
    if (better(os, oi, bs, bi)) bs = os, bi = oi;
  }
  if (lane == 0) red_f[warp * 4 + 0] = big, red_f[warp * 4 + 1] = nan, red_f[warp * 4 + 2] = bs, red_i[warp] = bi;
  sync_block();
  big = neg_inf(), nan = 0.f, bs = neg_inf(), bi = -1;
  for (int w = 0; w < W; ++w) {
    big = max_f(big, red_f[w * 4 + 0]);
    nan = max_f(nan, red_f[w * 4 + 1]);
    if (better(red_f[w * 4 + 2], red_i[w], bs, bi)) bs = red_f[w * 4 + 2], bi = red_i[w];
  }

  // Each split's weight exp(max_s - max) (0 for an empty split) and the total sum.
  float total = 0.f;
  for (int64_t s = tid; s < splits; s += kCombineThreads) {
    const int64_t k = slot(s);
    const float w = ws.max[k] == neg_inf() ? 0.f : exp_f(ws.max[k] - big);
    weight[s] = w;
    if (w > 0.f) total += ws.sum[k] * w;
  }
  for (int off = 16; off >= 1; off >>= 1) total += shfl_xor(total, off);
  if (lane == 0) red_f[warp * 4 + 3] = total;
  sync_block();
  total = 0.f;
  for (int w = 0; w < W; ++w) total += red_f[w * 4 + 3];

  const bool poisoned = nan != 0.f, empty = big == neg_inf();
  const float inv = poisoned || empty ? 0.f : 1.f / total;
  float* out = p.out + row * Dv;
  for (int64_t d = tid; d < Dv; d += kCombineThreads) {
    float acc = 0.f;
    if (!poisoned && !empty) {
      for (int64_t s = 0; s < splits; ++s)
        if (weight[s] > 0.f) acc += weight[s] * ws.acc[slot(s) * Dv + d];
    }
    out[d] = poisoned ? quiet_nan() : acc * inv;
  }
  if (tid == 0) {
    p.lse[row] = poisoned ? quiet_nan() : (empty ? neg_inf() : big + log_f(total));
    p.top_score[row] = bs;
    p.top_index[row] = bi;
  }
}

}  // namespace cuda_kernels
}  // namespace hen
