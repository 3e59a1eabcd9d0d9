"""The shared model framework (models/registry.py, models/train.py) and `t2i train/sample/eval`,
in-process on tiny configs; bad arguments exit with code 2."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from models import cli, gan, registry
from models import train as loop
from models.registry import UsageError

TINY_GAN = ["--steps", "2", "--batch-size", "8", "--set", "nz=4", "--set", "ngf=4", "--set", "ndf=4",
            "--set", "embed_dim=2", "--set", "eval_samples=40"]


# --- registry -------------------------------------------------------------------------------------


def test_registry_names_every_model_and_rejects_unknown_ones():
    assert set(registry.MODELS) >= {"gan", "vae", "glow", "ddpm", "gpt", "bert", "vit", "clip", "vqvae", "dvae",
                                    "vqgan"}
    assert cli._MODELS == tuple(registry.MODELS) and cli._DATASETS == registry.DATASETS  # the CLI's copy agrees
    assert registry.get("gan") is gan
    with pytest.raises(UsageError, match="unknown model 'nope'; known models: gan, vae, glow, ddpm, gpt"):
        registry.get("nope")


def test_config_applies_preset_then_overrides_and_rejects_unknown_fields():
    assert registry.config(gan, "digits") == gan.Config()
    c = registry.config(gan, "shapes", steps=7, seed=None)
    assert (c.data, c.resolution, c.steps, c.seed) == ("shapes", gan.PRESETS["shapes"]["resolution"], 7, 0)
    with pytest.raises(UsageError, match="no field.*colour"):
        registry.config(gan, "digits", colour=1)
    with pytest.raises(UsageError, match="unknown dataset 'mnist'"):
        registry.config(gan, "mnist")
    with pytest.raises(UsageError, match="unknown dataset 'text' for gan; it trains on: digits, shapes"):
        registry.config(gan, "text")
    assert registry.config(gan) == gan.Config()  # no dataset: the model's first
    with pytest.raises(ValueError, match="resolution"):
        registry.config(gan, "digits", resolution=12)
    assert registry.from_dict(gan.Config, loop.config_dict(c)) == c
    with pytest.raises(ValueError, match="unknown field"):
        registry.from_dict(gan.Config, {"bogus": 1})


def test_set_none_and_types_follow_the_annotation():
    """`--set top_p=null` was dropped (top_p stayed 0.95) and a field whose default is None took any value
    (top_k="abc" or 3.5 reached the sampler); None still means "not given" for a field that cannot be None."""
    from models import gpt

    assert registry.config(gpt, "text", top_p=None).top_p is None
    assert registry.config(gpt, "text", top_k=5, vocab_size=None).top_k == 5
    assert registry.config(gan, seed=None).seed == 0
    for key, value in [("top_k", "abc"), ("top_k", 3.5), ("top_k", True), ("vocab_size", "x")]:
        with pytest.raises(UsageError, match=rf"Config\.{key} is an int or None \(default None\), got {value!r}"):
            registry.config(gpt, "text", **{key: value})


@pytest.mark.parametrize("key, value, what", [
    ("steps", -3, "a positive integer"), ("batch_size", 0, "a positive integer"),
    ("lr", float("nan"), "a positive number"), ("lr", -1.0, "a positive number"),
    ("seed", -1, "a non-negative integer"),
])
def test_set_checks_the_fields_every_config_has(key, value, what, capsys):
    """`--set steps=-3` trained nothing and reported a checkpoint it never wrote, `lr=NaN` trained NaNs, and
    `batch_size=0`, `seed=-1` ended in a traceback: refused like --steps/--lr/--seed/--batch-size are."""
    with pytest.raises(UsageError, match=rf"Config\.{key} must be {what}, got {value!r}"):
        registry.config(gan, **{key: value})
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "gan", "--set", f"{key}={json.dumps(value)}", "--out", "x"])
    assert e.value.code == 2 and f"{key} must be {what}" in capsys.readouterr().err


# --- train.py pieces ------------------------------------------------------------------------------


def test_stream_is_a_function_of_the_step_and_visits_each_image_once_per_epoch():
    x, y = np.arange(10).reshape(10, 1) * 1.0, np.arange(10)
    s = loop.Stream(x, y, batch_size=3, seed=4)
    assert s.per_epoch == 3  # the short last batch is dropped
    epoch0 = np.concatenate([s.batch(t)[1] for t in range(3)])
    assert len(set(epoch0)) == 9
    again = loop.Stream(x, y, batch_size=3, seed=4)
    for t in (5, 0, 4):  # any order: no state carried between steps
        np.testing.assert_array_equal(s.batch(t)[1], again.batch(t)[1])
    assert not np.array_equal(epoch0, np.concatenate([s.batch(t)[1] for t in range(3, 6)]))


def test_dataset_labels_and_read_only():
    x, y = loop.dataset("digits", 8, "test")
    assert x.shape == (360, 1, 8, 8) and set(y) == set(range(10))
    with pytest.raises(ValueError):
        x[0, 0, 0, 0] = 0
    with pytest.raises(ValueError, match="unknown dataset"):
        loop.dataset("mnist", 8)


def test_save_grid_writes_a_png_of_the_expected_size(tmp_path):
    images = np.zeros((10, 3, 4, 4))
    images[0], images[1, 0] = -1, 1  # image 0 black, image 1 red
    loop.save_grid(images, tmp_path / "sub" / "g.png", nrow=4, scale=2, pad=1)
    im = Image.open(tmp_path / "sub" / "g.png")
    assert im.size == ((4 * 5 + 1) * 2, (3 * 5 + 1) * 2) and im.mode == "RGB"
    px = np.asarray(im)
    assert px[2, 2].tolist() == [0, 0, 0] and px[0, 0].tolist() == [128, 128, 128]  # padding: mid-gray
    assert px[2, 2 + 5 * 2].tolist() == [255, 128, 128]  # image 1, one cell (4 pixels + 1 pad) to the right
    with pytest.raises(ValueError, match="save_grid"):
        loop.save_grid(np.zeros((2, 2, 4, 4)), tmp_path / "bad.png")


def test_labels_for():
    np.testing.assert_array_equal(loop.labels_for(12, 10), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1])
    np.testing.assert_array_equal(loop.labels_for(3, 10, 7), [7, 7, 7])
    with pytest.raises(UsageError, match="0..9"):
        loop.labels_for(3, 10, 12)


def test_fit_refuses_to_resume_another_config(tmp_path):
    out = str(tmp_path / "g.safetensors")
    cfg = registry.config(gan, steps=1, batch_size=8, nz=4, ngf=4, ndf=4, embed_dim=2)
    gan.train(cfg, out, progress=False)
    with pytest.raises(UsageError, match="config differs in lr"):
        gan.train(registry.config(gan, steps=2, batch_size=8, nz=4, ngf=4, ndf=4, embed_dim=2, lr=1e-3), out,
                  progress=False)
    assert gan.train(registry.config(gan, steps=2, batch_size=8, nz=4, ngf=4, ndf=4, embed_dim=2), out,
                     resume=False, progress=False)["start"] == 0


def test_resuming_with_more_steps_follows_the_longer_schedule(tmp_path):
    """A larger --steps continues training: the schedule's total comes from the new config (as nanoGPT's lr is a
    function of its config and the step), not from the checkpoint, where the old total would keep lr at its end."""
    import core

    def run(steps, out):
        cfg = registry.config(gan, steps=steps, batch_size=4)
        core.manual_seed(0)
        model = core.nn.Linear(3, 1)
        opt = core.optim.SGD(model.parameters(), lr=0.1)
        sched = core.optim.WarmupCosine(opt, warmup_steps=1, total_steps=steps)
        lrs = []

        def step(xb, yb):
            loss = ((model(core.tensor(xb)) - 1.0) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
            return {"loss": loss.item()}

        loop.fit(cfg, out, model=model, optimizer=opt, step=step, data=(np.ones((8, 3)), np.zeros(8)),
                 scheduler=sched, progress=False)
        return lrs, model.weight.numpy().copy()

    first, _ = run(4, str(tmp_path / "a.safetensors"))
    assert first[-1] > 0 and len(first) == 4
    resumed, w = run(8, str(tmp_path / "a.safetensors"))
    straight, w8 = run(8, str(tmp_path / "b.safetensors"))
    assert len(resumed) == 4 and resumed[0] > 0  # the old schedule ended at lr 0; the new one is mid-way
    np.testing.assert_allclose(resumed, straight[4:])  # the second half of the 8-step schedule ...
    assert not np.allclose(first, straight[:4])  # ... after a first half that followed the 4-step schedule


def test_read_checkpoint_takes_everything_from_one_version_of_the_file(tmp_path, monkeypatch):
    """`t2i sample` while training rewrites the checkpoint: the weights and the step (config, history, EMA) came
    from two reads, so from two versions of the file when it was replaced between them."""
    import core

    def run(steps, out):
        cfg = registry.config(gan, steps=steps, batch_size=4)
        core.manual_seed(0)
        model = core.nn.Linear(3, 1)
        opt = core.optim.SGD(model.parameters(), lr=0.1)

        def step(xb, yb):
            loss = ((model(core.tensor(xb)) - 1.0) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            return {"loss": loss.item()}

        loop.fit(cfg, out, model=model, optimizer=opt, step=step, data=(np.ones((8, 3)), np.zeros(8)), progress=False)

    old, new = str(tmp_path / "old.safetensors"), str(tmp_path / "new.safetensors")
    run(1, old)
    run(2, new)
    expected = loop.read_checkpoint(old)
    read = loop.serialize._read

    def racing(path):  # the training run replaces the file just after a read
        result = read(path)
        if os.path.exists(new):
            os.replace(new, old)
        return result

    monkeypatch.setattr(loop.serialize, "_read", racing)
    got = loop.read_checkpoint(old)
    assert got["step"] == expected["step"] == 1 and got["history"] == expected["history"]
    np.testing.assert_array_equal(got["weights"]["weight"], expected["weights"]["weight"])


def test_format_figures_lines_up_value_and_baselines():
    text = loop.format_figures({"figures": [loop.figure("FD-classifier", 1.5, better="lower", gaussian=30.0,
                                                        real_train=0.2)], "note": [1, 2]})
    assert "FD-classifier" in text and "gaussian 30" in text and "real train 0.2" in text and 'note: [1, 2]' in text
    with pytest.raises(ValueError, match="better"):
        loop.figure("x", 1, better="up")


# --- the CLI --------------------------------------------------------------------------------------


def test_cli_train_sample_eval_in_process(tmp_path, capsys):
    ckpt, png = str(tmp_path / "g.safetensors"), str(tmp_path / "grid.png")
    assert cli.main(["train", "gan", "--data", "digits", *TINY_GAN, "--out", ckpt, "--quiet"]) == 0
    assert "steps 0->2" in capsys.readouterr().out
    assert cli.main(["train", "gan", "--data", "digits", *TINY_GAN, "--out", ckpt, "--quiet"]) == 0
    assert "no new steps" in capsys.readouterr().out  # resumed at its end: nothing left to do
    assert cli.main(["sample", "gan", "--ckpt", ckpt, "--n", "10", "--label", "3", "-o", png]) == 0
    assert Image.open(png).size[0] > 0 and "10 images" in capsys.readouterr().out
    assert cli.main(["eval", "gan", "--ckpt", ckpt, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    names = [f["name"] for f in result["figures"]]
    assert names[0] == "FD-classifier" and "class agreement" in names
    assert set(result["figures"][0]["baselines"]) == {"gaussian", "real_train"}
    assert cli.main(["eval", "gan", "--ckpt", ckpt]) == 0
    assert "FD-classifier" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["train", "nope", "--out", "x"], "invalid choice: 'nope'"),
    (["train", "gan", "--data", "mnist", "--out", "x"], "invalid choice: 'mnist'"),
    (["train", "gan", "--steps", "0", "--out", "x"], "must be a positive integer"),
    (["train", "gan", "--lr", "-1", "--out", "x"], "must be a positive number"),
    (["train", "gan", "--set", "colour=1", "--out", "x"], "no field"),
    (["train", "gan", "--set", "resolution=12", "--out", "x"], "resolution"),
    (["train", "gan", "--set", "oops", "--out", "x"], "KEY=VALUE"),
    (["train", "gan"], "--out"),
    (["sample", "gan", "--ckpt", "/nonexistent.safetensors", "-o", "x.png"], "no such file"),
    (["eval", "gan"], "--ckpt"),
    (["train", "gan", "--set", "conditional=maybe", "--out", "x"], "Config.conditional is a bool"),
    (["train", "gan", "--out", "/proc/nonexistent-dir/x.safetensors"], "cannot make the directory"),
    (["train", "gan", "--out", "/"], "is a directory"),
    (["sample", "gan", "--ckpt", "/", "-o", "x.png"], "no such file (a directory)"),
    (["sample", "gpt", "--ckpt", "x", "--top-p", "5"], "must be in (0, 1]"),
    (["sample", "ddpm", "--ckpt", "x", "--guidance", "nan"], "must be a finite number"),
])
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_sample_arguments_the_model_does_not_take_exit_2(tmp_path, capsys):
    ckpt = str(tmp_path / "g.safetensors")
    assert cli.main(["train", "gan", *TINY_GAN, "--out", ckpt, "--quiet"]) == 0
    png = ["-o", str(tmp_path / "s.png")]
    for extra, message in [(["--guidance", "3", *png], "guidance"), (["--label", "11", *png], "label must be in 0..9"),
                           (["--prompt", "a red", *png], "gan does not take --prompt"),
                           ([], "gan draws images: give -o"),
                           (["-o", str(tmp_path / "grid.txt")], "needs an image file name")]:
        with pytest.raises(SystemExit) as e:
            cli.main(["sample", "gan", "--ckpt", ckpt, *extra])
        assert e.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a GAN checkpoint is not a VAE
        cli.main(["sample", "vae", "--ckpt", ckpt, "-o", str(tmp_path / "s.png")])
    assert e.value.code == 2 and "holds a 'gan' model" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "s.png")


@pytest.mark.parametrize("change, message", [
    ({"old_knob": 3}, "models.gan.Config: the checkpoint's config has unknown field(s) old_knob"),
    ({"resolution": 12}, "resolution"),
])
def test_a_checkpoint_config_that_does_not_fit_exits_2(tmp_path, capsys, change, message):
    """A checkpoint of another version of the model (a field since removed, a value now refused) ended in a
    traceback (exit 1) from registry.from_dict, not a usage error naming the file."""
    from core import serialize

    ckpt = str(tmp_path / "g.safetensors")
    assert cli.main(["train", "gan", *TINY_GAN, "--steps", "1", "--out", ckpt, "--quiet"]) == 0
    arrays, meta = serialize.load_with_metadata(ckpt)
    del meta[serialize.DIGEST_KEY]  # (save writes a new one)
    extra = json.loads(meta["extra"])
    extra["config"].update(change)
    serialize.save(ckpt, arrays, metadata=dict(meta, extra=json.dumps(extra)))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(["sample", "gan", "--ckpt", ckpt, "-o", str(tmp_path / "s.png")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and ckpt in err and message in err


def test_every_command_has_help(capsys):
    for cmd in ("train", "sample", "eval"):
        with pytest.raises(SystemExit) as e:
            cli.main([cmd, "--help"])
        assert e.value.code == 0 and "MODEL" in capsys.readouterr().out


def test_set_and_flags_combine_and_bools_parse(tmp_path, capsys):
    """--set steps=… counts unless --steps is given (unset flags erased it); --set conditional=False is False
    (the string "False" was a true flag); checkpoint_every=0 and a shorter --steps than done are refused."""
    ckpt = str(tmp_path / "g.safetensors")
    tiny = [a for a in TINY_GAN if a not in ("--steps", "2")]
    assert cli.main(["train", "gan", *tiny, "--set", "steps=1", "--set", "conditional=False", "--out", ckpt,
                     "--quiet"]) == 0
    saved = loop.read_checkpoint(ckpt)
    assert saved["config"]["steps"] == 1 and saved["config"]["conditional"] is False
    assert not any(k.startswith("G.embed") for k in saved["weights"])
    capsys.readouterr()
    assert cli.main(["train", "gan", *tiny, "--set", "steps=9", "--steps", "2", "--set", "conditional=false",
                     "--out", str(tmp_path / "h.safetensors"), "--quiet"]) == 0
    assert "steps 0->2" in capsys.readouterr().out  # the flag wins over --set
    fresh, done = str(tmp_path / "fresh.safetensors"), str(tmp_path / "h.safetensors")
    for out, extra, message in [(fresh, ["--set", "checkpoint_every=0"], "checkpoint_every must be >= 1"),
                                (done, ["--steps", "1"], "has already trained 2 steps, more than the 1 asked for")]:
        with pytest.raises(SystemExit) as e:
            cli.main(["train", "gan", *tiny, "--set", "conditional=false", *extra, "--out", out, "--quiet"])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert not os.path.exists(fresh)
    nested = str(tmp_path / "new" / "dir" / "g.safetensors")  # a missing folder is made, before training
    assert cli.main(["train", "gan", *tiny, "--set", "steps=1", "--out", nested, "--quiet"]) == 0
    assert os.path.isfile(nested)


@pytest.mark.parametrize("name", ["bert", "clip", "dvae"])
def test_models_with_their_own_load_refuse_a_config_that_does_not_fit(monkeypatch, name):
    """bert, clip and dvae read their checkpoints themselves: a config their Config now refuses (an unknown field, a
    value its checks reject) is a UsageError naming the file there too, not a traceback."""
    import importlib

    module = importlib.import_module(f"models.{name}")
    for bad in ({"no_such_field": 1}, {"dim": 0, "heads": 3} if name == "bert" else {"resolution": 7}):
        monkeypatch.setattr(loop, "read_checkpoint", lambda path, bad=bad: {"config": bad, "weights": {}})
        with pytest.raises(UsageError, match=f"ckpt.safetensors.*{name}.Config"):
            module.load("ckpt.safetensors")
