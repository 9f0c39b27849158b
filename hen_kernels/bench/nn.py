"""Hopfield layers: forward and forward+backward time and peak memory, fused against dense PyTorch and SDPA.

    python -m hen_kernels.bench nn [--out DIR] [--quick] [--repeats K] [--device DEVICE] [--dtype DTYPE]

Each case runs twice with the same inputs: ``fused`` (the automatic backend,
``cpu`` on CPU tensors and ``triton`` / ``cuda`` on GPU ones, with the fused
backward of ``hen_kernels.autograd``) and ``dense``: plain PyTorch in the inputs'
dtype that holds the B x N association matrix and lets autograd keep it for the
backward, what hflayers computes (the functional update: ``softmax(beta * sim) @ X``
as the CPU table's plain peer writes it; the modules: their own dense path, matmul,
softmax, matmul, entered with an all-False padding mask, which adds one B x N add;
not ``backend="torch"``, the reference, whose float64 scores make it the
specification and no speed peer); the functional update with the dot product also runs as
PyTorch's ``scaled_dot_product_attention`` (SDPA: its fused flash kernels, forward
and backward), the peer a user training attention would pick.  Before anything is
timed, each call's output and gradients are checked against the reference in float64
(from the same rounded inputs and weights); a fused row that fails is marked WRONG and
the command exits 1.  Cases are at layer-regime shapes (docs/design.md §2, D <= 256):
the functional update, a ``HopfieldLayer`` lookup over a large learned bank,
``HopfieldPooling`` over long bags, and ``attention``: ``Hopfield`` set up to
compute what ``torch.nn.MultiheadAttention`` computes (no pattern norms; q, k,
v and out projections; beta = 1/√(head dim)) on a batch of short sequences,
against MHA holding the same weights (SDPA inside: the layer a user of
attention would otherwise train).  Memory is the peak resident memory
above the level before the call on the CPU (VmHWM, as the cpu table), and
``torch.cuda.max_memory_allocated`` above it on a GPU.  ``--dtype`` (default
float32 on the CPU, bfloat16 on a GPU) is the dtype of inputs and parameters.  The table goes to
``benchmarks/results/nn.md`` (and ``nn.json``); nothing asserts on time.
"""
from __future__ import annotations

import math
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F

from .. import backends, ops
from .. import nn as hnn
from ..validation import check_inputs
from . import common, cpu_peers as peers
from .common import DEFAULT_OUT, MIB


@dataclass(frozen=True)
class Case:
    kind: str  # "update" | "layer" | "pooling" | "attention"
    similarity: str
    batch: int  # queries (update), batch (layer, pooling)
    length: int  # state patterns per batch item (layer), bag length (pooling); unused for update
    bank: int  # N: stored patterns (update, layer); = length for pooling
    dim: int
    heads: int = 1

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.similarity}-b{self.batch}-l{self.length}-n{self.bank}-d{self.dim}-h{self.heads}"


def cases(quick: bool, device: torch.device) -> List[Case]:
    if quick:
        return [Case("update", "dot", 64, 0, 512, 32), Case("layer", "l2", 4, 16, 256, 32, 2),
                Case("pooling", "dot", 8, 128, 128, 32, 2), Case("attention", "dot", 2, 16, 16, 32, 2)]
    if device.type == "cuda":
        return [Case("update", s, 16384, 0, 16384, d) for s in ("dot", "l2") for d in (64, 128)] + [
            Case("layer", "dot", 64, 256, 16384, 128, 2), Case("pooling", "dot", 256, 4096, 4096, 128, 2)]
    return [Case("update", "dot", 1024, 0, 32768, 64), Case("update", "l2", 1024, 0, 32768, 64),
            Case("layer", "dot", 32, 64, 16384, 64), Case("pooling", "dot", 64, 2048, 2048, 64, 2),
            Case("attention", "dot", 8, 64, 64, 64, 4), Case("attention", "dot", 32, 128, 128, 128, 8)]


# Rounds of calls go on past --repeats until they have taken this long (up to MAX_ROUNDS): a median of 3-5
# calls of half a millisecond moved 20-30 % from run to run on these VMs.
MIN_ROUNDS_S = 1.0
MAX_ROUNDS = 101
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SDPA = "sdpa"  # build()'s name for the SDPA peer
DENSE = "dense"  # build()'s name for the dense plain-PyTorch peer
DENSE_SLACK = 2.0  # the fused errors may reach this many times the dense peer's own (allowed())


def _dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def has_sdpa_peer(case: Case) -> bool:
    """The update with the dot product is attention with the bank as keys and values; the attention
    case's peer is MultiheadAttention (SDPA inside)."""
    return case.kind == "attention" or (case.kind == "update" and case.similarity == "dot")


# Hopfield without the pattern norms hflayers adds by default: MultiheadAttention's computation.
AS_MHA = {f"normalize_{p}{a}": False for p in ("stored_pattern", "state_pattern", "pattern_projection")
          for a in ("", "_affine")}


def mha_with_weights_of(module: hnn.Hopfield) -> torch.nn.MultiheadAttention:
    """nn.MultiheadAttention holding ``module``'s projections (q, k, v packed as MHA packs them)."""
    p = module.q_proj.weight
    mha = torch.nn.MultiheadAttention(p.shape[1], module.num_heads, batch_first=True, device=p.device, dtype=p.dtype)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([module.q_proj.weight, module.k_proj.weight, module.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([module.q_proj.bias, module.k_proj.bias, module.v_proj.bias]))
        mha.out_proj.weight.copy_(module.out_proj.weight)
        mha.out_proj.bias.copy_(module.out_proj.bias)
    return mha


def build(case: Case, backend: Optional[str], device: torch.device, dtype: Optional[torch.dtype] = None,
          widen: bool = False):
    """``call(grad)`` for one case: forward (+ backward when grad) by ``backend`` (None: automatic,
    ``SDPA``: the SDPA peer of ``has_sdpa_peer`` cases); ``call.params`` hold the gradients after.
    ``widen``: inputs and weights rounded to ``dtype`` as every other call's are, then run in float64
    (the check: with backend "torch", the reference)."""
    g = torch.Generator().manual_seed(0)
    dt = dtype or _dtype(device)
    run_dt = torch.float64 if widen else dt

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dt).to(run_dt)

    # A padding mask that blocks nothing sends the modules down their dense path (DENSE).
    dense_mask = torch.zeros(case.batch, case.bank, dtype=torch.bool, device=device) if backend == DENSE else None
    compared = None  # the tensors whose gradients grad_rel_err compares (None: params)
    modules: List[torch.nn.Module] = []  # set to eval for the forward alone, to train for forward + backward
    if case.kind == "update":
        q, x = rnd(case.batch, case.dim), rnd(case.bank, case.dim)
        beta = 1.0 if case.similarity == "l2" else case.dim ** -0.5
        params = [q, x]

        def forward():
            if backend == SDPA:
                return F.scaled_dot_product_attention(q[None, None], x[None, None], x[None, None], scale=beta)[0, 0]
            if backend == DENSE:
                return peers.plain(q, x, beta, case.similarity)
            return ops.hopfield_update(q, x, beta, similarity=case.similarity, backend=backend)
    elif case.kind == "attention":
        torch.manual_seed(0)
        module = hnn.Hopfield(input_size=case.dim, num_heads=case.heads, hidden_size=case.dim // case.heads,
                              similarity=case.similarity, backend=None if backend in (SDPA, DENSE) else backend,
                              **AS_MHA)
        module = module.to(device=device, dtype=dt).to(run_dt)
        inp = rnd(case.batch, case.length, case.dim)
        layer = mha_with_weights_of(module) if backend == SDPA else module
        params, compared, modules = list(layer.parameters()) + [inp], [inp], [layer]

        def forward():
            if backend == SDPA:
                return layer(inp, inp, inp, need_weights=False)[0]
            return layer(inp, stored_pattern_padding_mask=dense_mask) if backend == DENSE else layer(inp)
    else:
        common = dict(input_size=case.dim, num_heads=case.heads, hidden_size=case.dim // case.heads,
                      similarity=case.similarity, backend=None if backend == DENSE else backend)
        if case.kind == "layer":
            torch.manual_seed(0)
            module = hnn.HopfieldLayer(quantity=case.bank, **common)
            inp = rnd(case.batch, case.length, case.dim)
        else:
            torch.manual_seed(0)
            module = hnn.HopfieldPooling(quantity=1, **common)
            inp = rnd(case.batch, case.length, case.dim)
        module = module.to(device=device, dtype=dt).to(run_dt)
        params, modules = list(module.parameters()), [module]

        def forward():
            return module(inp, stored_pattern_padding_mask=dense_mask) if backend == DENSE else module(inp)

    def call(grad: bool):
        if not grad:
            with torch.no_grad():
                return forward()
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        out = forward()
        out.float().square().mean().backward()
        return out

    call.params = params
    call.compared = params if compared is None else compared
    call.modules = modules
    return call


def grad_rel_err(a, b) -> float:
    """The largest difference (Frobenius) between the gradients two calls left, each relative to its own
    norm or, where larger, a thousandth of the largest: a key projection's bias shifts every score of a
    query alike, so its gradient is zero but for rounding (1e-15), and no relative error of it means much."""
    norms = [r.grad.double().norm().item() for r in b.compared]
    floor = 1e-3 * max(norms)
    return max((p.grad.double() - r.grad.double()).norm().item() / max(n, floor) if max(n, floor) > 0 else 0.0
               for p, r, n in zip(a.compared, b.compared, norms))


def run_case(case: Case, device: torch.device, repeats: int, dtype: Optional[torch.dtype] = None,
             min_s: float = MIN_ROUNDS_S) -> dict:
    dt = dtype or _dtype(device)
    row = dict(asdict(case), name=case.name, dtype=str(dt).replace("torch.", ""))
    calls = {"fused": build(case, None, device, dt), DENSE: build(case, DENSE, device, dt)}
    if has_sdpa_peer(case):
        calls[SDPA] = build(case, SDPA, device, dt)
    # Each call's output and gradients against the reference in float64 from the same rounded inputs and
    # weights, before timing: the fused ones must be right (or the row is WRONG), and each peer computes
    # what the kernel does.
    reference = build(case, "torch", device, dt, widen=True)
    want = reference(True).detach()
    row["errors"] = {who: dict(out=peers.rel_err(c(True).detach(), want), grads=grad_rel_err(c, reference))
                     for who, c in calls.items()}
    del want, reference
    row["check_ok"] = all(e <= allowed(row, k) for k, e in row["errors"]["fused"].items())  # (a NaN is not)
    for mode, grad in (("fwd", False), ("fwd+bwd", True)):
        # The forward alone is inference: modules in eval mode, where nn.MultiheadAttention takes its fused fast
        # path (one native op) when its conditions hold; training mode for forward + backward.
        for c in calls.values():
            for m in c.modules:
                m.train(grad)
        fns = {who: (lambda c=c, grad=grad: c(grad)) for who, c in calls.items()}
        measured = common.time_calls(fns, repeats, device, min_s=min_s, max_repeats=MAX_ROUNDS)
        for who, (times, extra) in measured.items():
            row[f"{mode}_{who}_ms"] = statistics.median(times) * 1e3
            row[f"{mode}_{who}_mib"] = None if extra is None else extra / MIB
        row[f"{mode}_speedup"] = row[f"{mode}_{DENSE}_ms"] / row[f"{mode}_fused_ms"]
        sdpa_ms = row.get(f"{mode}_{SDPA}_ms")
        row[f"{mode}_vs_sdpa"] = None if sdpa_ms is None else sdpa_ms / row[f"{mode}_fused_ms"]
    return row


COLUMNS = [  # (header, row -> cell)
    ("case", lambda r: r["name"]),
    ("fwd fused ms", lambda r: f"{r['fwd_fused_ms']:.1f}"),
    ("fwd dense ms", lambda r: f"{r['fwd_dense_ms']:.1f}"),
    ("fwd vs dense", lambda r: common.ratio(r["fwd_speedup"])),
    ("fwd+bwd fused ms", lambda r: f"{r['fwd+bwd_fused_ms']:.1f}"),
    ("fwd+bwd dense ms", lambda r: f"{r['fwd+bwd_dense_ms']:.1f}"),
    ("fwd+bwd vs dense", lambda r: common.ratio(r["fwd+bwd_speedup"])),
    ("fwd+bwd fused MiB", lambda r: common.num(r["fwd+bwd_fused_mib"], ".1f")),
    ("fwd+bwd dense MiB", lambda r: common.num(r["fwd+bwd_dense_mib"], ".1f")),
    ("fwd vs sdpa", lambda r: common.ratio(r.get("fwd_vs_sdpa"))),
    ("fwd+bwd sdpa ms", lambda r: common.num(r.get("fwd+bwd_sdpa_ms"), ".1f")),
    ("fwd+bwd vs sdpa", lambda r: common.ratio(r.get("fwd+bwd_vs_sdpa"))),
    ("fused err (out / grads)", lambda r: error_cell(r, "fused")),
    ("dense err", lambda r: error_cell(r, DENSE)),
    ("sdpa err", lambda r: error_cell(r, SDPA)),
]


def allowed(row: dict, what: str) -> float:
    """The fused call's largest allowed error in ``what`` ("out" or "grads"): the tolerance, or where larger
    DENSE_SLACK x the dense peer's own.  In bfloat16 the modules' own PyTorch arithmetic (layer norms,
    projections) leaves some small parameter gradients further off float64 than the tolerance, the dense
    path's as far as the fused (a LayerNorm bias: 0.26 in both); a wrong kernel is off by far more."""
    dense = row["errors"][DENSE][what]
    return max(common.CHECK_TOL[row["dtype"]], DENSE_SLACK * dense if math.isfinite(dense) else 0.0)


def error_cell(r: dict, who: str) -> str:
    e = r["errors"].get(who)
    if e is None:
        return "n/a"
    over = not all(v <= common.CHECK_TOL[r["dtype"]] for v in e.values())
    mark = (" (WRONG)" if not r["check_ok"] else " (as dense)" if over else "") if who == "fused" else (
        " (over)" if over else "")
    return f"{e['out']:.1e} / {e['grads']:.1e}" + mark


def wrong_rows(report: dict) -> List[str]:
    """The rows whose fused output or gradients failed their check."""
    return [r["name"] for r in report["rows"] if not r["check_ok"]]


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# Hopfield layers: fused vs dense PyTorch and SDPA ({report['device']}, {report['dtype']})",
        "",
        f"Fused backend: {report['fused_backend']}. Command: `{report['command']}`. "
        f"Median of {report['repeats']} calls or more (on the CPU rounds go on for at least "
        f"{report.get('min_rounds_s', 0)} s, up to {MAX_ROUNDS}); the forward alone with the modules in eval mode (inference: MultiheadAttention's "
        f"fused fast path), forward + backward in train mode; load average {report['load']}.",
        f"Host: {m['cpu']} ({m['isa']}), {m['logical_cpus']} logical CPUs, torch {m['torch']} with "
        f"{m['torch_threads']} threads, triton {m['triton']}, Python {m['python']}; allocator: "
        f"{m.get('allocator', 'not recorded')} (docs/nn.md: glibc's defaults make large temporaries "
        "cost page faults at every call).",
        "",
    ]
    lines += common.table([h for h, _ in COLUMNS], [[cell(r) for _, cell in COLUMNS] for r in report["rows"]],
                          align=["---"] + ["---:"] * (len(COLUMNS) - 1))
    lines += [
        "",
        "- case: kind-similarity-b(batch or queries)-l(states per item / bag length)-n(stored patterns)-d(dim)"
        "-h(heads).",
        "- MiB: peak memory above the level before the call (CPU: resident set, VmHWM; GPU: allocator peak).",
        "- dense: plain PyTorch in the inputs' dtype holding the B x N association matrix, which autograd keeps "
        "for the backward (what hflayers computes): for update, `softmax(beta * sim) @ X` as the CPU table's "
        "plain peer writes it; for the modules, their own dense path (matmul, softmax, matmul), entered with an "
        "all-False padding mask (one B x N add more); vs dense = dense time / fused time.",
        "- sdpa: `torch.nn.functional.scaled_dot_product_attention(q, x, x, scale=beta)` for update-dot, "
        "`torch.nn.MultiheadAttention` with the layer's weights (SDPA inside) for attention (`Hopfield` without "
        "pattern norms: MHA's computation); n/a elsewhere; gradients of the same loss; vs sdpa = sdpa time / fused "
        "time.",
        "- err (out / grads), before timing: each call's output and its gradients (of the mean squared output; "
        "attention: the input's) against the reference (`backend=\"torch\"`) in float64 from the same rounded "
        "inputs and weights, relative (Frobenius; each gradient tensor against its own norm or a thousandth of the "
        "largest, the largest of these); over: past " + ", ".join(f"{k} {v:g}" for k, v in common.CHECK_TOL.items())
        + f"; a fused error past it and past {DENSE_SLACK:g}x the dense peer's own is WRONG (its times say "
        "nothing), one within it is marked \"as dense\": in bfloat16 the modules' own PyTorch arithmetic (layer "
        "norms, projections) leaves some small parameter gradients that far off float64, the dense path's alike.",
    ]
    wrong = wrong_rows(report)
    if wrong:
        lines += ["", f"**WRONG OUTPUT**: the fused output or gradients failed the check in {len(wrong)} row(s): "
                  + "; ".join(wrong) + "."]
    return "\n".join(lines) + "\n"


def run(out: str = DEFAULT_OUT, quick: bool = False, repeats: int = 3, device: Optional[str] = None,
        name: str = "nn", dtype: Optional[str] = None) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = DTYPES[dtype] if dtype else _dtype(dev)
    rows = []
    for case in cases(quick, dev):
        rows.append(run_case(case, dev, repeats, dt, 0.0 if quick else MIN_ROUNDS_S))
        print(f"{case.name}: fwd {rows[-1]['fwd_speedup']:.2f}x, fwd+bwd {rows[-1]['fwd+bwd_speedup']:.2f}x dense"
              + ("" if rows[-1]["check_ok"] else "  WRONG OUTPUT"), file=sys.stderr)
    x = torch.zeros(2, 8, device=dev, dtype=dt)
    report = dict(
        device=(torch.cuda.get_device_name(dev) if dev.type == "cuda" else common.cpu_model()),
        dtype=str(dt).replace("torch.", ""),
        fused_backend=backends.resolve(None, check_inputs(x, x, 1.0, "dot")).name,
        repeats=repeats, min_rounds_s=0.0 if quick else MIN_ROUNDS_S, quick=quick, load=common.load_average(),
        command="python -m hen_kernels.bench nn" + (" --quick" if quick else "") + (f" --name {name}" if name != "nn" else "")
        + (f" --dtype {dtype}" if dtype else "") + (f" --repeats {repeats}" if repeats != 3 else ""),
        machine=common.host(), rows=rows,
    )
    md = markdown(report)
    common.write_report(out, name, report, md)
    print(md)
    return report


def main(argv: Optional[List[str]] = None) -> int:
    ap = common.parser("nn", __doc__, "nn.json and nn.md", "tiny shapes (a smoke test)", 3,
                       "timed calls per measurement after a warm-up")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--name", metavar="STEM", default="nn",
                    help="write STEM.json and STEM.md (one table per kind of machine: nn_zen4, say)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="inputs' and parameters' dtype (default: float32 on the CPU, bfloat16 on a GPU)")
    args = ap.parse_args(argv)
    wrong = wrong_rows(run(args.out, args.quick, args.repeats, args.device, args.name, args.dtype))
    if wrong:
        print(f"bench nn: the fused output or gradients failed the check in {len(wrong)} row(s): " + "; ".join(wrong),
              file=sys.stderr)
    return 1 if wrong else 0
