"""python -m hen_kernels.check [--quick] [--backend NAME] [--device cpu|cuda] [--dtype NAME] [--json PATH]"""
import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
