"""Training-step cost of mHC in a whole GPT: the same model with plain residuals and with mHC (n streams).

SPEC section 4 target: a GPT training step with mHC (n = 4) no more than 10% slower than the same model with
plain residuals at C = 4096; the memory overhead reported. The model is the demo's GPT (mhc.demo.model): token +
position embeddings, `depth` blocks of attention and MLP, every residual site an `mhc.MHC` (fused post + next pre
between sites), stream expand and the learned head.

    python bench/python/bench_gpt_step.py                          # C 4096, 4 layers, 4096 tokens, bf16
    python bench/python/bench_gpt_step.py --width 2048 --depth 8 --batch 8
    python bench/python/bench_gpt_step.py --compile                # torch.compile both models

Step = forward + loss + backward + AdamW step. Timed with CUDA events around each step after warm-up; the
median is reported. Peak memory = torch.cuda.max_memory_allocated over the timed steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from mhc.demo.model import GPT, ModelConfig


def measure(kind: str, args) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, seq_len=args.seq, width=args.width, depth=args.depth, heads=args.heads,
                      residual=kind, n_streams=args.n)
    model = GPT(cfg).cuda()
    if args.precision == "bf16":
        model = model.to(torch.bfloat16)  # bf16 streams; mHC casts its parameters to fp32 itself
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    forward = torch.compile(model) if args.compile else model
    tokens = torch.randint(0, 256, (args.batch, args.seq + 1), device="cuda")
    idx, targets = tokens[:, :-1], tokens[:, 1:]

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.precision == "autocast"):
            _, loss, _ = forward(idx, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    result = {"kind": kind, "step_ms": statistics.median(times), "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
              "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    del model, optimizer, forward
    torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--precision", choices=["bf16", "autocast"], default="bf16",
                    help="bf16: model (and residual streams) in bf16; autocast: fp32 model, bf16 autocast")
    ap.add_argument("--compile", action="store_true", help="torch.compile each model")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpt_step: needs a CUDA device", file=sys.stderr)
        return 1
    rows = [measure(kind, args) for kind in ("residual", "mhc")]
    base = rows[0]
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; width {args.width}, depth {args.depth}, "
          f"{args.batch} x {args.seq} tokens, n = {args.n}, {args.precision}, compile={args.compile}")
    print("| model | params (M) | step ms | vs residual | peak GiB | vs residual |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['params_m']:.1f} | {r['step_ms']:.2f} | {r['step_ms'] / base['step_ms']:.3f}x | "
              f"{r['peak_gib']:.2f} | {r['peak_gib'] / base['peak_gib']:.3f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
