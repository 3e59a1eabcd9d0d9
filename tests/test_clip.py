"""CLIP (models/clip.py): the symmetric cross-entropy equals PyTorch's on the same logits (value and gradient,
float64), the temperature is clipped at 100, embeddings are unit vectors and `score` gives their cosine
similarities, the causal text encoder reads the end-of-text token and ignores what follows it, recall@k and
zero-shot classification on a tiny trained model, the loss falls on a tiny batch, checkpoints round-trip
and resume bitwise, the CLI trains and evaluates it; the measured bar under the `slow` marker."""

import json
import math

import numpy as np
import pytest
import torch

import core
from models import cli, clip, registry
from models.registry import UsageError

TINY = dict(steps=4, batch_size=16, vision_dim=16, vision_depth=1, vision_heads=2, text_dim=16, text_depth=1,
            text_heads=2, embed_dim=8, n_train=256, eval_images=100, warmup=2, checkpoint_every=2)
CAPTIONS = ["a small red circle in the top left", "there is a large blue square to the left of a small yellow cross",
            "at the bottom there is a small green cross"]


def tiny(**kw):
    return registry.config(clip, **dict(TINY, **kw))


def images(n, seed=0):
    return clip.captioned(n, 16, "test", ()).images[:n]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("clip") / "c.safetensors")
    clip.train(tiny(), path, progress=False)
    return clip.load(path)


def test_tokenize_appends_end_of_text_and_pads():
    tok = clip.tokenizer()
    t = clip.tokenize(CAPTIONS, 24)
    assert t.shape == (3, 24) and t.dtype == np.int64
    for row, text in zip(t, CAPTIONS):
        ids = tok.encode(text)
        np.testing.assert_array_equal(row[: len(ids)], ids)
        assert row[len(ids)] == tok.special["<|endoftext|>"]
        assert (row[len(ids) + 1 :] == tok.special["[PAD]"]).all()
    with pytest.raises(ValueError, match="more than the context of 5"):
        clip.tokenize(CAPTIONS, 5)
    with pytest.raises(TypeError, match="list of strings"):
        clip.tokenize("a red circle", 24)


def test_loss_equals_pytorch_symmetric_cross_entropy_float64():
    """Fig. 3: (CE over rows + CE over columns) / 2 with targets arange(N), value and gradient."""
    logits = np.random.default_rng(0).normal(0, 3, (6, 6))
    ours = core.tensor(logits, requires_grad=True)
    loss = clip.clip_loss(ours)
    loss.backward()
    ref = torch.tensor(logits, requires_grad=True)
    labels = torch.arange(6)
    expect = (torch.nn.functional.cross_entropy(ref, labels) + torch.nn.functional.cross_entropy(ref.T, labels)) / 2
    expect.backward()
    assert loss.item() == pytest.approx(expect.item(), rel=1e-13)
    np.testing.assert_allclose(ours.grad, ref.grad.numpy(), rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match=r"square \(N, N\), got shape \(2, 3\)"):
        clip.clip_loss(core.zeros(2, 3))


def test_temperature_starts_at_one_over_0_07_and_is_clipped_at_100():
    core.manual_seed(0)
    m = clip.build(tiny())
    assert m.temperature_scale().item() == pytest.approx(1 / 0.07, rel=1e-6)
    x, text = images(4), CAPTIONS[:3] + CAPTIONS[:1]
    m.logit_scale.data[...] = math.log(1000.0)  # beyond the clip
    logits = m(core.tensor(x), text)
    assert m.temperature_scale().item() == pytest.approx(100.0, rel=1e-6)
    with core.no_grad():
        cos = (m.encode_image(x) @ m.encode_text(text).transpose(0, 1)).numpy()
    np.testing.assert_allclose(logits.numpy(), 100 * cos, rtol=1e-5, atol=1e-5)
    clip.clip_loss(logits).backward()
    assert m.logit_scale.grad == 0  # clipped: t gets no gradient
    m.zero_grad()
    m.logit_scale.data[...] = math.log(20.0)
    clip.clip_loss(m(core.tensor(x), text)).backward()
    assert m.logit_scale.grad != 0
    with pytest.raises(ValueError, match="max_logit_scale"):
        tiny(init_temperature=0.001)


def test_training_clips_t_itself_at_log_100(tmp_path, monkeypatch):
    """With the clip only in the forward, a t pushed past log(100) gets no gradient ever after (a dead
    parameter, frozen at the maximum); OpenCLIP clamps t's value after each step. A loss that rewards a
    larger scale pushes t against the clip from log(99): it must stop at log(100), not pass it."""
    loss = clip.clip_loss
    monkeypatch.setattr(clip, "clip_loss", lambda logits: loss(logits) - 10 * logits.abs().mean())
    path = str(tmp_path / "t.safetensors")
    clip.train(tiny(steps=6, lr=0.02, init_temperature=1 / 99.0), path, progress=False)
    m, _ = clip.load(path)
    t = float(m.logit_scale.numpy())
    assert math.log(99.0) < t <= float(np.float32(math.log(100.0)))


def test_embeddings_are_unit_vectors_and_score_is_their_cosine_similarity():
    core.manual_seed(1)
    m = clip.build(tiny()).eval()
    x = images(5)
    s = m.score(x, CAPTIONS)
    assert s.shape == (5, 3) and s.dtype == np.float32
    with core.no_grad():
        img = m.visual_projection(m.visual.features(core.tensor(x))).numpy()  # I_f W_i, unnormalized
        txt = m.encode_text(CAPTIONS).numpy()
        assert np.allclose(np.linalg.norm(m.encode_image(x).numpy(), axis=1), 1, atol=1e-6)
        assert np.allclose(np.linalg.norm(txt, axis=1), 1, atol=1e-6)
    cos = img @ txt.T / np.linalg.norm(img, axis=1, keepdims=True)
    np.testing.assert_allclose(s, cos, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m.encode_text(clip.tokenize(CAPTIONS, 24)).numpy(), txt)  # tokens or strings


def test_text_feature_is_read_at_end_of_text_and_nothing_after_it_matters():
    """Masked (causal) self-attention (§2.4): what follows the end-of-text token (pads, anything) cannot
    reach it; a token before it can."""
    core.manual_seed(2)
    m = clip.build(tiny()).eval()
    t = clip.tokenize(CAPTIONS, 24)
    end = (t == clip.tokenizer().special["<|endoftext|>"]).argmax(1)
    junk = t.copy()
    for i, e in enumerate(end):
        junk[i, e + 1 :] = np.random.default_rng(i).integers(0, 4000, 24 - e - 1)
    with core.no_grad():
        a, b = m.encode_text(t).numpy(), m.encode_text(junk).numpy()
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        earlier = t.copy()
        earlier[:, 0] = 7
        assert np.abs(m.encode_text(earlier).numpy() - a).max() > 1e-4
    with pytest.raises(ValueError, match=r"rows \[0\] have no end-of-text token"):
        m.encode_text(np.full((1, 4), 7))


def test_recall_at_k():
    sim = np.array([[0.9, 0.1, 0.2], [0.8, 0.5, 0.1], [0.3, 0.4, 0.2]])  # ranks of the true pair: 0, 1, 2
    assert clip.recall_at_k(sim, ks=(1, 2, 3)) == {1: 1 / 3, 2: 2 / 3, 3: 1.0}
    assert clip.recall_at_k(np.ones((4, 4)), ks=(1,)) == {1: 1.0}  # identical captions tie: found


def test_zero_shot_prompts_and_classification_run(trained):
    m, c = trained
    reds = clip.prompts("color", "red")
    assert len(reds) == 3 * 2 * 5 * 9 and all(" red " in p for p in reds)
    assert "a small red circle in the top left" in reds
    assert len(clip.prompts("shape", "cross")) == 3 * 2 * 8 * 9
    w = clip.zero_shot_weights(m, [clip.prompts("shape", s) for s in ("circle", "square")])
    assert w.shape == (2, c.embed_dim) and np.allclose(np.linalg.norm(w, axis=1), 1)
    pred = clip.zero_shot(m, images(7), w)
    assert pred.shape == (7,) and set(pred) <= {0, 1}
    # the marginal: the softmax over all prompts, summed over each class's prompts
    few = [["a small red circle in the top left"],
           ["a large blue square in the center", "a small blue cross on the left"]]
    marg = clip.zero_shot_marginal(m, images(7), few)
    s = m.score(images(7), [p for ps in few for p in ps]) * m.temperature_scale().item()
    p = np.exp(s - s.max(1, keepdims=True))
    np.testing.assert_array_equal(marg, (p[:, 1:].sum(1) > p[:, 0]).astype(int))
    with pytest.raises(ValueError, match="attribute"):
        clip.prompts("size", "small")


def test_retrieval_grid_writes_a_picture(trained, tmp_path):
    m, c = trained
    path = clip.retrieval_grid(m, c, str(tmp_path / "r.png"), texts=CAPTIONS[:2], k=3, n=100)
    assert (tmp_path / "r.png").stat().st_size > 0 and path.endswith("r.png")


def test_loss_falls_on_a_tiny_batch():
    core.manual_seed(0)
    m = clip.build(tiny(vision_dim=32, text_dim=32, embed_dim=32))
    s = clip.captioned(16, 16, "train", ())
    x, t = core.tensor(s.images), clip.tokenize(s.captions, 24)
    opt = core.optim.AdamW(m.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        loss = clip.clip_loss(m(x, t))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.8 * math.log(16)  # about chance at the start
    assert losses[-1] < 0.5 * losses[0]


def test_checkpoint_round_trip_resume_and_no_sampling(tmp_path, monkeypatch, trained):
    whole, part = str(tmp_path / "whole.safetensors"), str(tmp_path / "part.safetensors")
    clip.train(tiny(), whole, progress=False)
    calls, loss = [], clip.clip_loss

    def interrupted(*args):  # the run is killed during its third step, after the checkpoint of step 2
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return loss(*args)

    monkeypatch.setattr(clip, "clip_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        clip.train(tiny(), part, progress=False)
    monkeypatch.setattr(clip, "clip_loss", loss)
    assert clip.train(tiny(), part, progress=False)["start"] == 2
    a, b = core.serialize.load(whole), core.serialize.load(part)
    assert sorted(a) == sorted(b) and "model.logit_scale" in a  # the 0-d t and its Adam moments are saved
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    m, c = clip.load(whole)
    assert c == tiny() and c.holdout == tiny().holdout and not m.training
    np.testing.assert_array_equal(m.score(images(3), CAPTIONS), trained[0].score(images(3), CAPTIONS))
    with pytest.raises(UsageError, match="nothing to sample"):
        clip.sample(m, c, 4)


def test_cli_train_and_eval_in_process(tmp_path, capsys):
    ckpt = str(tmp_path / "c.safetensors")
    sets = [a for k, v in TINY.items() if k not in ("steps", "batch_size") for a in ("--set", f"{k}={v}")]
    args = ["--steps", "2", "--batch-size", "16", *sets, "--set", 'holdout=[["green", "triangle"]]']
    assert cli.main(["train", "clip", *args, "--out", ckpt, "--quiet"]) == 0
    assert "clip on shapes: steps 0->2" in capsys.readouterr().out
    assert cli.main(["eval", "clip", "--ckpt", ckpt, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    figs = {f["name"]: f for f in result["figures"]}
    assert result["holdout"] == [["green", "triangle"]]
    assert set(figs["zero-shot color accuracy"]["baselines"]) == {"chance", "mean_prompt_embedding"}
    assert figs["zero-shot shape accuracy [held-out combinations]"]["baselines"]["chance"] == 20.0
    assert figs["image→text recall@1 of 100"]["baselines"] == {"chance": 1.0}
    assert all(0 <= f["value"] <= 100 for f in figs.values()) and len(figs) == 10


@pytest.mark.slow
def test_bar_shapes(tmp_path):
    """The measured bar: zero-shot color and shape accuracy ≥ 90% each on one-object test images; recall@1
    among 100 above chance; the held-out combinations are reported (and only checked to be above chance)."""
    cfg = registry.config(clip)
    clip.train(cfg, str(tmp_path / "clip.safetensors"), progress=False)
    m, c = clip.load(str(tmp_path / "clip.safetensors"))
    figs = {f["name"]: f["value"] for f in clip.evaluate(m, c)["figures"]}
    assert figs["zero-shot color accuracy"] >= 90 and figs["zero-shot shape accuracy"] >= 90
    assert figs["image→text recall@1 of 100"] > 1
    assert figs["zero-shot color accuracy [held-out combinations]"] > 12.5
