"""GPT (models/gpt.py): equal to the same GPT written in PyTorch (logits, loss and every gradient, float64),
causal, KV-cached generation equal to uncached, the top-k / top-p filters and the sampler's distribution,
weight tying and GPT-2's initialization, the n-gram baselines, loss falling on a tiny batch, checkpoints
(round trip, resume == uninterrupted bitwise) and `t2i train/sample/eval gpt` in-process; the measured bar
under the `slow` marker."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import core
from models import cli, corpus, gpt, registry
from models.registry import UsageError

TINY = dict(steps=4, batch_size=4, context=16, depth=2, dim=16, heads=2, warmup=2, checkpoint_every=2,
            eval_tokens=256, max_new_tokens=8, dropout=0.0)


def tiny(**kw):
    return registry.config(gpt, "text", **dict(TINY, **kw))


def model(vocab=40, seed=0, **kw):
    core.manual_seed(seed)
    return gpt.build(tiny(vocab_size=vocab, **kw))


def tokens(shape, vocab=40, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, shape)


# --- the same GPT in PyTorch ---------------------------------------------------------------------


class TorchGPT(torch.nn.Module):
    """nanoGPT's model, written directly in PyTorch, with the parameter names of models.gpt.GPT."""

    def __init__(self, vocab, context, depth, dim, heads):
        super().__init__()
        nn = torch.nn
        self.heads = heads
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.transformer = nn.Module()
        self.transformer.blocks = nn.ModuleList()
        for _ in range(depth):
            b = nn.Module()
            b.ln_1, b.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            b.attn, b.mlp = nn.Module(), nn.Module()
            b.attn.c_attn, b.attn.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            b.mlp.c_fc, b.mlp.c_proj = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
            self.transformer.blocks.append(b)
        self.transformer.ln_f = nn.LayerNorm(dim)

    def forward(self, idx, targets):
        tf = torch.nn.functional
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T))
        D = x.shape[-1]
        for b in self.transformer.blocks:
            q, k, v = b.attn.c_attn(b.ln_1(x)).split(D, dim=2)
            q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
            y = tf.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
            x = x + b.attn.c_proj(y)
            x = x + b.mlp.c_proj(tf.gelu(b.mlp.c_fc(b.ln_2(x))))
        logits = self.transformer.ln_f(x) @ self.wte.weight.T  # tied head
        return logits, tf.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def test_equals_pytorch_logits_loss_and_gradients():
    m = model(vocab=37, context=12, depth=2, dim=16, heads=4).double()
    ref = TorchGPT(37, 12, 2, 16, 4).double()
    ref.load_state_dict({k: torch.tensor(v.numpy()) for k, v in m.state_dict().items()}, strict=True)
    x, y = tokens((3, 12), 37, seed=1), tokens((3, 12), 37, seed=2)
    logits, loss = m(x, y)
    loss.backward()
    ref_logits, ref_loss = ref(torch.tensor(x), torch.tensor(y))
    ref_loss.backward()
    np.testing.assert_allclose(logits.numpy(), ref_logits.detach().numpy(), rtol=1e-10, atol=1e-12)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    grads = dict(ref.named_parameters())
    assert sorted(grads) == sorted(n for n, _ in m.named_parameters())
    for name, p in m.named_parameters():  # wte's gradient sums the embedding's and the tied head's
        np.testing.assert_allclose(p.grad, grads[name].grad.numpy(), rtol=1e-8, atol=1e-12, err_msg=name)


# --- the model's properties ----------------------------------------------------------------------


def test_shapes_and_input_checks():
    m = model()
    logits, loss = m(tokens((3, 16)))
    assert logits.shape == (3, 16, 40) and loss is None
    _, loss = m(tokens((3, 5)), tokens((3, 5)))
    assert loss.shape == () and 0 < loss.item() < 2 * math.log(40)
    with pytest.raises(ValueError, match="exceed the context 16"):
        m(tokens((1, 17)))
    with pytest.raises(ValueError, match="targets"):
        m(tokens((2, 4)), tokens((2, 5)))
    with pytest.raises(ValueError, match="idx must be"):
        m(tokens((4,)))
    with pytest.raises(ValueError, match="multiple of heads"):
        tiny(dim=10, heads=4)


def test_causal_changing_token_j_leaves_earlier_logits_unchanged():
    m = model()
    x = tokens((2, 16))
    base = m(x)[0].numpy()
    for j in (0, 5, 15):
        y = x.copy()
        y[:, j] = (y[:, j] + 1) % 40
        out = m(y)[0].numpy()
        np.testing.assert_array_equal(out[:, :j], base[:, :j])
        assert np.abs(out[:, j:] - base[:, j:]).max() > 1e-4  # position j itself (and later) do see it


def test_weight_tying_one_parameter_and_gpt2_init():
    m = model(depth=4, dim=64, heads=4, vocab=500, context=64)
    names = [n for n, _ in m.named_parameters()]
    assert "wte.weight" in names and not any("head" in n for n in names)
    n_params = sum(p.numel() for p in m.parameters())
    assert n_params == 500 * 64 + 64 * 64 + 4 * (12 * 64 * 64 + 13 * 64) + 2 * 64
    x = tokens((1, 4), 500)
    h = m.hidden(x).numpy()
    np.testing.assert_allclose(m(x)[0].numpy(), h @ m.wte.weight.numpy().T, rtol=1e-5, atol=1e-6)
    p = dict(m.named_parameters())
    assert p["wte.weight"].numpy().std() == pytest.approx(0.02, rel=0.05)
    assert p["transformer.blocks.0.mlp.c_fc.weight"].numpy().std() == pytest.approx(0.02, rel=0.05)
    for name in ("attn.c_proj.weight", "mlp.c_proj.weight"):  # Radford et al. 2019 §2.3: 1/√N, N = 2·depth
        assert p[f"transformer.blocks.3.{name}"].numpy().std() == pytest.approx(0.02 / math.sqrt(8), rel=0.08)
    assert not p["transformer.blocks.1.attn.c_attn.bias"].numpy().any()
    assert (p["transformer.ln_f.weight"].numpy() == 1).all()


def test_dropout_only_in_training():
    m = model(dropout=0.5)
    x = tokens((2, 8))
    a, b = m(x)[0].numpy(), m(x)[0].numpy()
    assert np.abs(a - b).max() > 1e-3  # training: a new dropout mask per forward
    m.eval()
    np.testing.assert_array_equal(m(x)[0].numpy(), m(x)[0].numpy())
    np.testing.assert_allclose(m(x)[0].numpy(), model(dropout=0.0).eval()(x)[0].numpy(), rtol=1e-6, atol=1e-7)


def test_loss_falls_on_a_tiny_batch():
    m = model()
    x, y = tokens((4, 16), seed=3), tokens((4, 16), seed=4)
    opt = core.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        _, loss = m(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.9 * math.log(40) and losses[-1] < 0.5 * losses[0]  # memorizing random targets


# --- generation ----------------------------------------------------------------------------------


def test_kv_cache_logits_equal_the_full_forward():
    m = model().eval()
    x = tokens((2, 16), seed=5)
    full = m(x)[0].numpy()
    cache = m.transformer.new_cache()
    with core.no_grad():
        steps = [m(x[:, :5], cache=cache)[0].numpy()] + [m(x[:, t : t + 1], cache=cache)[0].numpy()
                                                         for t in range(5, 16)]
    np.testing.assert_allclose(np.concatenate(steps, 1), full, rtol=1e-5, atol=1e-6)
    assert cache.length == 16
    with core.no_grad(), pytest.raises(ValueError, match="16 cached"):
        m(x[:, :1], cache=cache)


@pytest.mark.parametrize("new", [8, 30])  # within the context, and sliding past it
def test_cached_generation_equals_uncached(new):
    m = model()
    x = tokens((3, 4), seed=6)
    greedy = m.generate(x, new, temperature=0)
    np.testing.assert_array_equal(greedy, m.generate(x, new, temperature=0, use_cache=False))
    assert greedy.shape == (3, 4 + new) and (greedy[:, :4] == x).all()
    a = m.generate(x, new, temperature=1.0, top_k=20, top_p=0.9, generator=core.random.Generator(3))
    b = m.generate(x, new, temperature=1.0, top_k=20, top_p=0.9, generator=core.random.Generator(3),
                   use_cache=False)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, greedy)


def test_generate_is_reproducible_and_leaves_the_global_rng_and_the_mode():
    m = model()
    assert m.training
    state = core.random.get_rng_state()
    a = m.generate(tokens((2, 3)), 10, generator=core.random.Generator(1))
    assert core.random.get_rng_state() == state
    np.testing.assert_array_equal(a, m.generate(tokens((2, 3)), 10, generator=core.random.Generator(1)))
    assert m.training  # generate runs in eval mode and puts the training mode back
    m.eval().generate(tokens((1, 2)), 1)
    assert not m.training


logit_rows = hnp.arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(1, 12)),
                        elements=st.floats(-20, 20, allow_nan=False))


@settings(max_examples=60, deadline=None)
@given(logit_rows, st.integers(1, 14))
def test_top_k_keeps_exactly_the_k_largest(logits, k):
    out = gpt.top_k_filter(logits, k)
    kept = np.isfinite(out)
    np.testing.assert_array_equal(out[kept], logits[kept])
    for row, keep in zip(logits, kept):
        kth = np.sort(row)[::-1][min(k, len(row)) - 1]
        np.testing.assert_array_equal(keep, row >= kth)  # the k largest, and any tie with the k-th
        assert keep.sum() >= min(k, len(row))


@settings(max_examples=60, deadline=None)
@given(logit_rows, st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_likeliest_set_reaching_p(logits, p):
    out = gpt.top_p_filter(logits, p)
    kept = np.isfinite(out)
    np.testing.assert_array_equal(out[kept], logits[kept])
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for pr, keep in zip(probs, kept):
        assert keep.any()
        if (~keep).any():
            assert pr[keep].min() >= pr[~keep].max()  # the likeliest tokens
        assert pr[keep].sum() >= p - 1e-12  # reaching p
        assert pr[keep].sum() - pr[keep].min() < p + 1e-12  # and no smaller such set


def test_sampler_follows_the_filtered_softmax():
    """20,000 draws: the frequencies follow softmax(logits / T) over the tokens the filters keep (χ² test)."""
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 20000
    draws = gpt.sample_next(np.tile(logits, (n, 1)), temperature=0.7, top_k=5, top_p=0.95,
                            generator=core.random.Generator(0))
    probs = np.exp(logits[:5] / 0.7)
    probs /= probs.sum()
    keep = (np.cumsum(probs) - probs) < 0.95
    probs = np.where(keep, probs, 0) / probs[keep].sum()
    counts = np.bincount(draws, minlength=6)
    assert counts[~np.append(keep, False)].sum() == 0
    expected = n * probs[keep]
    chi2 = ((counts[: len(keep)][keep] - expected) ** 2 / expected).sum()
    assert chi2 < 20.5  # 99.9% quantile of χ² with ≤ 4 degrees of freedom is 18.5
    assert (gpt.sample_next(logits[None], temperature=0) == 0).all()


# --- baselines -----------------------------------------------------------------------------------


def test_ngram_baselines_are_the_add_k_formulas():
    train = np.array([0, 1, 0, 1, 2, 0, 1])
    val = np.array([0, 1, 2, 2])
    V, k = 3, 0.5
    # bigram counts from train: c(0,1)=3, c(1,0)=1, c(1,2)=1, c(2,0)=1; c(0)=3, c(1)=2, c(2)=1
    want = -np.mean(np.log([(3 + k) / (3 + k * V), (1 + k) / (2 + k * V), (0 + k) / (1 + k * V)]))
    assert gpt.ngram_nll(train, val, V, 2, [k])[k] == pytest.approx(want, rel=1e-12)
    counts = np.array([3, 3, 1])
    want = -np.mean(np.log((counts[[1, 2, 2]] + k) / (7 + k * V)))
    assert gpt.ngram_nll(train, val, V, 1, [k])[k] == pytest.approx(want, rel=1e-12)


def test_nll_scores_every_token_once():
    m = model()
    toks = tokens(50, seed=7)
    mean, n = gpt.nll(m, toks, 16)
    assert n == 48  # three windows of 16 targets: tokens 1..48
    with core.no_grad():
        x, y = gpt.windows(toks, [0, 16, 32], 16)
        _, loss = m(x, y)
    assert mean == pytest.approx(loss.item(), rel=1e-6)
    np.testing.assert_array_equal(y.reshape(-1), toks[1:49])


# --- training, checkpoints, the CLI ----------------------------------------------------------------


def test_checkpoint_round_trip_and_resume_equals_uninterrupted(tmp_path, monkeypatch):
    whole, part = str(tmp_path / "whole.safetensors"), str(tmp_path / "part.safetensors")
    summary = gpt.train(tiny(steps=4), whole, progress=False)
    assert summary["steps"] == 4 and np.isfinite(summary["loss"]["loss"])
    calls, windows = [], gpt.windows

    def interrupted(*args):  # the run is killed during its third step, after the checkpoint of step 2
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return windows(*args)

    monkeypatch.setattr(gpt, "windows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gpt.train(tiny(steps=4), part, progress=False)
    monkeypatch.setattr(gpt, "windows", windows)
    assert gpt.train(tiny(steps=4), part, progress=False)["start"] == 2
    a, b = core.serialize.load(whole), core.serialize.load(part)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    m, c = gpt.load(whole)
    assert c == tiny(steps=4, vocab_size=corpus.tokenizer().vocab_size) and not m.training
    x = tokens((1, 8), c.vocab_size)
    np.testing.assert_array_equal(m(x)[0].numpy(), gpt.load(whole)[0](x)[0].numpy())


def test_sample_options_and_errors(tmp_path):
    path = str(tmp_path / "g.safetensors")
    gpt.train(tiny(steps=1), path, progress=False)
    m, c = gpt.load(path)
    texts = gpt.sample(m, c, 3, seed=1, prompt="The ", max_new_tokens=5, temperature=0.9, top_k=50, top_p=0.9)
    assert len(texts) == 3 and all(isinstance(t, str) and t.startswith("The ") for t in texts)
    assert texts == gpt.sample(m, c, 3, seed=1, prompt="The ", max_new_tokens=5, temperature=0.9, top_k=50,
                               top_p=0.9)
    assert len(gpt.sample(m, c, 2)) == 2  # no prompt: from <|endoftext|>
    with pytest.raises(TypeError, match="unexpected keyword"):
        gpt.sample(m, c, 1, guidance=2.0)


def test_cli_train_sample_eval_in_process(tmp_path, capsys):
    ckpt = str(tmp_path / "gpt.safetensors")
    sets = [x for k, v in TINY.items() if k not in ("steps", "batch_size") for x in ("--set", f"{k}={v}")]
    assert cli.main(["train", "gpt", "--steps", "3", "--batch-size", "4", "--quiet", "--out", ckpt, *sets]) == 0
    assert "gpt on text" in capsys.readouterr().out
    assert cli.main(["sample", "gpt", "--ckpt", ckpt, "--n", "2", "--prompt", "Return the", "--max-new-tokens", "4",
                     "--top-k", "10"]) == 0
    out = capsys.readouterr().out
    assert out.count("Return the") == 2
    assert cli.main(["eval", "gpt", "--ckpt", ckpt, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    figs = {f["name"]: f for f in result["figures"]}
    ppl = figs["val perplexity"]
    assert ppl["value"] > 1 and ppl["baselines"]["unigram"] > ppl["baselines"]["bigram"] > 1
    assert figs["val bits/token"]["value"] == pytest.approx(math.log2(ppl["value"]), rel=1e-9)
    assert result["val_tokens"] == 256
    with pytest.raises(SystemExit) as e:  # --steps is not an option of gpt's sampler
        cli.main(["sample", "gpt", "--ckpt", ckpt, "--steps", "3"])
    assert e.value.code == 2 and "gpt does not take --steps" in capsys.readouterr().err


@pytest.mark.slow
def test_bar_text(tmp_path):
    """The measured bar: validation perplexity below the bigram baseline's, with the default Config."""
    cfg = registry.config(gpt, "text")
    gpt.train(cfg, str(tmp_path / "gpt.safetensors"), progress=False)
    m, c = gpt.load(str(tmp_path / "gpt.safetensors"))
    figs = {f["name"]: f for f in gpt.evaluate(m, c)["figures"]}
    assert figs["val perplexity"]["value"] < figs["val perplexity"]["baselines"]["bigram"]


def test_usage_errors():
    with pytest.raises(UsageError, match="unknown dataset 'digits' for gpt"):
        registry.config(gpt, "digits")


def test_top_p_of_one_keeps_every_token():
    """p = 1 is the filter off (as the docstring and HF say), even where the running sum reaches 1.0 in floating
    point before the least likely tokens (probabilities below ~1e-16)."""
    logits = np.array([[0.0, -40.0, -50.0]])
    np.testing.assert_array_equal(gpt.top_p_filter(logits, 1.0), logits)


def test_bad_sampling_arguments_are_errors_naming_the_argument():
    """A NaN temperature, a fractional or boolean top_k and a negative max_new_tokens are errors (they used to
    sample from NaN probabilities, fail inside np.partition, or return the prompt); the filters' arguments are
    checked at temperature 0 (greedy) too, whose result they cannot change."""
    logits = np.array([[0.5, 2.0, 1.0, 2.0]])
    with pytest.raises(ValueError, match="temperature must be >= 0, got nan"):
        gpt.sample_next(logits, temperature=float("nan"))
    for k in (2.5, True, 0, -1):
        with pytest.raises(ValueError, match=rf"k must be an integer >= 1 \(or None\), got {k!r}"):
            gpt.sample_next(logits, temperature=1.0, top_k=k)
        with pytest.raises(ValueError, match="k must be an integer"):
            gpt.sample_next(logits, temperature=0, top_k=k)
    with pytest.raises(ValueError, match="p must be in"):
        gpt.sample_next(logits, temperature=0, top_p=0.0)
    assert gpt.sample_next(logits, temperature=0, top_k=np.int64(1), top_p=0.1)[0] == 1  # the first of the tied maxima
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0, got -1"):
        model().generate(tokens((1, 2)), -1)
