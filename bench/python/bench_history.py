#!/usr/bin/env python3
"""Multi-history skip benchmark: `python bench/python/bench_history.py --help` (the code is mhc.tools.bench_history)."""

import sys

from mhc.tools.bench_history import main

if __name__ == "__main__":
    sys.exit(main())
