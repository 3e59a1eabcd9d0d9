"""ViT (models/vit.py): the patch embedding's convolution equals patchify + a linear map, the whole forward
equals the same network built from PyTorch modules (float64), the class token's output ignores the order
of the patch tokens (so without position embeddings the model is blind to shuffled patches), the loss
falls on a tiny batch, checkpoints round-trip and resume bitwise, the CLI trains and evaluates it; the
measured bar under the `slow` marker."""

import json

import numpy as np
import pytest
import torch

import core
from models import cli, registry, vit
from models import train as loop
from models.registry import UsageError

TINY = dict(steps=4, batch_size=16, dim=16, depth=1, heads=2, warmup=2, checkpoint_every=2)


def tiny(data="digits", **kw):
    return registry.config(vit, data, **dict(TINY, **kw))


def float64_model(cfg, seed=0):
    core.manual_seed(seed)
    m = vit.build(cfg).double().eval()
    rng = np.random.default_rng(seed)
    for p in m.parameters():  # nothing left at its zero init (head, biases): every weight takes part
        p.data[...] = rng.normal(0, 0.3, p.shape)
    return m


@pytest.mark.parametrize("data,res,patch,channels", [("digits", 8, 2, 1), ("digits", 16, 4, 1), ("shapes", 16, 4, 3)])
def test_shapes(data, res, patch, channels):
    cfg = tiny(data, resolution=res, patch=patch)
    m = vit.build(cfg)
    x = core.randn(3, channels, res, res)
    assert m.embed(x).shape == (3, (res // patch) ** 2 + 1, cfg.dim)
    assert m.features(x).shape == (3, cfg.dim)
    assert m(x).shape == (3, loop.NUM_CLASSES[data])
    with pytest.raises(ValueError, match=r"ViT: expected images \(B, 1, 8, 8\), got shape \(3, 1, 16, 16\)"):
        vit.build(tiny())(core.randn(3, 1, 16, 16))
    with pytest.raises(ValueError, match="multiple of patch"):
        tiny(resolution=8, patch=3)


def test_patch_embedding_conv_equals_patchify_then_linear():
    """§3.1: a P×P stride-P convolution is the linear projection E of the flattened patches, E = W.reshape(D, -1)ᵀ."""
    rng = np.random.default_rng(0)
    pe = vit.PatchEmbed(3, 4, 5).double()
    x = rng.normal(size=(2, 3, 16, 8))
    w, b = pe.proj.weight.numpy(), pe.proj.bias.numpy()
    patches = vit.patchify(core.tensor(x), 4).numpy()
    assert patches.shape == (2, 8, 48)
    np.testing.assert_array_equal(patches[1, 5], x[1, :, 8:12, 4:8].reshape(-1))  # patch (row 2, col 1), raster order
    np.testing.assert_allclose(pe(core.tensor(x)).numpy(), patches @ w.reshape(5, -1).T + b, rtol=1e-12, atol=1e-12)


def test_forward_equals_pytorch_modules_float64():
    """Eqs. 1-4 and the head against torch.nn.Conv2d + TransformerEncoderLayer(norm_first=True) + LayerNorm."""
    cfg = tiny(dim=16, depth=2, heads=4, dropout=0.0)
    m = float64_model(cfg)
    t = lambda a: torch.tensor(a.numpy())  # noqa: E731
    conv = torch.nn.Conv2d(1, 16, 2, stride=2).double()
    conv.weight.data, conv.bias.data = t(m.patch_embed.proj.weight), t(m.patch_embed.proj.bias)
    layers = []
    for blk in m.transformer.blocks:
        layer = torch.nn.TransformerEncoderLayer(16, 4, 64, dropout=0.0, activation="gelu", batch_first=True,
                                                 norm_first=True).double().eval()
        sd = {"self_attn.in_proj_weight": blk.attn.c_attn.weight, "self_attn.in_proj_bias": blk.attn.c_attn.bias,
              "self_attn.out_proj.weight": blk.attn.c_proj.weight, "self_attn.out_proj.bias": blk.attn.c_proj.bias,
              "linear1.weight": blk.mlp.c_fc.weight, "linear1.bias": blk.mlp.c_fc.bias,
              "linear2.weight": blk.mlp.c_proj.weight, "linear2.bias": blk.mlp.c_proj.bias,
              "norm1.weight": blk.ln_1.weight, "norm1.bias": blk.ln_1.bias,
              "norm2.weight": blk.ln_2.weight, "norm2.bias": blk.ln_2.bias}
        layer.load_state_dict({k: t(v) for k, v in sd.items()})
        layers.append(layer)
    x = np.random.default_rng(1).normal(size=(3, 1, 8, 8))
    with torch.no_grad():
        z = conv(torch.tensor(x)).flatten(2).transpose(1, 2)
        z = torch.cat([t(m.cls_token).expand(3, 1, 16), z], 1) + t(m.pos_embed)
        for layer in layers:
            z = layer(z)
        y = torch.nn.functional.layer_norm(z[:, 0], (16,), t(m.transformer.ln_f.weight), t(m.transformer.ln_f.bias))
        ref = torch.nn.functional.linear(y, t(m.head.weight), t(m.head.bias)).numpy()
    with core.no_grad():
        ours = m(core.tensor(x)).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12)


def test_class_token_ignores_patch_order_unless_positions_are_embedded():
    """Attention is permutation-equivariant, so the class token's output is the same for any order of the
    (patch + position) tokens; the position embeddings are the only thing that tells where a patch was."""
    cfg = tiny(dim=16, depth=2, heads=4, dropout=0.0)
    m = float64_model(cfg)
    x = np.random.default_rng(2).normal(size=(2, 1, 8, 8))
    perm = np.random.default_rng(3).permutation(16)
    with core.no_grad():
        z = m.embed(core.tensor(x)).numpy()
        shuffled = np.concatenate([z[:, :1], z[:, 1:][:, perm]], 1)
        a, b = (m.transformer(core.tensor(v)).numpy()[:, 0] for v in (z, shuffled))
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
        # the same shuffle applied to the image's 2×2 patches
        p = x.reshape(2, 1, 4, 2, 4, 2).transpose(0, 2, 4, 1, 3, 5).reshape(2, 16, 1, 2, 2)[:, perm]
        x_shuffled = p.reshape(2, 4, 4, 1, 2, 2).transpose(0, 3, 1, 4, 2, 5).reshape(2, 1, 8, 8)
        assert not np.allclose(x, x_shuffled)
        with_pos = m(core.tensor(x)).numpy(), m(core.tensor(x_shuffled)).numpy()
        assert np.abs(with_pos[0] - with_pos[1]).max() > 1e-3  # positions embedded: the order matters
        m.pos_embed.data[...] = 0
        np.testing.assert_allclose(m(core.tensor(x)).numpy(), m(core.tensor(x_shuffled)).numpy(), rtol=1e-10,
                                   atol=1e-12)  # a bag of patches


def test_shift_translates_and_fills_with_background():
    x = np.arange(2 * 1 * 4 * 4, dtype=np.float32).reshape(2, 1, 4, 4)
    out = vit.shift(x, np.array([[1, 0], [0, -1]]))
    np.testing.assert_array_equal(out[0, 0, 1:], x[0, 0, :3])  # down one row
    np.testing.assert_array_equal(out[0, 0, 0], -1)
    np.testing.assert_array_equal(out[1, 0, :, :3], x[1, 0, :, 1:])  # left one column
    np.testing.assert_array_equal(out[1, 0, :, 3], -1)
    assert vit.shift(x, np.zeros((2, 2), int)) is x


def test_loss_falls_on_a_tiny_batch():
    core.manual_seed(0)
    m = vit.build(tiny(dim=32, depth=2, heads=4, dropout=0.0))
    x, y = loop.dataset("digits", 8)
    xb, yb = core.tensor(x[:32]), core.tensor(y[:32])
    opt = core.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = core.F.cross_entropy(m(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(np.log(10), rel=1e-6)  # the zero-initialized head: uniform logits
    assert losses[-1] < 0.5 * losses[0]  # 2.30 → about 0.9 in 30 steps


def test_checkpoint_round_trip_resume_and_no_sampling(tmp_path, monkeypatch):
    whole, part = str(tmp_path / "whole.safetensors"), str(tmp_path / "part.safetensors")
    vit.train(tiny(steps=4), whole, progress=False)
    calls, shift = [], vit.shift

    def interrupted(*args):  # the run is killed during its third step, after the checkpoint of step 2
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return shift(*args)

    monkeypatch.setattr(vit, "shift", interrupted)
    with pytest.raises(KeyboardInterrupt):
        vit.train(tiny(steps=4), part, progress=False)
    monkeypatch.setattr(vit, "shift", shift)
    assert vit.train(tiny(steps=4), part, progress=False)["start"] == 2
    a, b = core.serialize.load(whole), core.serialize.load(part)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # random shifts and dropout included
    m, c = vit.load(whole)
    assert c == tiny(steps=4) and not m.training
    x = loop.dataset("digits", 8, "test")[0][:5]
    np.testing.assert_array_equal(vit.predict(m, x), vit.predict(vit.load(whole)[0], x))
    with pytest.raises(UsageError, match="classifier"):
        vit.sample(m, c, 4)
    assert vit.position_similarity(m, str(tmp_path / "pos.png")).endswith("pos.png")
    assert (tmp_path / "pos.png").stat().st_size > 0


def test_cli_train_and_eval_in_process(tmp_path, capsys):
    ckpt = str(tmp_path / "v.safetensors")
    args = ["--steps", "3", "--batch-size", "16", "--set", "dim=16", "--set", "depth=1", "--set", "heads=2"]
    assert cli.main(["train", "vit", *args, "--out", ckpt, "--quiet"]) == 0
    assert "vit on digits: steps 0->3" in capsys.readouterr().out
    assert cli.main(["eval", "vit", "--ckpt", ckpt, "--json"]) == 0
    fig = json.loads(capsys.readouterr().out)["figures"][0]
    assert fig["name"] == "test accuracy" and 0 <= fig["value"] <= 100
    assert fig["baselines"]["logistic_regression"] > 90 and fig["baselines"]["majority_class"] < 15
    with pytest.raises(SystemExit) as e:
        cli.main(["sample", "vit", "--ckpt", ckpt, "-o", str(tmp_path / "s.png")])
    assert e.value.code == 2 and "classifier" in capsys.readouterr().err


@pytest.mark.slow
def test_bar_digits(tmp_path):
    """The measured bar: test accuracy ≥ 95% on 8×8 digits with the default config."""
    cfg = registry.config(vit, "digits")
    vit.train(cfg, str(tmp_path / "vit.safetensors"), progress=False)
    m, c = vit.load(str(tmp_path / "vit.safetensors"))
    fig = vit.evaluate(m, c)["figures"][0]
    assert fig["value"] >= 95.0


def test_image_not_a_whole_number_of_patches_is_an_error():
    """A 9×9 image in 2×2 patches: the stride-2 convolution would silently drop the last row and column."""
    with pytest.raises(ValueError, match="ViT: resolution 9 must be a multiple of patch 2"):
        vit.ViT(9, 2, 1, 16, 1, 2)
    with pytest.raises(ValueError, match=r"PatchEmbed: image 9×8 is not a whole number of 2×2 patches"):
        vit.PatchEmbed(1, 2, 4)(core.randn(1, 1, 9, 8))
