"""`mhc demo`: a small character-level GPT trained three ways (plain residual, unconstrained hyper-connections,
mHC) on public-domain text shipped with the package, with the stability diagnostics of the mHC paper.

    from mhc.demo import default_config, run_demo
    results = run_demo(default_config("cpu"))

See docs/DEMO.md."""
from .corpus import Corpus, load_corpus
from .model import GPT, HyperConnection, ModelConfig, amax_gain
from .train import DemoConfig, default_config, run_demo

__all__ = ["Corpus", "load_corpus", "GPT", "HyperConnection", "ModelConfig", "amax_gain", "DemoConfig",
           "default_config", "run_demo"]
