#!/usr/bin/env python3
"""Training-step cost of mHC in a whole GPT against plain residuals: `mhc bench --model gpt` (mhc.tools.bench_model)
with this script's older defaults and flags: C 4096, 4 layers, 4 x 1024 tokens, n = 4, no recomputation, eager
unless --compile.

    python bench/python/bench_gpt_step.py [--compile] [--width W --depth D --heads H --batch B --seq S --n N]
"""

import sys

from mhc.tools.bench_model import main


def translated(argv):
    modes = ["--modes", "compile" if "--compile" in argv else "eager"]
    return ["--model", "gpt", "--n", "4", "--recompute", "off", *modes, *[a for a in argv if a != "--compile"]]


if __name__ == "__main__":
    sys.exit(main(translated(sys.argv[1:])))
