"""The `mhc` command: `mhc demo`, `mhc info`, `mhc bench`, `mhc tune`."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

RESIDUAL_KINDS = ("residual", "hc", "mhc")
DEMO_PRESETS = ("gpt2-small",)  # mhc.demo.train.PRESETS (not imported here: `mhc --help` stays free of torch)


# ---- demo ---------------------------------------------------------------------------------------------------------
def _add_demo_arguments(p: argparse.ArgumentParser):
    p.add_argument("--device", default="auto", help="auto (CUDA when torch sees a GPU, else CPU), cpu, cuda, cuda:1")
    p.add_argument("--preset", choices=DEMO_PRESETS,
                   help="a named size instead of the device's defaults: gpt2-small (width 768, depth 12, 12 heads, "
                        "1200 steps of 32 x 256 characters; for a GPU); the other flags still override it")
    p.add_argument("--steps", type=int, help="training steps per model (default: 600 on CPU, 2000 on CUDA)")
    p.add_argument("--width", type=int, help="model width C (default: 128 on CPU, 384 on CUDA)")
    p.add_argument("--depth", type=int, help="transformer blocks, each with an attention and an MLP site "
                                              "(default: 4 on CPU, 8 on CUDA)")
    p.add_argument("--heads", type=int, help="attention heads (default: 4 on CPU, 6 on CUDA)")
    p.add_argument("--n", type=int, help="residual streams of HC and mHC (default: 4)")
    p.add_argument("--batch-size", type=int, help="sequences per step (default: 16 on CPU, 32 on CUDA)")
    p.add_argument("--seq-len", type=int, help="characters per sequence (default: 64 on CPU, 128 on CUDA)")
    p.add_argument("--lr", type=float, help="peak learning rate of AdamW (default: 3e-3 on CPU, 1e-3 on CUDA)")
    p.add_argument("--dropout", type=float, help="dropout on attention and sub-layer outputs "
                                                 "(default: 0 on CPU, 0.2 on CUDA)")
    p.add_argument("--eval-interval", type=int, help="steps between validation passes (default: 100 on CPU, "
                                                     "200 on CUDA)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="float32, or bfloat16 autocast (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--variants", default=",".join(RESIDUAL_KINDS),
                   help="comma-separated subset of residual,hc,mhc (default: all three)")
    p.add_argument("--seed", type=int, help="random seed (default: 1234)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--corpus", help="a UTF-8 text file to train on instead of the shipped Shakespeare")
    p.add_argument("--recompute", action="store_true",
                   help="the mHC variant recomputes its intermediates in the backward (mhc.recompute)")
    p.add_argument("--recompute-block", type=int,
                   help="sites per recomputation block (default: the paper's sqrt(n L / (n + 2)))")
    p.add_argument("--out", default="mhc_demo_out", help="output folder for demo.png and demo.json")


def _run_demo(args) -> int:
    try:
        cfg = _demo_config(args)
    except (ValueError, RuntimeError, OSError) as error:  # a user's mistake: its message, not a traceback
        print(f"mhc demo: error: {error}", file=sys.stderr)
        return 2
    from .demo.train import run_demo

    run_demo(cfg)
    return 0


def _demo_config(args):
    """The demo's configuration from the flags, checked (device, values, corpus, output folder) before it runs."""
    from pathlib import Path

    from .demo.train import default_config, resolve_device

    device = resolve_device(args.device)
    cfg = default_config(device, args.preset)
    overrides = {"steps": args.steps, "width": args.width, "depth": args.depth, "heads": args.heads,
                 "n_streams": args.n, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
                 "dropout": args.dropout, "eval_interval": args.eval_interval, "dtype": args.dtype,
                 "seed": args.seed, "threads": args.threads, "corpus": args.corpus, "out": args.out,
                 "recompute_block": args.recompute_block}
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, value)
    if args.heads is None and cfg.width % cfg.heads != 0:  # a --width the default head count does not divide
        cfg.heads = max(h for h in range(1, cfg.heads + 1) if cfg.width % h == 0)
    if args.steps is not None and args.eval_interval is None:
        cfg.eval_interval = max(min(cfg.eval_interval, cfg.steps // 4), 1)
        cfg.warmup_steps = min(cfg.warmup_steps, max(cfg.steps // 10, 1))
    cfg.recompute = args.recompute or args.recompute_block is not None
    cfg.variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    cfg.validate()
    if cfg.corpus is not None and not Path(cfg.corpus).is_file():
        raise ValueError(f"corpus: expected a text file, got {cfg.corpus!r} (no such file)")
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    return cfg


# ---- info ---------------------------------------------------------------------------------------------------------
def _probe_backend(C, backend: str, device: str) -> str:
    """Runs one tiny op (Sinkhorn of a 2x2 matrix) on a backend: 'ok' or why not."""
    import torch

    try:
        logits = torch.tensor([[[0.3, -0.2], [0.1, 0.5]]], device=device)
        comb = torch.full_like(logits, float("nan"))
        C.sinkhorn_forward(logits=logits, comb=comb, config=C.Config(n=2), backend=backend,
                           stream=torch.cuda.current_stream().cuda_stream if device == "cuda" else 0)
        if device == "cuda":
            torch.cuda.synchronize()
        sums = comb.sum(-2)
        if not torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
            return f"WRONG (column sums {sums.tolist()})"
        return "ok"
    except Exception as e:  # a backend not built or not implemented says so in its message
        return f"unavailable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


def _tuning_file(cuda_ready: bool):
    """(the info line, a warning or None) for the tuning file a new process would load."""
    import torch

    from . import _C, tuning

    path = tuning.default_path()
    if not path.is_file():
        return f"none (looked for {path}; set MHC_TUNING_FILE or run `mhc tune`)", None
    problem = tuning.file_problem(path)
    status = _C.reload_tuning() if cuda_ready else None  # what the CUDA backend itself makes of the file
    if status is not None and not status["error"] and problem is not None:
        # The CUDA backend loaded it (it clamps what it cannot use); the stricter check found values outside the
        # sets the kernels are known to take.
        return (f"{path}: loaded ({status['entries']} entries), with values outside the known sets",
                f"mhc info: WARNING: the tuning file {path} is in use, but: {problem}")
    if problem is None and status is not None:
        problem = status["error"] or None
    if problem is not None:
        return (f"{path}: MALFORMED, ignored (kernels use their built-in choices)",
                f"mhc info: WARNING: the tuning file {path} is malformed and ignored: {problem}")
    table = tuning.load(path)
    made_on = table.get("device") or ""
    line = f"{path} ({len(table['entries'])} entries, measured on {made_on or 'any GPU'})"
    if cuda_ready:
        here = torch.cuda.get_device_name()
        if made_on and made_on != here:
            line += f"; this GPU is {here}: not applied"
        else:
            line += f"; {status['entries']} apply to this GPU"
    return line, None


def _run_info(args) -> int:
    import platform

    import torch

    from . import __file__ as package_file

    lines = [f"mhc package     {package_file.rsplit('/', 1)[0]}",
             f"python          {platform.python_version()} ({sys.executable})",
             f"torch           {torch.__version__} (CUDA {torch.version.cuda or 'none'})"]
    try:
        from . import _C
    except ImportError as e:
        lines.append(f"extension       NOT LOADED: {e}")
        print("\n".join(lines))
        return 1
    lines.append(f"mhc version     {_C.version()}")
    built_cuda = bool(_C.built_with_cuda())
    lines.append(f"CUDA kernels    {'built' if built_cuda else 'not built (CPU-only build)'}")
    cuda_count = _C.cuda_device_count() if built_cuda else 0
    lines.append(f"CUDA devices    {cuda_count} seen by mhc, {torch.cuda.device_count()} by torch")
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        lines.append(f"  cuda:{i}        {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}")
    ops = sorted(name for name in dir(_C) if name.endswith(("_forward", "_backward")))
    lines.append(f"ops             {len(ops)}: {', '.join(ops)}")
    lines.append(f"backend cpu reference  {_probe_backend(_C, 'reference', 'cpu')}")
    lines.append(f"backend cpu fast       {_probe_backend(_C, 'fast', 'cpu')}")
    if built_cuda and torch.cuda.is_available():
        lines.append(f"backend cuda           {_probe_backend(_C, 'cuda', 'cuda')}")
    else:
        lines.append("backend cuda           unavailable (" +
                     ("no CUDA device" if built_cuda else "built without CUDA") + ")")
    lines.append(f"CPU threads     {torch.get_num_threads()} (torch)")
    tuning_line, tuning_warning = _tuning_file(built_cuda and torch.cuda.is_available() and cuda_count > 0)
    lines.append(f"tuning file     {tuning_line}")
    print("\n".join(lines))
    if tuning_warning:
        print(tuning_warning, file=sys.stderr)
    return 0


# ---- bench / tune: written in mhc.tools; dispatched here ------------------------------------------------------
def _dispatch_tool(module_name: str, argv: list[str]) -> int:
    if importlib.util.find_spec("mhc.tools") is None or importlib.util.find_spec(module_name) is None:
        print(f"mhc: '{module_name.rsplit('.', 1)[-1]}' is not available in this installation "
              f"({module_name} is missing).", file=sys.stderr)
        return 2
    module = importlib.import_module(module_name)
    result = module.main(argv)
    return int(result or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="mhc", description="mHC: manifold-constrained hyper-connections.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="train a small GPT with residual, HC and mHC connections; plot stability",
                          description="Trains the same character-level GPT three ways (plain residual, "
                                      "unconstrained hyper-connections, mHC) on Shakespeare shipped with the "
                                      "package, then writes OUT/demo.png and OUT/demo.json. See docs/DEMO.md.")
    _add_demo_arguments(demo)
    sub.add_parser("info", help="build, devices, backends and tuning file")
    sub.add_parser("bench", help="benchmark the fused ops against PyTorch references (mhc.tools.bench)",
                   add_help=False)
    sub.add_parser("tune", help="tune kernel choices and write the tuning file (mhc.tools.tune)", add_help=False)

    # bench and tune own their arguments: pass everything after the command through untouched.
    if argv and argv[0] in ("bench", "tune"):
        return _dispatch_tool(f"mhc.tools.{argv[0]}", argv[1:])
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _run_demo(args)
    if args.command == "info":
        return _run_info(args)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
