"""BERT (models/bert.py): equal to the same BERT written in PyTorch (hidden states, MLM and NSP logits, loss and
every gradient, float64, with padding), the masked-LM corruption's statistics (15%; 80/10/10), padding that
changes nothing at real positions, the sequence pairs (IsNext spans are contiguous, NotNext ones come from
another document), loss falling on a tiny batch, checkpoints (round trip, resume == uninterrupted bitwise),
sampling and `t2i train/sample/eval bert` in-process; the measured bar under the `slow` marker."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import core
from models import bert, cli, corpus, registry
from models.registry import UsageError

TINY = dict(steps=4, batch_size=4, context=16, depth=2, dim=16, heads=2, warmup=2, checkpoint_every=2,
            examples=256, eval_examples=64)
SP = SimpleNamespace(ordinary=35, pad=35, cls=36, sep=37, mask=38)  # a 40-id vocabulary: 35 ordinary ids


def tiny(**kw):
    return registry.config(bert, "text", **dict(TINY, **kw))


def model(vocab=40, seed=0, **kw):
    core.manual_seed(seed)
    return bert.BERT(tiny(vocab_size=vocab, **kw), SP.pad)


def batch(lengths, context=16, seed=0):
    """ids (B, context) of [CLS] A [SEP] B [SEP] rows with the given real lengths, segments, is_next."""
    rng = np.random.default_rng(seed)
    ids = np.full((len(lengths), context), SP.pad, np.int64)
    seg = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        a = n // 2 - 1
        ids[i, :n] = rng.integers(0, SP.ordinary, n)
        ids[i, [0, a, n - 1]] = SP.cls, SP.sep, SP.sep
        seg[i, a + 1 : n] = 1
    return ids, seg, rng.integers(0, 2, len(lengths))


# --- the same BERT in PyTorch --------------------------------------------------------------------


class TorchBERT(torch.nn.Module):
    """models.bert.BERT written directly in PyTorch, with its parameter names."""

    def __init__(self, vocab, context, depth, dim, heads, pad):
        super().__init__()
        nn = torch.nn
        self.heads, self.pad = heads, pad
        self.word_embeddings, self.position_embeddings = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.token_type_embeddings = nn.Embedding(2, dim)
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
        self.mlm_dense, self.mlm_ln = nn.Linear(dim, dim), nn.LayerNorm(dim)
        self.mlm_bias = nn.Parameter(torch.zeros(vocab))
        self.pooler, self.nsp = nn.Linear(dim, dim), nn.Linear(dim, 2)

    def forward(self, ids, seg, labels, is_next):
        tf = torch.nn.functional
        B, T = ids.shape
        x = self.word_embeddings(ids) + self.position_embeddings(torch.arange(T)) + self.token_type_embeddings(seg)
        keep = (ids != self.pad)[:, None, None, :]
        D = x.shape[-1]
        for b in self.transformer.blocks:
            q, k, v = b.attn.c_attn(b.ln_1(x)).split(D, dim=2)
            q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
            y = tf.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(B, T, D)
            x = x + b.attn.c_proj(y)
            x = x + b.mlp.c_proj(tf.gelu(b.mlp.c_fc(b.ln_2(x))))
        h = self.transformer.ln_f(x)
        mlm = self.mlm_ln(tf.gelu(self.mlm_dense(h))) @ self.word_embeddings.weight.T + self.mlm_bias
        nsp = self.nsp(torch.tanh(self.pooler(h[:, 0])))
        loss = tf.cross_entropy(mlm.reshape(-1, mlm.shape[-1]), labels.reshape(-1), ignore_index=-100)
        return h, mlm, nsp, loss + tf.cross_entropy(nsp, is_next)


def test_equals_pytorch_with_padding():
    m = model(vocab=40, depth=2, dim=16, heads=4).double()
    ref = TorchBERT(40, 16, 2, 16, 4, SP.pad).double()
    ref.load_state_dict({k: torch.tensor(v.numpy()) for k, v in m.state_dict().items()}, strict=True)
    ids, seg, nxt = batch([16, 9, 12])
    inputs, labels = bert.mask_tokens(ids, SP, np.random.default_rng(0))
    total, mlm, nsp = bert.loss(m, inputs, seg, labels, nxt)
    total.backward()
    h = m(inputs, seg)
    t = [torch.tensor(a) for a in (inputs, seg, labels, nxt)]
    ref_h, ref_mlm, ref_nsp, ref_loss = ref(*t)
    ref_loss.backward()
    np.testing.assert_allclose(h.numpy(), ref_h.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(m.mlm_logits(h).numpy(), ref_mlm.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(m.nsp_logits(h).numpy(), ref_nsp.detach().numpy(), rtol=1e-10, atol=1e-12)
    assert total.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    grads = dict(ref.named_parameters())
    assert sorted(grads) == sorted(n for n, _ in m.named_parameters())
    for name, p in m.named_parameters():  # word_embeddings' gradient sums the input's and the tied output's
        np.testing.assert_allclose(p.grad, grads[name].grad.numpy(), rtol=1e-8, atol=1e-12, err_msg=name)


# --- the model's properties ----------------------------------------------------------------------


def test_shapes_init_and_input_checks():
    m = model()
    ids, seg, _ = batch([16, 7])
    h = m(ids, seg)
    assert h.shape == (2, 16, 16) and m.mlm_logits(h).shape == (2, 16, 40) and m.nsp_logits(h).shape == (2, 2)
    w = m.word_embeddings.weight.numpy()
    assert abs(w.std() - 0.02) < 0.003 and np.all(m.transformer.ln_f.weight.numpy() == 1)
    assert np.all(m.mlm_ln.weight.numpy() == 1) and np.all(m.mlm_bias.numpy() == 0)
    with pytest.raises(ValueError, match="exceeds the context 16"):
        m(np.zeros((1, 17), np.int64), np.zeros((1, 17), np.int64))
    with pytest.raises(ValueError, match="one shape"):
        m(ids, seg[:, :5])
    with pytest.raises(ValueError, match="multiple of heads"):
        tiny(dim=10, heads=4)
    with pytest.raises(ValueError, match="context must be >= 5"):
        tiny(context=4)


def test_padding_changes_nothing_at_real_positions():
    m = model()
    m.eval()
    ids, seg, _ = batch([9, 16, 5], seed=3)
    h = m(ids, seg).numpy()
    for i, n in enumerate([9, 16, 5]):
        alone = m(ids[i : i + 1, :n], seg[i : i + 1, :n]).numpy()  # the same row, no padding at all
        np.testing.assert_allclose(h[i, :n], alone[0], rtol=1e-5, atol=1e-6)
    h2 = m(np.where(ids == SP.pad, SP.pad, ids), np.where(ids == SP.pad, 1, seg)).numpy()  # pads' segment ids
    real = ids != SP.pad
    np.testing.assert_array_equal(h2[real], h[real])


def test_masking_statistics():
    """§3.1: exactly max(1, round(0.15 n)) of a row's n ordinary tokens are chosen, uniformly; of the chosen,
    80% become [MASK], 10% a random ordinary token, 10% stay. Tolerances are > 6 standard deviations."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, SP.ordinary, (4000, 48))
    lengths = rng.integers(3, 49, 4000)
    lengths[:2000] = 48  # full rows, to see where the chosen positions fall
    ids[np.arange(48) >= lengths[:, None]] = SP.pad
    ids[:, 0], ids[np.arange(4000), lengths - 1] = SP.cls, SP.sep
    inputs, labels = bert.mask_tokens(ids, SP, np.random.default_rng(1))
    chosen = labels != -100
    n = (ids < SP.ordinary).sum(1)
    np.testing.assert_array_equal(chosen.sum(1), np.maximum(1, np.rint(0.15 * n)))
    assert not chosen[ids >= SP.ordinary].any()  # [CLS], [SEP], [PAD] are never chosen
    np.testing.assert_array_equal(labels[chosen], ids[chosen])
    np.testing.assert_array_equal(inputs[~chosen], ids[~chosen])
    total = chosen.sum()
    masked, kept = (inputs[chosen] == SP.mask).mean(), (inputs[chosen] == ids[chosen]).mean()
    rand = inputs[chosen & (inputs != SP.mask)]
    assert total > 20000 and abs(masked - 0.8) < 0.02
    # a random token equals the original 1/35 of the time: kept = 0.1 + 0.1/35
    assert abs(kept - (0.1 + 0.1 / SP.ordinary)) < 0.015 and rand.max() < SP.ordinary
    counts = np.bincount(inputs[chosen & (inputs != SP.mask) & (inputs != ids)], minlength=SP.ordinary)
    assert counts.min() > 0.6 * counts.mean()  # random replacements spread over every ordinary id
    per_pos = chosen[:2000, 1:47].mean(0)  # 7 of 46 in each full row; every position about equally often
    assert per_pos.mean() == pytest.approx(7 / 46) and np.abs(per_pos - 7 / 46).max() < 0.045
    inputs, labels = bert.mask_tokens(ids, SP, np.random.default_rng(1), replace=(1.0, 0.0))  # evaluate's
    assert np.all(inputs[labels != -100] == SP.mask)


def test_masking_arguments_are_checked():
    """prob > 1 asked for more tokens than a row's ordinary ones, and the k smallest keys then took [CLS] and
    [SEP] as well; replace probabilities summing past 1 silently dropped the unchanged share."""
    ids = np.array([[SP.cls, 1, 2, 3, 4, SP.sep, SP.pad, SP.pad]])
    for prob in (1.5, 0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=rf"prob must be in \(0, 1\], got {prob}"):
            bert.mask_tokens(ids, SP, np.random.default_rng(0), prob=prob)
    for replace in ((0.9, 0.2), (1.1, -0.1), (0.8,)):
        with pytest.raises(ValueError, match="replace must be two probabilities"):
            bert.mask_tokens(ids, SP, np.random.default_rng(0), replace=replace)
    inputs, labels = bert.mask_tokens(ids, SP, np.random.default_rng(0), prob=1.0)  # every ordinary token
    np.testing.assert_array_equal(labels != -100, ids < SP.ordinary)


def test_pairs_are_contiguous_or_from_another_document():
    # documents of unique ids: doc d holds ids 1000 d + k, in sentences of 3 tokens
    docs = [[list(range(1000 * d + s, 1000 * d + s + 3)) for s in range(0, 3 * (1 + d % 5), 3)] for d in range(30)]
    docs[7] = [[7000, 7001]]  # one short sentence: cut inside it
    sp = SimpleNamespace(cls=-1, sep=-2, pad=-3)
    ids, seg, nxt = bert.make_pairs(docs, 2000, 40, sp, np.random.default_rng(0), short_prob=0.0)  # no trimming
    assert ids.shape == (2000, 40) and ids.dtype == np.int32 and 0.45 < nxt.mean() < 0.55
    for row, s, is_next in zip(ids, seg, nxt):
        n = int((row != sp.pad).sum())
        assert row[0] == sp.cls and row[n - 1] == sp.sep and np.all(row[n:] == sp.pad)
        a_end = int(np.nonzero(row == sp.sep)[0][0])
        a, b = row[1:a_end], row[a_end + 1 : n - 1]
        assert len(a) >= 1 and len(b) >= 1 and (row == sp.sep).sum() == 2
        np.testing.assert_array_equal(s, (np.arange(40) > a_end) & (np.arange(40) < n))
        ab = np.concatenate([a, b])
        assert np.all(np.diff(a) == 1) and np.all(np.diff(b) == 1)  # spans of one document (no truncation here)
        if is_next:
            assert np.all(np.diff(ab) == 1)  # B continues A
        else:
            assert a[0] // 1000 != b[0] // 1000  # B is from another document
    with pytest.raises(ValueError, match="two documents"):
        bert.make_pairs([[[1, 2]]], 4, 16, sp, np.random.default_rng(0))


def test_truncation_keeps_the_budget():
    docs = [[list(range(1000 * d, 1000 * d + 80))] for d in range(5)]  # one long sentence each
    sp = SimpleNamespace(cls=-1, sep=-2, pad=-3)
    ids, seg, nxt = bert.make_pairs(docs, 300, 16, sp, np.random.default_rng(1), short_prob=0.0)
    assert np.all((ids != sp.pad).sum(1) == 16)  # a chunk longer than the budget is trimmed to fill it exactly
    assert np.all(ids[:, 1] >= 0) and np.all(ids[:, 14] >= 0)  # A and B each keep at least one token
    ids, _, _ = bert.make_pairs(docs, 300, 16, sp, np.random.default_rng(1), short_prob=1.0)
    assert (ids != sp.pad).sum(1).min() < 16  # short chunks


def test_loss_falls_on_a_tiny_batch():
    m = model()
    ids, seg, nxt = batch([16, 12, 10, 16, 9, 14, 16, 11], seed=5)
    inputs, labels = bert.mask_tokens(ids, SP, np.random.default_rng(0))
    opt = core.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        total, _, _ = bert.loss(m, inputs, seg, labels, nxt)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    assert losses[-1] < 0.3 * losses[0]


# --- training, sampling, evaluation ----------------------------------------------------------------


def test_checkpoint_round_trip_and_resume_equals_uninterrupted(tmp_path, monkeypatch):
    whole, part = str(tmp_path / "whole.safetensors"), str(tmp_path / "part.safetensors")
    bert.train(tiny(steps=4), whole, progress=False)
    calls, mask_tokens = [], bert.mask_tokens

    def interrupted(*args, **kw):  # the run is killed during its third step, after the checkpoint of step 2
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return mask_tokens(*args, **kw)

    monkeypatch.setattr(bert, "mask_tokens", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bert.train(tiny(steps=4), part, progress=False)
    monkeypatch.setattr(bert, "mask_tokens", mask_tokens)
    summary = bert.train(tiny(steps=4), part, progress=False)  # resumes at step 2: masks of steps 2 and 3
    assert summary["start"] == 2 and set(summary["loss"]) == {"loss", "mlm", "nsp"}
    a, b = core.serialize.load(whole), core.serialize.load(part)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    m, c = bert.load(whole)
    assert c == tiny(steps=4, vocab_size=corpus.tokenizer().vocab_size) and not m.training
    np.testing.assert_array_equal(m.word_embeddings.weight.numpy(), a["model.word_embeddings.weight"])


def test_sample_fills_the_masks(tmp_path):
    path = str(tmp_path / "b.safetensors")
    bert.train(tiny(steps=1), path, progress=False)
    m, c = bert.load(path)
    state = core.random.default_generator.get_state()
    out = bert.sample(m, c, 3, seed=1, prompt="a small [MASK] circle")
    assert core.random.default_generator.get_state() == state  # a private generator
    assert len(out) == 3 and all(s.startswith("a small") and s.endswith(" circle") and "[MASK]" not in s
                                 for s in out)
    assert out == bert.sample(m, c, 3, seed=1, prompt="a small [MASK] circle")
    greedy = bert.sample(m, c, 2, prompt="[MASK] large [MASK]", temperature=0)
    assert greedy[0] == greedy[1] and "[MASK]" not in greedy[0]
    with pytest.raises(UsageError, match=r"\[MASK\]"):
        bert.sample(m, c, 1)
    with pytest.raises(UsageError, match=r"\[MASK\]"):
        bert.sample(m, c, 1, prompt="no mask here")
    with pytest.raises(UsageError, match="fit the context"):
        bert.sample(m, c, 1, prompt="word " * 20 + "[MASK]")


def test_cli_train_sample_eval_in_process(tmp_path, capsys):
    ckpt = str(tmp_path / "bert.safetensors")
    sets = [x for k, v in TINY.items() if k not in ("steps", "batch_size") for x in ("--set", f"{k}={v}")]
    assert cli.main(["train", "bert", "--steps", "3", "--batch-size", "4", "--quiet", "--out", ckpt, *sets]) == 0
    capsys.readouterr()
    assert cli.main(["sample", "bert", "--ckpt", ckpt, "--n", "2", "--prompt", "a large [MASK] square"]) == 0
    assert capsys.readouterr().out.count("a large") == 2
    assert cli.main(["eval", "bert", "--ckpt", ckpt, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    figs = {f["name"]: f for f in result["figures"]}
    mlm, nsp = figs["masked-token accuracy"], figs["NSP accuracy"]
    assert 0 <= mlm["value"] <= 1 and 0 < mlm["baselines"]["most_frequent_token"] < 0.2
    assert nsp["baselines"]["chance"] == 0.5 and 0.5 <= nsp["baselines"]["majority_class"] < 0.6
    assert result["pairs"] == 64 and len(result["samples"]) == 3
    # evaluate masks BERT's 15% of the held-out tokens even though training masked 40%
    sp = bert.Specials(corpus.tokenizer())
    ids, _, _ = bert.make_pairs(corpus.sentence_ids("val"), 64, 16, sp, np.random.default_rng([0, 2]), 0.1)
    assert tiny().mask_prob == 0.4
    assert result["masked_tokens"] == np.maximum(1, np.rint(0.15 * (ids < sp.ordinary).sum(1))).sum()
    with pytest.raises(SystemExit) as e:  # a prompt without [MASK]
        cli.main(["sample", "bert", "--ckpt", ckpt, "--prompt", "a red circle"])
    assert e.value.code == 2


@pytest.mark.slow
def test_bar_text(tmp_path):
    """The measured bar: with the default Config, masked-token accuracy above the most-frequent-token
    baseline and NSP accuracy above both chance and the majority class, on held-out documents."""
    cfg = registry.config(bert, "text")
    bert.train(cfg, str(tmp_path / "bert.safetensors"), progress=False)
    m, c = bert.load(str(tmp_path / "bert.safetensors"))
    figs = {f["name"]: f for f in bert.evaluate(m, c)["figures"]}
    mlm, nsp = figs["masked-token accuracy"], figs["NSP accuracy"]
    # above each baseline by 5 standard errors of the accuracy (~13k masked tokens, 2,048 pairs)
    assert mlm["value"] > mlm["baselines"]["most_frequent_token"] + 5 * np.sqrt(0.25 / 12000)
    assert nsp["value"] > max(nsp["baselines"].values()) + 5 * np.sqrt(0.25 / 2048)
