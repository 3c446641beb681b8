"""The demo (mhc.demo): corpus, the unconstrained HC site, the Amax gain diagnostic, and a tiny end-to-end run."""
import json
import math

import pytest
import torch

import mhc
from mhc.demo import GPT, HyperConnection, ModelConfig, amax_gain, load_corpus
from mhc.demo.corpus import DEFAULT_CORPUS
from mhc.demo.train import DemoConfig, run_demo


# ---- corpus ----------------------------------------------------------------------------------------------------------
def test_shipped_corpus_loads_and_splits():
    corpus = load_corpus()
    text = DEFAULT_CORPUS.read_text(encoding="utf-8")
    assert "HAMLET" in text[:100] and "MACBETH" in text
    assert corpus.vocab_size == len(set(text))
    assert len(corpus.train) + len(corpus.val) == len(text)
    assert len(corpus.val) == int(len(text) * 0.1)
    assert corpus.decode(corpus.train[:6]) == text[:6]
    assert corpus.decode(corpus.val[-20:]) == text[-20:]


def test_batch_targets_are_inputs_shifted_by_one():
    corpus = load_corpus()
    x, y = corpus.batch("train", 5, 17, torch.Generator().manual_seed(3))
    assert x.shape == y.shape == (5, 17)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert 0 <= int(x.min()) and int(x.max()) < corpus.vocab_size


def test_corpus_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="val_fraction"):
        load_corpus(val_fraction=1.5)
    with pytest.raises(FileNotFoundError, match="corpus"):
        load_corpus(tmp_path / "missing.txt")
    corpus = load_corpus()
    with pytest.raises(ValueError, match="seq_len"):
        corpus.batch("val", 2, len(corpus.val), torch.Generator())
    with pytest.raises(ValueError, match="split"):
        corpus.batch("test", 2, 8, torch.Generator())


# ---- the unconstrained HC site ------------------------------------------------------------------------------
def _randomised_hc(n, C, seed):
    torch.manual_seed(seed)
    site = HyperConnection(n, C, site_index=1).double()
    with torch.no_grad():  # move every parameter away from its initial value so that each term matters
        for p in site.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return site


@pytest.mark.parametrize("n,C", [(4, 16), (3, 7), (1, 5)])
def test_hc_site_matches_per_token_formula(n, C):
    site = _randomised_hc(n, C, seed=n * 100 + C)
    x = torch.randn(2, 3, n, C, dtype=torch.float64)
    y = torch.randn(2, 3, C, dtype=torch.float64)
    layer_input, state = site.pre(x)
    x_next = site.post(x, y, state)
    b_pre, b_post, b_res, alpha, theta = site.b_pre, site.b_post, site.b_res, site.alpha, site.theta
    for b in range(2):
        for t in range(3):
            xt = x[b, t]
            xn = xt / torch.sqrt((xt**2).mean(-1, keepdim=True) + 1e-6)  # RMSNorm per stream
            h_pre = b_pre + alpha[0] * torch.tanh(xn @ theta[:, 0])
            h_post = b_post + alpha[1] * torch.tanh(xn @ theta[:, 1])
            h_res = b_res + alpha[2] * torch.tanh(xn @ theta[:, 2:]).t()  # [o, i]: theta_res[o] . x~[i]
            torch.testing.assert_close(layer_input[b, t], h_pre @ xt)
            torch.testing.assert_close(state.comb[b, t], h_res.t())
            torch.testing.assert_close(x_next[b, t], h_post[:, None] * y[b, t] + h_res @ xt)


def test_hc_model_starts_as_the_residual_model():
    """HC paper initialisation: one-hot H_pre, H_post = 1, H_res = I, theta = 0 -> n identical streams, each the
    residual model's hidden state, so the logits are the residual model's."""
    idx = torch.randint(0, 30, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = {}
    for kind in ("residual", "hc"):
        torch.manual_seed(11)
        model = GPT(ModelConfig(vocab_size=30, seq_len=16, width=32, depth=2, heads=2, residual=kind)).double()
        logits[kind] = model(idx)[0]
    torch.testing.assert_close(logits["hc"], logits["residual"], rtol=1e-6, atol=1e-6)


def test_mhc_model_starts_near_the_residual_model():
    """The library's documented initialisation starts mHC within about 1% of a plain residual network."""
    idx = torch.randint(0, 30, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = {}
    for kind in ("residual", "mhc"):
        torch.manual_seed(11)
        model = GPT(ModelConfig(vocab_size=30, seq_len=16, width=32, depth=2, heads=2, residual=kind))
        logits[kind] = model(idx)[0]
    scale = logits["residual"].abs().max()
    assert (logits["mhc"] - logits["residual"]).abs().max() < 0.05 * scale
    assert not torch.equal(logits["mhc"], logits["residual"])  # it is a different model, only close


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=10, seq_len=8, width=16, depth=1, heads=2, residual="hc", dropout=0.5))
    idx = torch.randint(0, 10, (2, 8))
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])


def test_default_configs_are_valid():
    from mhc.demo.train import default_config

    cpu, gpu = default_config("cpu"), default_config("cuda")
    cpu.validate()
    gpu.validate()
    assert (cpu.dtype, gpu.dtype) == ("float32", "bfloat16")
    assert gpu.width * gpu.depth > cpu.width * cpu.depth  # the GPU run is the larger one
    assert gpu.device == "cuda"


def test_gpt_rejects_bad_arguments():
    with pytest.raises(ValueError, match="residual"):
        GPT(ModelConfig(vocab_size=10, seq_len=8, width=16, depth=1, heads=2, residual="dense"))
    with pytest.raises(ValueError, match="heads"):
        GPT(ModelConfig(vocab_size=10, seq_len=8, width=18, depth=1, heads=4, residual="residual"))
    model = GPT(ModelConfig(vocab_size=10, seq_len=8, width=16, depth=1, heads=2, residual="residual"))
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


# ---- Amax gain -------------------------------------------------------------------------------------------
def test_amax_gain_of_hand_computed_products():
    # H = [[1, 2], [0, 0]]: row sums 3, 0; column sums 1, 2. comb = H^T.
    h = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    g = amax_gain([h.t().expand(3, 2, 2)])
    assert g["forward_max"].item() == pytest.approx(3.0) and g["backward_max"].item() == pytest.approx(2.0)
    assert g["single_max"].item() == pytest.approx(3.0)
    # composite of three sites: 2I, then H, then -I  ->  P = -2H: rows 6, 0; columns 2, 4
    combs = [(2 * torch.eye(2)).expand(3, 2, 2), h.t().expand(3, 2, 2), (-torch.eye(2)).expand(3, 2, 2)]
    g = amax_gain(combs)
    assert g["forward_max"].item() == pytest.approx(6.0) and g["backward_max"].item() == pytest.approx(4.0)
    # order matters: P = H_L ... H_1 (site 0 applied first)
    a = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [3.0, 1.0]])
    g = amax_gain([a.t()[None], b.t()[None]])  # P = b @ a = [[1, 1], [3, 4]]
    assert g["forward_max"].item() == pytest.approx(7.0) and g["backward_max"].item() == pytest.approx(5.0)


def test_amax_gain_worst_token_and_mean():
    combs = [torch.stack([torch.eye(2), 3 * torch.eye(2)])]  # token 0 gain 1, token 1 gain 3
    g = amax_gain(combs)
    assert g["forward_max"].item() == pytest.approx(3.0)
    assert g["forward_mean"].item() == pytest.approx(2.0)


def test_amax_gain_is_one_for_doubly_stochastic_products():
    # converged Sinkhorn (fp64, many iterations): doubly stochastic to ~1e-6
    logits = torch.randn(8, 6, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    combs = [mhc.reference.sinkhorn(logits[k], iters=300) for k in range(8)]
    g = amax_gain(combs)
    assert g["forward_max"].item() == pytest.approx(1.0, abs=1e-4)
    assert g["backward_max"].item() == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="combs"):
        amax_gain([])


# ---- end to end -----------------------------------------------------------------------------------------------------
def _finite_numbers(obj, path="json"):
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return
    if isinstance(obj, (int, float)):
        assert math.isfinite(obj), f"{path} = {obj}"
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _finite_numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _finite_numbers(v, f"{path}[{i}]")


def test_tiny_demo_end_to_end(tmp_path):
    cfg = DemoConfig(steps=40, batch_size=8, seq_len=32, width=32, depth=2, heads=2, warmup_steps=5,
                     eval_interval=20, eval_batches=2, log_interval=10, out=str(tmp_path), threads=1)
    results = run_demo(cfg, quiet=True)

    png, js = tmp_path / "demo.png", tmp_path / "demo.json"
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 400 and image.shape[1] > 600
    assert image[..., :3].std() > 0.05  # not a blank canvas

    data = json.loads(js.read_text())
    _finite_numbers(data)
    assert data["config"]["steps"] == 40 and data["config"]["width"] == 32
    assert set(data["runs"]) == {"residual", "hc", "mhc"}
    for kind, run in data["runs"].items():
        h = run["history"]
        assert run["diverged_at_step"] is None
        assert h["step"] == list(range(40))
        assert len(h["train_loss"]) == len(h["grad_norm"]) == 40
        assert sum(h["train_loss"][-5:]) / 5 < sum(h["train_loss"][:5]) / 5 - 0.3, kind
        assert [e["step"] for e in run["evals"]] == [19, 39]
        assert run["evals"][-1]["val_loss"] < run["evals"][0]["val_loss"], kind
        assert all(g > 0 for g in h["grad_norm"])
        if kind == "residual":
            assert h["amax_forward_max"] == []
        else:
            assert len(h["amax_forward_max"]) == 40
    # mHC's composite H_res is doubly stochastic: its gain stays at 1 (Sinkhorn's last step normalises columns
    # of comb, i.e. rows of H_res, so the forward gain is 1 to rounding; the backward gain to Sinkhorn's tolerance).
    mhc_h = data["runs"]["mhc"]["history"]
    assert max(abs(v - 1) for v in mhc_h["amax_forward_max"]) < 1e-3
    assert max(mhc_h["amax_backward_max"]) < 1.5
    assert data["summary"]["mhc"]["final_val_loss"] == data["runs"]["mhc"]["evals"][-1]["val_loss"]
    assert "mHC" in data["summary_text"] and str(png) in data["summary_text"]
    assert results["summary"].keys() == data["summary"].keys()


def test_demo_config_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="variants"):
        run_demo(DemoConfig(variants=("residual", "dense"), out=str(tmp_path)), quiet=True)
    with pytest.raises(ValueError, match="steps"):
        run_demo(DemoConfig(steps=0, out=str(tmp_path)), quiet=True)
    with pytest.raises(ValueError, match="dtype"):
        run_demo(DemoConfig(dtype="float16", out=str(tmp_path)), quiet=True)
    with pytest.raises(ValueError, match="dropout"):
        run_demo(DemoConfig(dropout=1.0, out=str(tmp_path)), quiet=True)


def test_a_diverging_run_stops_and_is_reported(tmp_path, monkeypatch):
    """A non-finite loss ends that variant's run; the JSON stays valid (null for NaN) and the summary says so."""
    import mhc.demo.train as train

    class DivergesAtStep5(train.GPT):
        calls = 0

        def forward(self, idx, targets=None):
            logits, loss, combs = super().forward(idx, targets)
            if self.training:
                DivergesAtStep5.calls += 1
                if DivergesAtStep5.calls > 5:
                    loss = loss * float("nan")
            return logits, loss, combs

    monkeypatch.setattr(train, "GPT", DivergesAtStep5)
    cfg = DemoConfig(steps=30, batch_size=4, seq_len=16, width=16, depth=1, heads=2, warmup_steps=2,
                     eval_interval=10, eval_batches=1, log_interval=2, variants=("hc",), out=str(tmp_path), threads=1)
    results = run_demo(cfg, quiet=True)
    run = results["runs"]["hc"]
    assert run["diverged_at_step"] == 5
    assert run["history"]["step"][-1] < 10  # stopped at the next flush, not after 30 steps
    data = json.loads((tmp_path / "demo.json").read_text())
    assert data["runs"]["hc"]["history"]["train_loss"][5] is None
    assert "diverged at step 5" in data["summary_text"]
    assert (tmp_path / "demo.png").stat().st_size > 10_000


def test_bfloat16_autocast_run(tmp_path):
    """The CUDA default's dtype path (bf16 autocast; fp32 streams and coefficients), exercised on the CPU."""
    cfg = DemoConfig(steps=12, batch_size=4, seq_len=16, width=16, depth=1, heads=2, warmup_steps=2, eval_interval=6,
                     eval_batches=1, log_interval=3, dtype="bfloat16", variants=("hc", "mhc"), out=str(tmp_path),
                     threads=1)
    data = json.loads(json.dumps(run_demo(cfg, quiet=True)["runs"], default=str))
    for kind in ("hc", "mhc"):
        h = data[kind]["history"]
        assert data[kind]["diverged_at_step"] is None
        assert all(math.isfinite(v) for v in h["train_loss"] + h["grad_norm"] + h["amax_forward_max"])
    assert max(abs(v - 1) for v in data["mhc"]["history"]["amax_forward_max"]) < 1e-3


# ---- recomputation and presets ---------------------------------------------------------------------------------
def test_mhc_gpt_with_recompute_has_the_same_gradients():
    idx = torch.randint(0, 30, (2, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for recompute, block in ((False, None), (True, None), (True, 3)):
        torch.manual_seed(11)
        model = GPT(ModelConfig(vocab_size=30, seq_len=16, width=32, depth=3, heads=2, residual="mhc",
                                recompute=recompute, recompute_block=block))
        logits, loss, combs = model(idx, idx)
        loss.backward()
        results.append((loss.detach(), len(combs), [p.grad for p in model.parameters()]))
    for loss, sites, grads in results[1:]:
        assert torch.equal(loss, results[0][0]) and sites == results[0][1] == 6
        assert all(torch.equal(a, b) for a, b in zip(grads, results[0][2]))


def test_recompute_is_an_mhc_option():
    with pytest.raises(ValueError, match="recompute: only the mhc residual"):
        GPT(ModelConfig(vocab_size=10, seq_len=8, width=16, depth=1, heads=2, residual="hc", recompute=True))
    with pytest.raises(ValueError, match="recompute_block"):
        GPT(ModelConfig(vocab_size=10, seq_len=8, width=16, depth=1, heads=2, recompute=True, recompute_block=3))
    with pytest.raises(ValueError, match="recompute_block"):
        DemoConfig(depth=2, recompute_block=5).validate()


def test_gpt2_small_preset():
    from mhc import cli
    from mhc.demo.train import PRESETS, default_config

    assert tuple(PRESETS) == cli.DEMO_PRESETS
    cfg = default_config("cuda", "gpt2-small")
    cfg.validate()
    assert (cfg.width, cfg.depth, cfg.heads, cfg.preset, cfg.dtype) == (768, 12, 12, "gpt2-small", "bfloat16")
    model = GPT(ModelConfig(vocab_size=65, seq_len=cfg.seq_len, width=cfg.width, depth=cfg.depth, heads=cfg.heads,
                            residual="residual"))
    body = sum(p.numel() for name, p in model.named_parameters() if "embedding" not in name)
    assert 80e6 < body < 90e6  # GPT-2 small without its embeddings: 85M
    assert default_config("cpu") == DemoConfig(device="cpu")  # the CPU default is unchanged
    with pytest.raises(ValueError, match="preset"):
        default_config("cuda", "gpt3")


def test_demo_recompute_flags_reach_the_mhc_run(tmp_path):
    from mhc import cli

    out = tmp_path / "recompute"
    assert cli.main(["demo", "--device", "cpu", "--steps", "4", "--width", "16", "--depth", "2", "--batch-size", "2",
                     "--seq-len", "8", "--variants", "residual,mhc", "--recompute-block", "2", "--threads", "1",
                     "--out", str(out)]) == 0
    data = json.loads((out / "demo.json").read_text())
    assert data["config"]["recompute"] is True and data["config"]["recompute_block"] == 2
    assert data["runs"]["mhc"]["model"]["recompute"] is True
    assert data["runs"]["residual"]["model"]["recompute"] is False
    assert data["summary"]["mhc"]["peak_memory_bytes"] is None  # CPU: no allocator statistics
    assert "with recomputation" in data["summary_text"]
