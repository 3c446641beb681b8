"""Benchmark of the n-stream mHC ops on CUDA: the same as `mhc bench` (see mhc/tools/bench.py)."""

import sys

from mhc.tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
