// Planning, instruction-set dispatch and the split combine of the CPU kernel.
#include "cpu/hopfield_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "cpu/microkernel.h"

namespace hen {

// One run_tile per instruction set the build compiled tile_kernel.cpp for (CMake's HEN_CPU_ISAS).
#define HEN_DECLARE_TILE(ns)                                                     \
  namespace ns {                                                                 \
  void run_tile(const PartialParams&, const Plan&, int64_t, const Workspace&);   \
  void run_backward_tile(const BackwardParams&, const BackwardPlan&, int64_t);   \
  void settle_top_rows(const BackwardParams&, float*, const float*);             \
  }
HEN_DECLARE_TILE(baseline)
#if HEN_CPU_X86
HEN_DECLARE_TILE(avx2)
HEN_DECLARE_TILE(avx512)
#endif
#undef HEN_DECLARE_TILE

namespace {
// Queries up to which the hand-written products beat brgemm, score and value
// product, by instruction set and operands.  16-bit inputs on float32 microkernels pay
// for widening every tile, so the hand-written ones, which widen in registers, keep
// them longer.  Without AMX, the pair dot product against oneDNN's AVX-512 BF16 brgemm
// (which repacks every bank tile) wins longer the deeper the rows (AMD EPYC Zen 4, both
// products: up to 4 queries at D = 64, 8 at D = 128, 16 from D = 256 on;
// benchmarks/results/crossover_zen4.md, `python -m hen_kernels.bench crossover`; they
// hold within 10 % on a Zen 5, crossover_zen5.md).
// AVX2 runs only on AMD EPYCs without AVX-512 (every Xeon we drew has AVX-512), so its
// limits come from an EPYC: Zen 4 with AVX2 forced (crossover_zen4_avx2.md, `bench
// crossover --emulate-avx2`, two runs): both dtypes up to 4 queries at D = 64 (8
// queries ran 0.85-0.94x brgemm's speed), float32 8 from D = 128 on (1.11-1.60x at 8),
// widened 16-bit 8 below D = 512 and 16 from there (1.08-1.10x at 16).  The AVX-512
// limits without pairs were measured on a Xeon with AMX (benchmarks/results/cpu.md), and
// hold on another (family 6, model 167; crossover.md, at 3bc7bbd): float32 hand-written
// products 1.05-1.12x brgemm's speed at 8 queries from D = 128, 0.86-0.93x at 16; bf16
// both forced hand-written 0.98-1.42x at 4 queries from D = 32, 0.64-0.85x at 8; the mixed plan
// at 6 and 8 queries (AMX scores, hand-written values) ran 1.16-1.41x faster than the
// better forced kind, D = 64-1024 (in-process, median of 7; ad-hoc).
// Short rows: the hand-written products reduce every query-row sum across a vector, a
// cost per pair that the depth no longer hides: rows shorter than 32 elements (two
// AVX-512 vectors, four AVX2 ones) take at most 2 queries.  On a Zen 5 (crossover_zen5.md,
// from D = 16, at 9d45bff, two runs) 4 queries at D = 16 and 24 ran 0.77-1.05x brgemm's
// speed on AVX-512; AVX-512 float32 8 queries at D = 32 and 48 0.94-1.11x, kept at 4
// below D = 64 (before 9d45bff's value passes, 0.55-0.93x; and 4 queries below D = 32
// 0.68-0.90x on every ISA).  AVX2 on a real AVX2-only CPU (EPYC Zen 3, family 25 model 1;
// crossover_zen3.md, three runs, and 3 and 4 queries at D = 16-32 over 200000 and 10^6
// rows, ad-hoc): 4 queries at D = 16 0.76-0.94x, 16-bit (widened) at D = 24 0.83-0.95x,
// 3 queries below D = 32 0.86-1.04x, at D = 32 0.96-1.31x.  Zen 5 with AVX2 forced had
// 4 queries at D = 24 at 1.04-1.36x (crossover_zen5_avx2.md), the wider core's, not an
// AVX2-only CPU's.  Those limits hold for every CPU here, the Xeons' included, where short
// rows were not measured.
struct HandUpTo {
  int64_t score, value;
};
HandUpTo hand_up_to(Isa isa, DType dt, bool vnni, bool pairs, int64_t D) {
  const int64_t short_rows = isa == Isa::Baseline ? 8 : 32;
  auto limit = [D, short_rows](int64_t q) { return D < short_rows ? std::min<int64_t>(q, 2) : q; };
  if (vnni && pairs) {
    const int64_t q = limit(D >= 256 ? 16 : D >= 128 ? 8 : 4);
    return {q, q};
  }
  if (vnni) return {limit(4), limit(8)};
  if (isa == Isa::Avx2) {
    const int64_t q = limit(D < 128 ? 4 : dt == DType::F32 ? 8 : D < 512 ? 8 : 16);
    return {q, q};
  }
  if (dt != DType::F32) return {limit(16), limit(16)};
  const int64_t q = limit(isa == Isa::Avx512 ? (D < 64 ? 4 : 8) : 4);
  return {q, q};
}

// Whether the lane score products (Product::Lanes: the bank tile turned, W rows a vector)
// beat both the dot products and the microkernels: short rows and a few queries, where the
// dot products spend most on reducing each sum across a vector and the microkernels pad
// the queries to one.  Measured on an EPYC Zen 4, each path forced, in two regimes: one
// bank of 2^25 elements streamed from memory (benchmarks/results/crossover_zen4.md, `bench
// crossover`: lanes against hand-written dot products, both with hand-written values) and 8
// banks of 8192 rows held in cache (ad-hoc, in-process, median of 9: PERFORMANCE.md §5.19).
// AVX-512 float32: 2-8 queries below D = 32 (1.2-2.3x the dot products at 4-8, 0.94-1.4x at
// 2; one query 1.2-1.3x at D = 8, 0.87-0.91x from D = 16), 4-8 at D = 32 (2 queries
// 0.73-0.98x); bfloat16 (against the pair and the AVX-512 BF16 products too): 1-4 queries at
// D = 8 (1.1-1.8x), 2-4 below D = 32 (1.1-1.6x), 4 below D = 64 (1.1-1.2x; 0.75-0.9x at D =
// 64), never 8 (0.75-1.0x against brgemm); float16 (no 16-bit microkernel here) 1.0-2.2x at
// 1-8 queries below D = 32, 1.0-1.2x at 4-8 below D = 64.  AVX2 forced (W = 8: the turn
// costs twice as much a row; crossover_zen4_avx2.md and in cache): 1.05-1.45x at 2-4 queries
// of D = 8, 1.1-1.35x at 4 of D = 16, 0.95-1.25x at 4 of D = 24 (3 not measured); one query
// 0.94-1.2x, 2 of D = 16 0.88-1.05x, 0.4-0.8x from D = 32 on in cache.  Where the CPU has
// AMX its 16-bit microkernels keep their queries (not measured against it).
bool lanes_win(Isa isa, DType dt, bool amx16, int64_t D, int64_t B) {
  if (isa == Isa::Avx2) return B <= 4 && ((B >= 3 && D < 32) || (B == 2 && D < 16));
  if (isa != Isa::Avx512 || amx16) return false;
  const int64_t most = dt == DType::BF16 ? 4 : 8;
  const int64_t fewest = dt == DType::F16 ? (D < 32 ? 1 : D < 64 ? 4 : most + 1)
                         : D < 16         ? 1
                         : D < 32         ? 2
                         : D < (dt == DType::F32 ? 48 : 64) ? 4
                                                            : most + 1;
  return B >= fewest && B <= most;
}

// Whether the AVX-512 copy of the tile kernel has the AVX-512 BF16 instructions.
constexpr bool kBf16Asm = HEN_CPU_X86 && HEN_COMPILER_BF16;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Whether each leading index has one row of weights for all its queries (one mask for a
// batch of cues, as HEN's occluded recall).  Weighted ℓ2 then needs sum_d w_d x_d² once a
// bank row, summed as the row norms are, instead of the product X∘X times w^T over every
// query and row (tile_kernel.cpp).
bool weights_shared(const PartialParams& p) {
  for (int64_t l = 0; l < p.L; ++l) {
    const float* first = p.weights + l * p.B * p.D;
    for (int64_t i = 1; i < p.B; ++i)
      if (std::memcmp(first, first + i * p.D, sizeof(float) * size_t(p.D)) != 0) return false;
  }
  return true;
}

// Whether every w∘q of a bfloat16 call is itself a bfloat16 (a 0/1 mask on a bfloat16 cue,
// powers of two): the weights are float32, and w∘q rounded to 16 bits would lose what they
// ask for, so only then may a weighted score product take 16-bit operands.  (float16 cues:
// not taken, no CPU here has float16 VNNI to measure it on.)
bool weighted_cue_is_16bit(const PartialParams& p) {
  if (p.dtype != DType::BF16) return false;
  for (int64_t l = 0; l < p.L; ++l)
    for (int64_t i = 0; i < p.B; ++i) {
      const float* w = p.weights + (l * p.B + i) * p.D;
      const uint16_t* q = static_cast<const uint16_t*>(p.query) + p.query_lead(l) + i * p.query_row_stride;
      for (int64_t k = 0; k < p.D; ++k) {
        const uint32_t qbits = uint32_t(q[k]) << 16;
        float qf, f;
        std::memcpy(&qf, &qbits, 4);
        f = w[k] * qf;  // as the tile computes w∘q
        uint32_t bits;
        std::memcpy(&bits, &f, 4);
        if (bits & 0xffffu) return false;
      }
    }
  return true;
}

Isa cpu_isa() {
#if HEN_CPU_X86
  static const Isa isa = [] {
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
      return Isa::Avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
      return Isa::Avx2;
    return Isa::Baseline;
  }();
  return isa;
#else
  return Isa::Baseline;
#endif
}

bool cpu_is_intel() {
#if HEN_CPU_X86
  static const bool intel = __builtin_cpu_is("intel");
  return intel;
#else
  return false;
#endif
}

Isa parse_isa(const char* s) {
  if (std::strcmp(s, "avx512") == 0) return Isa::Avx512;
  if (std::strcmp(s, "avx2") == 0) return Isa::Avx2;
  if (std::strcmp(s, "baseline") == 0) return Isa::Baseline;
  throw std::invalid_argument(std::string("HEN_KERNELS_CPU_ISA: expected avx512, avx2 or baseline, got '") + s + "'");
}

// HEN_KERNELS_CPU_ISA caps the instruction set, read once: with it (and oneDNN's own
// ONEDNN_MAX_CPU_ISA) an AVX-512 machine runs what an AVX2-only machine would.
Isa default_isa() {
  static const Isa isa = [] {
    const char* env = std::getenv("HEN_KERNELS_CPU_ISA");
    const Isa cap = env && *env ? parse_isa(env) : Isa::Avx512;
    return std::min(cap, cpu_isa());
  }();
  return isa;
}

// Bank rows per tile, from the row size alone (never from N or B), so that a row is
// scored by the same microkernel call shape wherever it sits: about 128 KiB of bank
// per tile, 64 to 256 rows (multiples of kRowQuantum).
int64_t row_block(int64_t D, int64_t operand_bytes) {
  int64_t rows = 64;
  while (rows < 256 && 2 * rows * D * operand_bytes <= 128 * 1024) rows *= 2;
  return rows;
}
}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "baseline";
  }
}

std::string describe() {
  const bool brgemm = mk::f32_available();
  std::string s = std::string("isa=") + isa_name(default_isa()) + " cpu_isa=" + isa_name(cpu_isa()) +
                  " gemm=" + (brgemm ? "brgemm" : "hand");
  const bool avx512 = default_isa() == Isa::Avx512 && brgemm;
  s += std::string(" vnni_bf16=") + (avx512 && mk::vnni_available(DType::BF16) ? "1" : "0");
  s += std::string(" vnni_f16=") + (avx512 && mk::vnni_available(DType::F16) ? "1" : "0");
  s += std::string(" bf16_pairs=") + (default_isa() == Isa::Avx512 && kBf16Asm && mk::cpu_has_avx512_bf16() ? "1" : "0");
  return s;
}

Plan make_plan(const PartialParams& p, int num_threads, const PlanHints& hints) {
  Plan plan{};
  plan.isa = default_isa();
  if (hints.isa != 0) {
    if (hints.isa < int(Isa::Baseline) || hints.isa > int(cpu_isa()))
      throw std::invalid_argument(std::string("hints: this CPU runs at most isa ") + isa_name(cpu_isa()));
    plan.isa = Isa(hints.isa);
  }
  using G = PlanHints::GemmChoice;
  const bool brgemm = mk::f32_available();
  if (hints.gemm == G::Brgemm && !brgemm)
    throw std::invalid_argument("hints: this build has no brgemm (not x86, or a torch without it)");
  // VNNI pairs need an even depth: run_tile gives an odd D's bank tiles a zero column.
  const bool vnni = brgemm && plan.isa == Isa::Avx512 && p.dtype != DType::F32 && mk::vnni_available(p.dtype);
  // The hand-written bfloat16 products on the pair dot product where the CPU has it: one
  // instruction multiplies and adds twice the pairs of a float32 FMA, with no widening.
  // Measured faster on a CPU without AMX (EPYC Zen 4); on a Xeon with AMX (family 6, model
  // 167; benchmarks/results/crossover.md) the widened products were faster in 48 of 54 cells,
  // and where the planner runs them (up to 4 queries) the pairs took 0.82-1.24x their time,
  // so they stay off where there is AMX (hints.gemm = Pairs forces them).
  const bool pairs = kBf16Asm && plan.isa == Isa::Avx512 && p.dtype == DType::BF16 && mk::cpu_has_avx512_bf16();
  const bool pairs_first = pairs && (hints.gemm == G::Pairs || (hints.gemm == G::Auto && !mk::cpu_has_amx_bf16()));
  const bool l2 = p.similarity != Similarity::Dot;
  plan.shared_weights = p.weights != nullptr && l2 && weights_shared(p);
  // The value product, P . V, never sees the weights; a weighted score product takes
  // 16-bit operands only where weighted_cue_is_16bit (scanned only where they exist),
  // and for ℓ2 only with shared weights (else X∘X times w^T is a float32 product).
  const bool score16 = p.weights == nullptr ||
                       ((vnni || pairs) && (!l2 || plan.shared_weights) && weighted_cue_is_16bit(p));
  const Product fast_score = vnni && score16 ? Product::Vnni : Product::F32;
  const Product fast_value = vnni ? Product::Vnni : Product::F32;
  const Product hand_score = pairs_first && score16 ? Product::Bf16Pairs : Product::Hand;
  const Product hand_value = pairs_first ? Product::Bf16Pairs : Product::Hand;
  // Forced pairs run or are refused: on another dtype or a lower isa they had run the widened
  // products under the name pairs (a crossover cell, a test path, measuring something else).
  if (hints.gemm == G::Pairs && !pairs)
    throw std::invalid_argument(!(kBf16Asm && mk::cpu_has_avx512_bf16())
                                    ? "hints: this CPU (or this build) has no AVX-512 BF16 pair dot product"
                                    : "hints: the pair dot product takes a bfloat16 bank at isa avx512");
  if (hints.gemm == G::Lanes) {
    plan.score = Product::Lanes, plan.value = Product::Hand;
  } else if (hints.gemm != G::Auto) {
    plan.score = hints.gemm == G::Brgemm ? fast_score : hand_score;
    plan.value = hints.gemm == G::Brgemm ? fast_value : hand_value;
  } else if (!brgemm) {
    plan.score = hand_score, plan.value = hand_value;
  } else {
    // Few queries: a microkernel pads them to a whole vector (the score product) and
    // needs each bank tile repacked (16-bit values); the hand-written products read
    // the tile as stored.  hand_up_to says where its thresholds were measured.
    auto up_to = [&](Product fast, Product hand) {
      return hand_up_to(plan.isa, p.dtype, fast == Product::Vnni, hand == Product::Bf16Pairs, p.D);
    };
    plan.score = p.B <= up_to(fast_score, hand_score).score ? hand_score : fast_score;
    plan.value = p.B <= up_to(fast_value, hand_value).value ? hand_value : fast_value;
    if (lanes_win(plan.isa, p.dtype, vnni && mk::cpu_has_amx_bf16(), p.D, p.B)) {
      plan.score = Product::Lanes;
      // 16-bit values widened for a float32 microkernel lost to the hand-written ones behind
      // the lane scores: 1.2-2x (float16 on AVX-512, bfloat16 with AVX2 forced; D = 8-32).
      if (plan.value == Product::F32 && p.dtype != DType::F32) plan.value = Product::Hand;
    }
  }

  // HEN_KERNELS_CPU_L2_DIRECT=0 drops the §5.1 recompute of cancelled ℓ2 pairs: the
  // benchmark's way to show what the rule costs on random data (read at every call).
  const char* direct = std::getenv("HEN_KERNELS_CPU_L2_DIRECT");
  plan.l2_direct = !(direct && std::strcmp(direct, "0") == 0);

  // The 16-bit P of the VNNI value product, rounded by the CPU's own conversion where it has one.
  plan.native_bf16 = (plan.value == Product::Vnni || plan.value == Product::Bf16Pairs) &&
                     p.dtype == DType::BF16 && plan.isa == Isa::Avx512 && kBf16Asm && mk::cpu_has_avx512_bf16();

  plan.pair_norms = pairs;

  // The next bank tile towards L2 (PERFORMANCE.md §5.12, §5.25).  The hand-written score
  // products fetch it as they read this one; after a microkernel's scores, a burst sends it
  // before the value products, unless hand-written value products over the same rows fetch it
  // spread over their passes in the order it is stored (the burst stalled on the memory: eight
  // bf16 queries 1.2-1.3x faster so).  Value products after hand-written scores fetch it again,
  // each pass its own columns (9f91f55: recall 3-19 % faster with both fetches; in stored
  // order eight float32 queries over rows of 512 ran 1.06-1.08x slower there).
  // Rows of a page or more an Intel core's hardware prefetchers stream on their own: without
  // the burst, float32 and bf16 queries over rows of 4-16 KiB ran 1.0-1.35x faster (16 and 64
  // queries, Xeon with AMX), and float32 without the hand-written products' fetches too
  // 1.0-1.5x (1-8 queries; 0.95-1.03x at 4 queries over rows of 1024 floats).  bf16's stay
  // (0.91-1.1x without them at 1-4 queries; after AMX's scores they are the only fetch).
  // Shorter rows keep every fetch (their own measurements), and AMD CPUs too until measured.
  const int64_t es = p.dtype == DType::F32 ? 4 : 2;
  const bool streamed_rows = cpu_is_intel() && es * std::min(p.D, p.Dv) >= 4096;
  const bool hand_fetch = !(streamed_rows && p.dtype == DType::F32);
  const bool hand_scores = plan.score == Product::Hand || plan.score == Product::Bf16Pairs ||
                           plan.score == Product::Lanes;
  const bool hand_values = plan.value == Product::Hand || plan.value == Product::Bf16Pairs;
  plan.scores_fetch_next = hand_scores && hand_fetch;
  plan.burst_next = !hand_scores && !streamed_rows && !(hand_values && p.values_are_memory());
  plan.values_fetch_next = !hand_values || !hand_fetch                ? ValueFetch::None
                           : hand_scores && p.values_are_memory() ? ValueFetch::ByPass
                                                                  : ValueFetch::Stored;

  const int64_t B = std::max<int64_t>(p.B, 1);
  // The tile in the bytes the products read it in (16-bit inputs widen for float32 products).
  const bool wide = p.dtype == DType::F32 || plan.score == Product::F32 || plan.value == Product::F32;
  plan.row_block = row_block(p.D, wide ? 4 : 2);
  // AVX2 float32 products on rows of 2048 and more: 32 queries a block ran 1-10 % faster than
  // 64 (EPYC Zen 4 with AVX2 forced, float32 and widened bf16, three runs each; at D = 512
  // and 1024 64 was as fast or faster, with the tiles restrided as rows.h does).  Our
  // reading, not measured apart: Q^T and the accumulator of 64 queries (1 MiB at D = 2048)
  // fill the L2 the row tile is streamed through.
  // 16-bit products on the matrix units over rows of at most 128 elements (attention: ViT's 197
  // tokens a head of 64): 128 queries a block where that still leaves four tiles or more a
  // thread.  Each block calls both microkernels once a row tile, and at these depths the calls
  // are short, so fewer blocks pay fewer of their fixed costs (oneDNN's kernel lookup, AMX
  // tile set-up, V repacked in VNNI pairs); the bits are the same.  Fewer tiles than that, or
  // blocks between 64 and 128, lost to 64 (a late thread's last tile; brgemm on 80 queries),
  // and D = 256-512 gained nothing: benchmarks/PERFORMANCE.md §5.8.
  const bool short_vnni_rows = plan.score == Product::Vnni && plan.value == Product::Vnni && p.D <= 128 &&
                               p.Dv <= 128;
  const int64_t long_block_tiles = std::max<int64_t>(p.L, 1) * ceil_div(B, 128);
  const int64_t block = plan.isa == Isa::Avx2 && p.D >= 2048 && plan.score == Product::F32  ? 32
                        : short_vnni_rows && long_block_tiles >= 4 * std::max(num_threads, 1) ? 128
                                                                                               : 64;
  plan.query_block = std::min<int64_t>(B, hints.query_block > 0 ? hints.query_block : block);
  plan.query_blocks = ceil_div(p.B, plan.query_block);
  const int64_t query_tiles = std::max<int64_t>(p.L * ceil_div(B, plan.query_block), 1);
  // Splitting the bank gives every thread several tiles even with few queries (the
  // recall regime); each split still covers several whole row tiles, and the
  // workspace grows with splits x B x Dv, never with N.  A bank of fewer rows still
  // gets a split a thread, of one row tile or more, where a query block's products over
  // it come to 4 million multiply-adds: at 500-1000 rows and 4-16 million of them two
  // splits ran 1.06-1.56x faster than one on two threads (float32 and bf16, D = 64-256;
  // EPYC Zen 5, in-process A/B, blocks of 10 calls, median of 15, three runs); forced at
  // 0.5-2.5 million, 0.71-1.35x (0.71x: a bank of 300 rows, one whole row tile and a
  // short one).
  const int64_t threads = std::max(num_threads, 1);
  const int64_t want = ceil_div(4 * threads, query_tiles);
  const int64_t whole_tiles = ceil_div(p.N, plan.row_block);
  const bool small_bank_pays = p.N >= 2 * plan.row_block && plan.query_block * p.N * (p.D + p.Dv) >= 4'000'000;
  const int64_t most = std::max<int64_t>(
      {ceil_div(p.N, 4 * plan.row_block), small_bank_pays ? std::min(whole_tiles, ceil_div(threads, query_tiles)) : 1, 1});
  plan.splits = hints.splits > 0 ? hints.splits : std::clamp<int64_t>(want, 1, most);
  plan.rows_per_split = ceil_div(ceil_div(std::max<int64_t>(p.N, 1), plan.splits), plan.row_block) * plan.row_block;
  plan.splits = ceil_div(std::max<int64_t>(p.N, 1), plan.rows_per_split);
  // Many queries on a bank too small to split: smaller query blocks give the idle threads
  // tiles (each block reads the whole bank, at these sizes from L2), blocks of at least
  // kMinSplitBlock queries.  On two threads, 32 or 64 queries against 20-500 rows (D = 16-128)
  // ran 1.03-1.6x faster as two blocks (AVX-512; 1.35-1.8x with AVX2 forced), float32 and
  // bf16, no case slower over three runs; 16 queries as two blocks of 8 ran 0.84x with
  // AVX-512 (1.3x with AVX2).  EPYC Zen 5, in-process A/B against the hinted block of 64,
  // median of 21.
  constexpr int64_t kMinSplitBlock = 16;
  if (hints.query_block <= 0 && plan.splits * query_tiles < threads) {
    const int64_t blocks_per_lead = ceil_div(threads, std::max<int64_t>(p.L, 1));
    const int64_t block = ceil_div(B, blocks_per_lead);
    if (block >= kMinSplitBlock && block < plan.query_block) {
      plan.query_block = block;
      plan.query_blocks = ceil_div(p.B, plan.query_block);
    }
  }
  plan.workers = std::clamp<int64_t>(plan.tiles(p), 1, threads);
  return plan;
}

void run_tile(const PartialParams& p, const Plan& plan, int64_t tile, const Workspace& ws) {
  switch (plan.isa) {
#if HEN_CPU_X86
    case Isa::Avx512: avx512::run_tile(p, plan, tile, ws); return;
    case Isa::Avx2: avx2::run_tile(p, plan, tile, ws); return;
#endif
    default: baseline::run_tile(p, plan, tile, ws); return;
  }
}

bool backward_available() { return mk::f32_available(); }

BackwardPlan make_backward_plan(const BackwardParams& b, int num_threads) {
  if (!backward_available())
    throw std::invalid_argument("the CPU backward needs brgemm (not x86, or a torch without it)");
  const PartialParams& p = b.p;
  BackwardPlan plan{};
  plan.isa = default_isa();
  // The forward's condition for its 16-bit products (make_plan), for bfloat16 only: G is
  // rounded to the dtype, and float16's range would not hold it (a loss-scaled gradient
  // passes 65504).  With weights w∘q is not 16-bit in general, and weighted ℓ2 takes
  // float32 products of X∘X anyway.
  const bool vnni = plan.isa == Isa::Avx512 && p.dtype == DType::BF16 && p.weights == nullptr && p.D % 2 == 0 &&
                    mk::vnni_available(p.dtype);
  // Few queries: the hand-written products, where the microkernels pad them to a vector.  Their tiles
  // are queries x rows (backward_kernel.cpp), and the limits were measured with those (thirty-first
  // session, EPYC Zen 4; the backward op, a build taking them for up to 8 queries at any depth against
  // this one, alternating processes, median of 7, 2M / max(D, 16) rows): at D >= 32 up to 4 queries
  // the same as before (float32 at 8: 0.68-1.01x the microkernels); bfloat16 against the VNNI
  // products 1.34-1.65x faster at 4 queries (the earlier hand-written path: 0.86-1.10x), 0.76-0.95x
  // at 8.  Rows shorter than 16 features fill no AVX-512 vector: there the hand-written products
  // are 1.9-3.1x faster at one query, 1.2-1.7x at two, 0.5-0.8x at four (float32 and bfloat16, D = 8
  // and 15; with AVX2 forced 1.8-2.7x, 1.3-1.7x and 0.7-0.9x).  AMX keeps the earlier limit of 2 for
  // the VNNI products: not measured since.
  const bool amx = vnni && mk::cpu_has_amx_bf16();
  const int64_t hand_up_to = p.D < 16 || amx ? 2 : kBackwardHandQueriesMax;
  plan.hand = p.B <= hand_up_to && !(p.weights != nullptr && p.similarity != Similarity::Dot);
  // Their score and dP products by lane_scores where a product's rows are short, keys = values turned
  // once (thirty-second session, EPYC Zen 4, a training step of 8 banks of 2^16 / D rows, the forward
  // unchanged, builds in alternating processes, median of 4-5 rounds, two threads): AVX-512 2 queries
  // 1.00-1.14x faster, 4 queries 1.10-1.37x (D = 16-31); AVX2 forced 2 queries of 8-16 elements
  // 1.00-1.19x, 4 of 16 1.16x.  On one thread before the turn was shared: one query 0.83-1.09x, D =
  // 32-48 0.77-1.12x, AVX2 D = 24 and 31 0.79-1.06x; rows shorter than 16 at 3-4 queries on lanes
  // 0.70-1.09x against the microkernels, so the hand-written limit there stays 2.
  const int64_t lane_depth = plan.isa == Isa::Avx512 ? 32 : plan.isa == Isa::Avx2 ? 17 : 0;
  plan.lanes_x = plan.hand && p.B >= 2 && p.D < lane_depth;
  plan.lanes_v = plan.hand && p.B >= 2 && p.Dv < lane_depth;
  plan.vnni = vnni && !plan.hand;
  plan.dout16 = plan.vnni && b.dout_16bit && p.Dv % 2 == 0;
  plan.query_block = std::min<int64_t>(std::max<int64_t>(p.B, 1), kBackwardQueryBlockMax);
  // (float16 rows are stored by F16C's conversion: not in the baseline copy.)
  plan.direct = (p.dtype == DType::BF16 || (p.dtype == DType::F16 && plan.isa >= Isa::Avx2)) &&
                p.B <= plan.query_block && b.Lm == p.L;
  plan.row_block = row_block(p.D, plan.vnni ? 2 : 4);
  // Tiles own disjoint bank rows, so the bank is split even with many queries: dq and
  // dbeta get a slot per split, and the workspace grows with splits x L x B x D, never N.
  const int64_t want = ceil_div(4 * std::max(num_threads, 1), std::max<int64_t>(b.Lm, 1));
  const int64_t most = std::max<int64_t>(ceil_div(p.N, 2 * plan.row_block), 1);
  plan.splits = std::clamp<int64_t>(want, 1, most);
  plan.rows_per_split = ceil_div(ceil_div(std::max<int64_t>(p.N, 1), plan.splits), plan.row_block) * plan.row_block;
  plan.splits = ceil_div(std::max<int64_t>(p.N, 1), plan.rows_per_split);
  // A bank of fewer rows than two tiles a thread, on fewer banks than threads, left threads
  // idle or split unevenly (300 rows: one tile of 256 and a padded one of 44): tiles of about
  // N / threads rows instead (a multiple of kRowQuantum), one a split.  Measured (EPYC Zen 3,
  // 2 threads, the backward op, old and new builds in turn, median of 41, two runs each): 64
  // queries against 300 x 64 rows 1.5-2.2x faster (float32 and bf16), 64 x 450 1.2-1.3x, 256 x
  // 400 1.5-1.75x; 1-16 queries against 64-300 rows 1.03-1.44x, so no size
  // threshold.  Only where the even tile is smaller than row_block: tiles stay within its budget.
  const int64_t threads = std::max(num_threads, 1);
  const int64_t want_splits = ceil_div(threads, std::max<int64_t>(b.Lm, 1));
  const int64_t even = ceil_div(ceil_div(std::max<int64_t>(p.N, 1), want_splits), kRowQuantum) * kRowQuantum;
  if (plan.splits < want_splits && even < plan.row_block) {
    plan.row_block = plan.rows_per_split = even;
    plan.splits = ceil_div(std::max<int64_t>(p.N, 1), even);
  }
  // (after the tiles, the rows were cold: 41 ns a query, 19 % of a 256 x 128-query backward over 128 x 16 rows)
  plan.settle_in_tiles = b.top && plan.splits == 1 && !plan.direct;
  return plan;
}

void run_backward_tile(const BackwardParams& b, const BackwardPlan& plan, int64_t tile) {
  switch (plan.isa) {
#if HEN_CPU_X86
    case Isa::Avx512: avx512::run_backward_tile(b, plan, tile); return;
    case Isa::Avx2: avx2::run_backward_tile(b, plan, tile); return;
#endif
    default: baseline::run_backward_tile(b, plan, tile); return;
  }
}

void settle_top_rows(const BackwardParams& b, const BackwardPlan& plan, float* dq, const float* terms) {
  switch (plan.isa) {
#if HEN_CPU_X86
    case Isa::Avx512: avx512::settle_top_rows(b, dq, terms); return;
    case Isa::Avx2: avx2::settle_top_rows(b, dq, terms); return;
#endif
    default: baseline::settle_top_rows(b, dq, terms); return;
  }
}

// docs/design.md §5.1: merges accumulate in float64 and round once.
void combine(const PartialParams& p, const Plan& plan, int64_t begin, int64_t end, const Workspace& ws) {
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t S = plan.splits, Dv = p.Dv;
  double acc[512];
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
    double sum = 0.0;
    if (nan) {
      std::fill(o, o + Dv, NAN);
    } else if (m == neg_inf) {
      std::fill(o, o + Dv, 0.f);
    } else {
      for (int64_t s = 0; s < S; ++s) sum += double(ws.sum[slot(s)]) * std::exp(double(ws.max[slot(s)]) - m);
      const double inv = 1.0 / sum;
      for (int64_t d0 = 0; d0 < Dv; d0 += 512) {  // in slices, so the float64 sums stay on the stack
        const int64_t n = std::min<int64_t>(512, Dv - d0);
        std::fill(acc, acc + n, 0.0);
        for (int64_t s = 0; s < S; ++s) {
          const int64_t k = slot(s);
          if (ws.max[k] == neg_inf) continue;
          const double w = std::exp(double(ws.max[k]) - m) * inv;
          const float* a = ws.acc + k * Dv + d0;
          for (int64_t d = 0; d < n; ++d) acc[d] += w * a[d];
        }
        for (int64_t d = 0; d < n; ++d) {
          o[d0 + d] = float(acc[d]);
          nan |= non_finite(o[d0 + d]);  // the lse of an out that is not finite is NaN (non_finite)
        }
      }
    }
    p.lse[row] = nan ? NAN : (sum > 0.0 ? float(m + std::log(sum)) : neg_inf);
    p.top_score[row] = best;
    p.top_index[row] = best_index;
  }
}

}  // namespace hen
