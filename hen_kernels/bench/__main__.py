"""python -m hen_kernels.bench [cpu|bank|nn|gpu|static|crossover|shapes] [--out DIR] [options]: run one benchmark program."""
import importlib
import sys
from typing import List, Optional

from . import PROGRAMS

USAGE = f"""usage: python -m hen_kernels.bench [{'|'.join(PROGRAMS)}] [--out DIR] [options]

Runs one benchmark program (default {PROGRAMS[0]}); its options:
    python -m hen_kernels.bench PROGRAM --help
"""


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] in (["-h"], ["--help"]):
        print(USAGE + "\n" + (sys.modules[__package__].__doc__ or ""))
        return 0
    if args[:1] and not args[0].startswith("-") and args[0] not in PROGRAMS:
        print(USAGE + f"\nerror: unknown program {args[0]!r}", file=sys.stderr)
        return 2
    name = args.pop(0) if args[:1] and args[0] in PROGRAMS else PROGRAMS[0]
    # Only the chosen program is imported: gpu pulls in matplotlib and compiles, the others need not.
    return importlib.import_module(f"{__package__}.{name}").main(args)


if __name__ == "__main__":
    sys.exit(main())
