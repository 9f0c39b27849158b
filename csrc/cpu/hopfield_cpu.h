// The fused streaming-softmax Hopfield update on the CPU.
//
// It computes the Partial of hopfield_params.h.  The bank is walked once in
// row tiles with a running max, sum and accumulator per query, so no B x N
// score matrix exists and memory does not grow with N.
//
// Each tile takes two matrix products: the scores S^T = X_tile . Q^T (bank rows
// by queries, so the bank tile is read as stored, with no transpose or packing)
// and the values O += P . V_tile.  They run on the platform's GEMM
// microkernels (microkernel.h: oneDNN's brgemm through ATen, on AMX or
// AVX-512 BF16 for 16-bit inputs) or, where those are absent and for few queries,
// on hand-written products (Product::Hand; bfloat16 on AVX-512 BF16's pair dot
// product where the CPU has it and no AMX, Product::Bf16Pairs).  The softmax
// between them, the ℓ2 forms and the rules of docs/design.md §5.1 are the tile
// kernel's own (tile_kernel.cpp), compiled once per instruction set.
//
// Work is cut into independent tiles (leading index, query block, bank split).
// The caller runs tiles on its own thread pool (the ATen binding uses
// at::parallel_for); when the bank is split, each split leaves an unnormalised
// partial in the Workspace and `combine` merges them, as flash-decoding does.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "hopfield_params.h"

namespace hen {

// 1 where v is inf or NaN (its exponent bits all ones), else 0: an integer test, so that a loop
// OR-ing it over a row stays a vector loop.  The CPU kernel's lse is NaN wherever its out row holds
// one (a bank holding inf adds 0 * inf = NaN even from a row scored -inf), so that checking lse
// finds every answer that is not finite (binding.cpp, all_finite; validation.check_scores).
inline uint32_t non_finite(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return (bits & 0x7f800000u) == 0x7f800000u;
}

// Instruction sets the tile kernel is compiled for, in increasing order.
enum class Isa : int { Baseline = 1, Avx2 = 2, Avx512 = 3 };

// Whether this compiler emits AVX-512 BF16 for the AVX-512 copy of the tile kernel (its
// conversion in simd.h, its pair dot product in hand_products.h); make_plan asks for them
// only then.
#if defined(__x86_64__) && (defined(__clang__) || __GNUC__ >= 10)
#define HEN_COMPILER_BF16 1
#else
#define HEN_COMPILER_BF16 0
#endif
// Who computes a tile product: the kernel's own code (hand_products.h: where brgemm
// is absent, and for few queries), or the platform's microkernel (microkernel.h) in
// float32 (16-bit inputs widened first) or on 16-bit VNNI operands; Bf16Pairs: the
// kernel's own products on bfloat16 as stored, by AVX-512 BF16's pair dot product; Lanes
// (scores only): the kernel's own, the bank tile turned so that a vector holds W rows
// (short rows, where a dot product spends more on its reduction than on its sum).
enum class Product : int { Hand = 0, F32 = 1, Vnni = 2, Bf16Pairs = 3, Lanes = 4 };

// How the hand-written value products send the next tile of value rows towards L2, spread over
// their passes (NextTileLines in hand_products.h): not at all, each pass's own columns of each
// next row, or the tile's lines in the order they are stored.
enum class ValueFetch : int { None = 0, ByPass = 1, Stored = 2 };

// What a caller may force (tests, benchmarks); zero / Auto leave the choice to make_plan.
struct PlanHints {
  // Pairs: the hand-written products, bfloat16 ones on the pair dot product (where the
  // CPU has it; other dtypes as Hand, and a weighted score product whose w∘q is not
  // 16-bit: weighted_cue_is_16bit in hopfield_cpu.cpp).  Lanes: the lane score products
  // and the hand-written value products, at any depth.
  enum class GemmChoice { Auto, Brgemm, Hand, Pairs, Lanes } gemm = GemmChoice::Auto;
  int isa = 0;  // highest instruction set to use (an Isa value), 0: the best this CPU has
  int64_t query_block = 0;
  int64_t splits = 0;
};

// Row tiles, tails included, compute a multiple of this many rows: a multiple of every
// vector width and of the VNNI pair (at 8, 189 kernel tests fail with AVX-512).  A tail of R
// rows computes R rounded up to it: with 64, a bank of 197 rows computed 256 (12 banks of
// 197 x 197 x 64 and 8 of 64 x 90 x 64 ran 1.14-1.26x faster at 16, AVX-512 and AVX2
// forced, float32 and bf16; EPYC Zen 5, in-process A/B, median of 21).
constexpr int64_t kRowQuantum = 16;

// The queries a brgemm takes where they are its rows (M): a query block's BM rounded up to 8
// (to the vector width W where that is less; BMp, the block's padded width, is never less).
// ATen compiles a brgemm per distinct shape and keeps it, per thread, for the process's life
// (40-90 KB each), so products shaped by each block's own count (and the backward's by each
// tail's own rows) met new shapes at new sequence lengths: self-attention over the lengths
// 1-300 met 343 forward shapes and 678-838 more in the backward, and a first pass over them
// took 1.5-2.1x the later ones; now 78-100 and 7-102 shapes, 1.1-1.3x (tests/test_cpu_kernel.py).
// Padding to 16 cost up to 8 % (a block of 40 queries, a last block of 1): PERFORMANCE.md §5.21.
constexpr int64_t kBrgemmQueryQuantum = 8;
inline int64_t brgemm_queries(int64_t BM, int64_t W) {
  const int64_t q = std::min<int64_t>(W, kBrgemmQueryQuantum);
  return (BM + q - 1) / q * q;
}
// The most queries a backward tile takes by hand-written products (make_backward_plan).
constexpr int kBackwardHandQueriesMax = 4;
// The backward's query block: its queries' operands and per-query sums are one tile's scratch.
constexpr int64_t kBackwardQueryBlockMax = 64;

// How the work is cut and computed: chosen from the shape, the dtype, the CPU
// and the thread count (see make_plan).
struct Plan {
  Isa isa;
  Product score;           // S^T = X_tile . Q^T
  Product value;           // O += P . V_tile
  bool l2_direct;          // docs/design.md §5.1 recompute (off only to measure its cost)
  bool native_bf16;        // bfloat16 P by AVX-512 BF16's own conversion (the CPU has it)
  bool pair_norms;         // bfloat16 |x|² (row_norms) on AVX-512 BF16's pair dot product (the CPU has it)
  // Who sends the next bank tile towards L2 while this one is computed (make_plan says why):
  bool scores_fetch_next;  // the hand-written score products, as they read this tile
  bool burst_next;         // one burst before the value products
  ValueFetch values_fetch_next;  // the hand-written value products, spread over their passes
  bool shared_weights;     // weighted ℓ2, one row of weights for every query of each leading index
  int64_t query_block;     // queries sharing one pass over a bank tile
  int64_t row_block;       // bank rows per tile: fixed per (D, dtype, products), never by N;
                           // a tail tile computes its rows rounded up to kRowQuantum
  int64_t splits;          // bank splits per query block (1: no workspace, no combine)
  int64_t rows_per_split;  // a multiple of row_block
  int64_t query_blocks;    // ceil(B / query_block)
  int64_t workers;         // threads taking tiles (run_tile guesses which one each takes next)
  int64_t tiles(const PartialParams& p) const { return p.L * query_blocks * splits; }
};

// Throws std::invalid_argument when a hint asks for what this build or CPU cannot do.
Plan make_plan(const PartialParams& p, int num_threads, const PlanHints& hints = PlanHints{});

// Compute tile `tile` in [0, plan.tiles(p)); thread safe across distinct tiles.
void run_tile(const PartialParams& p, const Plan& plan, int64_t tile, const Workspace& ws);

// Merge the splits of queries [begin, end) of the flattened (L * B) range into the outputs.
void combine(const PartialParams& p, const Plan& plan, int64_t begin, int64_t end, const Workspace& ws);

// --- the backward (backward_kernel.cpp) ------------------------------------------------
//
// Gradients of one partial update from the upstream dout and dlse and the saved out
// and lse, recomputing the weights tile by tile (hen_kernels/backward_cpu.py states
// the math): dV = P^T dout, dt = P ∘ (dout V^T - Δ), dbeta = Σ dt ∘ s, G from beta dt
// and the similarity, dq = G X (ℓ2: - rowsum(G) q), dX = G^T q (ℓ2: - colsum(G) x),
// weighted by `weights` as the forward is.  Products on the float32 microkernels
// (16-bit inputs widened), so it needs brgemm, or for bfloat16 where the forward's 16-bit
// ones run and there are no weights, on those (BackwardPlan::vnni); tiles own disjoint bank rows
// (dX and dV without races), each leaves its dq and dbeta in its own workspace slot.
enum class BankGrads { Apart, Summed, None };

struct BackwardParams {
  PartialParams p;     // the forward's inputs and shapes (its output pointers unused)
  const float* dout;   // (L, B, Dv)
  const float* dlse;   // (L, B)
  const float* out;    // (L, B, Dv) as the forward returned it
  const float* lse;    // (L, B)
  // (L, B) or null: each query's top row of the bank (the forward's top_index; one outside [0, N): none).
  // That pair leaves the dq and dX products: its dt enters dbeta's terms as P (dout·(v_top - out) + dlse),
  // the difference taken first (also written to dt_top), and dq and dX as dlse Σ P less the other rows'
  // dt, once all are summed (BackwardPlan::settle_in_tiles, else settle_top_rows): where
  // the softmax saturates on that row, dP - Δ of two products is all rounding (backward_cpu.py).
  const int64_t* top;
  int64_t Lm;          // 1 (a bank shared by every leading index) or L
  float* dq;           // (splits, L, B, D): one slot per split, summed by the caller
  // dbeta's per-query terms, (splits, L, B) each, summed by the caller: Σ dt s, Σ dt, Σ P s and Σ P
  // (dt's common-mode error, Δ taken from out rather than Σ P dP, enters Σ dt s as that error times
  // Σ P s and Σ dt as the error itself, so the caller takes it out: backward_cpu.py dbeta_from_terms).
  float* dbeta;
  float* dt_sum;
  float* ps_sum;
  float* p_sum;
  float* dt_top;  // (splits, L, B) with top: the top row's dt as the terms above took it (0: not in the split)
  // dX and dV, written (not added to): float32 (dx, dv), or with BackwardPlan::direct in the
  // 16-bit input dtype (dx16, dv16).  Rows and leading index at these strides (elements;
  // the leading index split as p.lead_inner says), so that the gradient of a bank view (heads
  // split from a projection) is laid out as the view: autograd then needs no copy of it.
  float* dx;
  float* dv;
  uint16_t* dx16;
  uint16_t* dv16;
  int64_t dx_lead_stride, dx_lead_inner_stride, dx_row_stride;
  int64_t dv_lead_stride, dv_lead_inner_stride, dv_row_stride;
  bool dout_16bit;     // every element of dout is exactly a value of the 16-bit input dtype
  // Which bank gradients to write: a few queries' backward is bound by those bank-sized writes.
  // Summed: keys = values (p.values_are_memory()), dx holds dX + dV, the bank's one gradient, and
  // dv, dv16 are unused (written once, not twice and then summed).  None: a bank that needs no
  // gradient (frozen), dx, dv, dx16, dv16 all unused: dq and dbeta alone.
  BankGrads bank_grads;

  int64_t dx_lead(int64_t l) const { return p.lead_offset(l, dx_lead_stride, dx_lead_inner_stride); }
  int64_t dv_lead(int64_t l) const { return p.lead_offset(l, dv_lead_stride, dv_lead_inner_stride); }
};

struct BackwardPlan {
  Isa isa;
  // 16-bit products (VNNI, as the forward's) for the scores, dX (G rounded to 16 bits) and
  // dq (G in two 16-bit parts): bfloat16 where the forward takes them, no weights, D even.
  bool vnni;
  // dP and dV too, with P rounded: vnni, dout exactly 16-bit (dout_16bit) and Dv even.
  bool dout16;
  // Few queries (up to 4, 2 where the bfloat16 VNNI products run; no weighted ℓ2): every product
  // hand-written, over the rows as stored (hand_products.h), where a microkernel would pad the
  // queries to a vector.
  bool hand;
  // The hand-written products over the bank rows (scores, K = D) and the value rows (dP, K = Dv)
  // by lane_scores (hand_products.h): rows too short for a dot product's reduction to pay.
  bool lanes_x, lanes_v;
  // dX and dV rows leave the tile in the 16-bit input dtype (dx16, dv16): each row gets
  // all its terms in one tile (one query block, and a bank per leading index), so no float32
  // N x D gradient is ever allocated (at 32 MiB each, glibc maps them afresh at every call).
  bool direct;
  int64_t query_block, row_block, splits, rows_per_split;
  // Each query's top row (BackwardParams::top) settled by the tile that has it, at the end of its query
  // block, while its rows are hot: one split (a query's dt excess is whole there) and float dX rows.
  // Else settle_top_rows does it after the tiles.
  bool settle_in_tiles;
  int64_t tiles(const BackwardParams& b) const { return b.Lm * splits; }
};

// Throws std::invalid_argument where the build has no brgemm (the caller keeps its own backward).
BackwardPlan make_backward_plan(const BackwardParams& b, int num_threads);
// Whether this build has the backward (make_backward_plan does not throw for want of brgemm).
bool backward_available();
void run_backward_tile(const BackwardParams& b, const BackwardPlan& plan, int64_t tile);
// Each query's top row (BackwardParams::top) into dq (L, B, D, summed over the splits) and the bank's
// gradient, from the tiles' terms summed (5, L, B), where they did not (BackwardPlan::settle_in_tiles).
void settle_top_rows(const BackwardParams& b, const BackwardPlan& plan, float* dq, const float* terms);

// What this build and CPU run with: "isa=avx512 gemm=brgemm vnni_bf16=1 vnni_f16=0"
// (after HEN_KERNELS_CPU_ISA, see hopfield_cpu.cpp), for logs, benchmarks and tests.
std::string describe();

const char* isa_name(Isa isa);

}  // namespace hen
