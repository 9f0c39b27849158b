// The one ATen binding: checks inputs, plans the work, runs the torch-free
// kernels on ATen's thread pool and registers the ops with TORCH_LIBRARY.
// Python validates the public arguments first (hen_kernels/validation.py);
// the checks here guard the op when it is called directly.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "hopfield_cpu.h"

namespace {

hen::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return hen::DType::F32;
    case at::kHalf: return hen::DType::F16;
    case at::kBFloat16: return hen::DType::BF16;
    default: TORCH_CHECK_TYPE(false, "hen_kernels::partial: expected float32, float16 or bfloat16, got ", t);
  }
}

at::Tensor unit_stride_rows(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> partial_cpu(
    const at::Tensor& query_in, const at::Tensor& memory_in, const at::Tensor& values_in, const at::Tensor& beta_in,
    int64_t similarity, int64_t offset) {
  TORCH_CHECK(query_in.dim() == 3 && memory_in.dim() == 3 && values_in.dim() == 3,
              "hen_kernels::partial: expected query (L, B, D), memory (Lm, N, D), values (Lm, N, Dv)");
  const int64_t L = query_in.size(0), B = query_in.size(1), D = query_in.size(2);
  const int64_t Lm = memory_in.size(0), N = memory_in.size(1), Dv = values_in.size(2);
  TORCH_CHECK(memory_in.size(2) == D, "hen_kernels::partial: memory D ", memory_in.size(2), " != query D ", D);
  TORCH_CHECK(Lm == 1 || Lm == L, "hen_kernels::partial: memory leading size must be 1 or ", L);
  TORCH_CHECK(values_in.size(0) == Lm && values_in.size(1) == N, "hen_kernels::partial: values must be (Lm, N, Dv)");
  TORCH_CHECK(query_in.scalar_type() == memory_in.scalar_type() && query_in.scalar_type() == values_in.scalar_type(),
              "hen_kernels::partial: query, memory and values must share a dtype");
  TORCH_CHECK(beta_in.dim() == 1 && beta_in.size(0) == L, "hen_kernels::partial: beta must be (L,)");
  TORCH_CHECK(similarity >= 0 && similarity <= 2, "hen_kernels::partial: similarity code must be 0, 1 or 2");
  TORCH_CHECK(offset >= 0, "hen_kernels::partial: offset must be >= 0");
  for (const auto* t : {&query_in, &memory_in, &values_in, &beta_in})
    TORCH_CHECK(t->device().is_cpu(), "hen_kernels::partial (CPU): every input must be on the CPU");

  const at::Tensor query = unit_stride_rows(query_in);
  const at::Tensor memory = unit_stride_rows(memory_in);
  // Keep keys = values aliased so the kernel reads the bank once.
  const at::Tensor values = values_in.is_same(memory_in) ? memory : unit_stride_rows(values_in);
  const at::Tensor beta = beta_in.to(at::kFloat).contiguous();

  auto f32 = query.options().dtype(at::kFloat);
  at::Tensor out = at::empty({L, B, Dv}, f32);
  at::Tensor lse = at::empty({L, B}, f32);
  at::Tensor top_score = at::empty({L, B}, f32);
  at::Tensor top_index = at::empty({L, B}, query.options().dtype(at::kLong));

  hen::PartialParams p{};
  p.query = query.data_ptr();
  p.memory = memory.data_ptr();
  p.values = values.data_ptr();
  p.beta = beta.data_ptr<float>();
  p.dtype = kernel_dtype(query.scalar_type());
  p.similarity = static_cast<hen::Similarity>(similarity);
  p.L = L, p.B = B, p.N = N, p.D = D, p.Dv = Dv;
  p.query_lead_stride = query.stride(0), p.query_row_stride = query.stride(1);
  p.memory_lead_stride = Lm == 1 ? 0 : memory.stride(0), p.memory_row_stride = memory.stride(1);
  p.values_lead_stride = Lm == 1 ? 0 : values.stride(0), p.values_row_stride = values.stride(1);
  p.offset = offset;
  p.out = out.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  p.top_score = top_score.data_ptr<float>();
  p.top_index = top_index.data_ptr<int64_t>();
  if (L == 0 || B == 0) return {out, lse, top_score, top_index};

  const hen::Plan plan = hen::make_plan(p, at::get_num_threads());
  hen::Workspace ws{};
  at::Tensor ws_acc, ws_stats, ws_index;
  if (plan.splits > 1) {
    ws_acc = at::empty({L, plan.splits, B, Dv}, f32);
    ws_stats = at::empty({3, L, plan.splits, B}, f32);
    ws_index = at::empty({L, plan.splits, B}, top_index.options());
    ws.acc = ws_acc.data_ptr<float>();
    ws.max = ws_stats[0].data_ptr<float>();
    ws.sum = ws_stats[1].data_ptr<float>();
    ws.top_score = ws_stats[2].data_ptr<float>();
    ws.top_index = ws_index.data_ptr<int64_t>();
  }
  at::parallel_for(0, plan.tiles(p), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) hen::run_tile(p, plan, t, ws);
  });
  if (plan.splits > 1) {
    at::parallel_for(0, L * B, 16, [&](int64_t begin, int64_t end) { hen::combine(p, plan, begin, end, ws); });
  }
  return {out, lse, top_score, top_index};
}

// What this build runs with, for tests and logs: the tile kernel's instruction
// set, and whether at::parallel_for was compiled with OpenMP (without it the
// header template runs every tile on the calling thread).
std::string cpu_info() {
  std::string info = std::string("isa=") + hen::isa_name();
#ifdef _OPENMP
  info += " openmp=" + std::to_string(_OPENMP);
#else
  info += " openmp=none";
#endif
  return info;
}

}  // namespace

TORCH_LIBRARY(hen_kernels, m) {
  m.def(
      "partial(Tensor query, Tensor memory, Tensor values, Tensor beta, int similarity, int offset) "
      "-> (Tensor out, Tensor lse, Tensor top_score, Tensor top_index)");
  m.def("cpu_info() -> str", &cpu_info);
}

TORCH_LIBRARY_IMPL(hen_kernels, CPU, m) { m.impl("partial", &partial_cpu); }
