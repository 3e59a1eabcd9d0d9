"""core.serialize: safetensors round trips, atomic writes, broken files, and bitwise-exact resumption."""

import json
import os
import pickle
import re

import numpy as np
import pytest
import torch

import core
from core import functional as F
from core import nn, optim, serialize
from core.serialize import SerializationError, load, load_metadata, save

# --- save / load --------------------------------------------------------------------------------

DTYPES = [np.float32, np.float64, np.int64, np.bool_, np.uint8, np.int32, np.float16]
SHAPES = [(), (0,), (3, 0, 2), (1,), (5,), (2, 3, 4)]


def sample(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return (rng.standard_normal(shape) * 1e3).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_round_trip_dtypes_and_shapes(tmp_path, dtype):
    arrays = {f"x{i}": sample(s, dtype, seed=i) for i, s in enumerate(SHAPES)}
    path = tmp_path / "a.safetensors"
    save(path, arrays)
    back = load(path)
    assert set(back) == set(arrays)
    for k, a in arrays.items():
        assert back[k].dtype == a.dtype and back[k].shape == a.shape, k
        assert np.array_equal(back[k], a), k


def test_special_float_values_survive(tmp_path):
    a = np.array([np.nan, np.inf, -np.inf, -0.0, 5e-324, np.finfo(np.float64).max])
    save(tmp_path / "f", {"a": a})
    b = load(tmp_path / "f")["a"]
    assert np.array_equal(a.view(np.uint64), b.view(np.uint64))  # bit for bit, NaN and -0.0 included


def test_non_contiguous_and_big_endian_arrays_are_saved_by_value(tmp_path):
    base = np.arange(24, dtype=np.float64).reshape(2, 3, 4)
    arrays = {
        "transposed": base.transpose(2, 0, 1),
        "reversed": base[:, ::-1, ::-2],
        "strided": base[..., 1],
        "big_endian": base.astype(">f8"),
        "scalar": np.float32(1.5),  # a NumPy scalar: saved as a 0-d array
    }
    save(tmp_path / "v", arrays)
    back = load(tmp_path / "v")
    for k, a in arrays.items():
        assert back[k].shape == np.shape(a) and np.array_equal(back[k], a), k
    assert back["big_endian"].dtype == np.float64


def test_tensors_are_saved_and_load_as_arrays(tmp_path):
    t = core.tensor(np.arange(6, dtype=np.float32).reshape(2, 3), requires_grad=True)
    save(tmp_path / "t", {"w": t, "i": core.tensor(np.array([1, 2]))})
    back = load(tmp_path / "t")
    assert isinstance(back["w"], np.ndarray) and back["w"].dtype == np.float32
    assert np.array_equal(back["w"], t.data) and np.array_equal(back["i"], [1, 2])
    back["w"][0, 0] = 42.0  # the loaded arrays own writable memory
    assert t.data[0, 0] == 0.0


def test_torch_tensors_are_saved_as_arrays(tmp_path):
    """A torch.Tensor is read as Module.load_state_dict reads one, so torch weights can be saved directly."""
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3).requires_grad_()
    save(tmp_path / "t", {"w": t, "wt": t.T, "i": torch.tensor([1, 2])})  # a transposed view is saved by value
    back = load(tmp_path / "t")
    assert back["w"].dtype == np.float32 and np.array_equal(back["w"], t.detach().numpy())
    assert np.array_equal(back["wt"], t.detach().numpy().T) and back["i"].dtype == np.int64


@pytest.mark.parametrize("value, name", [(torch.Size([2]), "torch.Size"), ([1.0], "list")])
def test_a_rejected_value_is_named_with_its_module(tmp_path, value, name):
    with pytest.raises(TypeError, match=rf"'a' must be .*, got {name}$"):
        save(tmp_path / "bad", {"a": value})


def test_metadata_round_trip(tmp_path):
    save(tmp_path / "m", {"a": np.zeros(2)}, metadata={"note": "hello", "n": "3"})
    meta = load_metadata(tmp_path / "m")
    assert meta["note"] == "hello" and meta["n"] == "3"


def test_file_is_plain_safetensors(tmp_path):
    """The layout of the spec, parsed by hand: u64 header length, JSON header, raw little-endian bytes.
    Nothing else (in particular no pickle) is in the file."""
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([True, False])}
    path = tmp_path / "p.safetensors"
    save(path, arrays, metadata={"k": "v"})
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    body = raw[8 + n:]
    covered = 0
    for name, a in arrays.items():
        entry = header[name]
        lo, hi = entry["data_offsets"]
        assert entry["shape"] == list(a.shape)
        assert body[lo:hi] == a.astype(a.dtype.newbyteorder("<")).tobytes()
        covered += hi - lo
    assert covered == len(body)  # every byte is accounted for by a tensor
    assert set(header) == {"__metadata__", *arrays}
    assert all(isinstance(v, str) for v in header["__metadata__"].values())


def test_saving_does_not_pickle(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle was used")

    monkeypatch.setattr(pickle, "dumps", refuse)
    monkeypatch.setattr(pickle, "dump", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    save(tmp_path / "x", {"a": np.ones(3)})
    assert np.array_equal(load(tmp_path / "x")["a"], np.ones(3))


@pytest.mark.parametrize("bad, kind", [
    ({"a": [1.0, 2.0]}, TypeError),  # a list is not an array
    ({"a": np.array([object()])}, TypeError),  # a dtype safetensors cannot hold
    ({1: np.zeros(1)}, TypeError),  # a non-string name
    ([np.zeros(1)], TypeError),  # not a dict
])
def test_bad_inputs_to_save(tmp_path, bad, kind):
    with pytest.raises(kind, match="save"):
        save(tmp_path / "bad", bad)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temp file left


def test_metadata_must_be_strings(tmp_path):
    with pytest.raises(TypeError, match="metadata"):
        save(tmp_path / "m", {"a": np.zeros(1)}, metadata={"n": 3})
    with pytest.raises(ValueError, match="reserved"):
        save(tmp_path / "m", {"a": np.zeros(1)}, metadata={serialize.DIGEST_KEY: "x"})


def test_names_the_format_cannot_hold_are_refused_before_writing(tmp_path):
    """A tensor named __metadata__ wrote a file whose header held that key twice (it never loaded again); a lone
    surrogate failed with a bare UnicodeEncodeError naming nothing."""
    for name in ("__metadata__", "w\ud800"):
        with pytest.raises(ValueError, match="save: .*" + re.escape(repr(name))):
            save(tmp_path / "n", {name: np.zeros(1)})
    with pytest.raises(ValueError, match="not valid Unicode"):
        save(tmp_path / "n", {"a": np.zeros(1)}, metadata={"k": "\udc80"})
    assert list(tmp_path.iterdir()) == []


def test_a_dtype_numpy_lacks_is_named_on_load_and_save(tmp_path):
    """bfloat16 and float8 files (as Hugging Face ships weights) failed with a bare KeyError('BF16') from deep
    inside safetensors.numpy; saving a bfloat16 torch.Tensor with torch's message, which names no tensor."""
    import safetensors.torch

    for dtype, code in [(torch.bfloat16, "BF16"), (torch.float8_e4m3fn, "F8_E4M3")]:
        safetensors.torch.save_file({"ok": torch.ones(2), "w": torch.ones(2, dtype=dtype)}, tmp_path / "h")
        with pytest.raises(SerializationError, match=f"h: tensor 'w' has dtype {code}, which NumPy cannot hold"):
            load(tmp_path / "h")
    with pytest.raises(TypeError, match="save: 'w' has dtype torch.bfloat16"):
        save(tmp_path / "b", {"w": torch.ones(2, dtype=torch.bfloat16)})


def test_saved_file_has_a_normal_mode(tmp_path):
    save(tmp_path / "a", {"a": np.zeros(1)})
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "a").st_mode & 0o777 == 0o666 & ~umask


# --- atomicity ----------------------------------------------------------------------------------


def _crash(*args, **kwargs):
    raise OSError("simulated crash")


@pytest.mark.parametrize("where", ["replace", "fsync"])
def test_crash_before_rename_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch, where):
    path = tmp_path / "ckpt.safetensors"
    old = {"w": np.arange(4.0)}
    save(path, old)
    before = path.read_bytes()
    monkeypatch.setattr(os, where, _crash)
    with pytest.raises(OSError, match="simulated crash"):
        save(path, {"w": np.zeros(1000)})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert np.array_equal(load(path)["w"], old["w"])
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]


def test_interrupt_while_writing_a_new_file_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path / "new", {"w": np.ones(3)})
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_the_file(tmp_path):
    path = tmp_path / "a"
    save(path, {"w": np.ones(3)})
    save(path, {"v": np.zeros(2, dtype=np.int64)})
    back = load(path)
    assert list(back) == ["v"] and np.array_equal(back["v"], [0, 0])
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


# --- broken files are rejected, naming the file and the problem ---------------------------------


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "good.safetensors"
    save(path, {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(4)}, metadata={"k": "v"})
    return path


def _header_len(path):
    return int.from_bytes(path.read_bytes()[:8], "little")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load(path)


@pytest.mark.parametrize("keep", ["0", "4", "8", "9", "half_header", "header_only", "half_data", "all_but_one"])
def test_truncated_file(good_file, keep):
    raw = good_file.read_bytes()
    n = _header_len(good_file)
    cut = {"0": 0, "4": 4, "8": 8, "9": 9, "half_header": 8 + n // 2, "header_only": 8 + n,
           "half_data": (8 + n + len(raw)) // 2, "all_but_one": len(raw) - 1}[keep]
    good_file.write_bytes(raw[:cut])
    with pytest.raises(SerializationError) as e:
        load(good_file)
    msg = str(e.value)
    assert str(good_file) in msg
    assert "truncated" in msg, msg


def test_flipped_data_byte_is_caught_by_the_checksum(good_file):
    raw = bytearray(good_file.read_bytes())
    raw[-5] ^= 0x01  # one bit of one float: the format alone cannot notice this
    good_file.write_bytes(bytes(raw))
    with pytest.raises(SerializationError, match="corrupted.*checksum") as e:
        load(good_file)
    assert str(good_file) in str(e.value)


@pytest.mark.parametrize("old, new", [(b'"k":"v"', b'"k":"w"'), (b'[3,4]', b'[4,3]'), (b'"F32"', b'"I32"')])
def test_edited_header_is_caught(good_file, old, new):
    """Edits that keep the header valid JSON with consistent sizes: only the checksum can tell."""
    raw = good_file.read_bytes()
    assert raw.count(old) == 1
    good_file.write_bytes(raw.replace(old, new))
    with pytest.raises(SerializationError, match="corrupted") as e:
        load(good_file)
    assert str(good_file) in str(e.value)


@pytest.mark.parametrize("damage", ["bad_json", "bad_offsets", "trailing_bytes", "wrong_shape_size"])
def test_corrupted_header_or_layout(good_file, damage):
    raw = good_file.read_bytes()
    n = _header_len(good_file)
    header = raw[8:8 + n]
    if damage == "bad_json":
        raw = raw[:8] + b"{" + b"#" * (n - 1) + raw[8 + n:]
    elif damage == "bad_offsets":
        raw = raw[:8] + header.replace(b"data_offsets", b"data_offzets") + raw[8 + n:]
    elif damage == "trailing_bytes":
        raw = raw + b"\0" * 16
    elif damage == "wrong_shape_size":  # 3x4 float32 declared as 3x5: the offsets no longer match the shape
        raw = raw[:8] + header.replace(b"[3,4]", b"[3,5]") + raw[8 + n:]
    good_file.write_bytes(raw)
    with pytest.raises(SerializationError, match="corrupted") as e:
        load(good_file)
    assert str(good_file) in str(e.value)


@pytest.mark.parametrize("content", [
    b"hello, this is a text file and not a tensor file at all\n",
    np.random.default_rng(0).bytes(4096),
    b"\xff" * 64,
    b"PK\x03\x04" + b"\0" * 100,  # a zip (PyTorch's .pt format)
])
def test_not_a_safetensors_file(tmp_path, content):
    path = tmp_path / "other.bin"
    path.write_bytes(content)
    with pytest.raises(SerializationError, match="not a safetensors file") as e:
        load(path)
    assert str(path) in str(e.value)


class _Payload:
    """A pickle that, if unpickled, would create a marker file (how a malicious .pt runs code)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_deeply_nested_header_is_corrupted_not_a_recursion_error(tmp_path):
    header = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    (tmp_path / "d").write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(SerializationError, match="d: corrupted header"):
        load(tmp_path / "d")


def test_a_pickle_is_rejected_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(SerializationError, match="not a safetensors file"):
        load(path)
    assert not marker.exists()


# --- checkpoints: the state-dict structures survive exactly ---------------------------------------


class Holder:
    """Anything with state_dict/load_state_dict (the contract save_checkpoint relies on)."""

    def __init__(self, state=None):
        self.state = state

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.state = state


def adam_like_state():
    """An optimizer state dict in PyTorch's format: int parameter ids, per-parameter arrays and scalars,
    and param_groups of options (a tuple of betas included)."""
    rng = np.random.default_rng(0)
    return {
        "state": {
            0: {"step": 7, "exp_avg": rng.standard_normal((3, 2)).astype(np.float32),
                "exp_avg_sq": rng.random((3, 2)).astype(np.float32)},
            3: {"step": 7.0, "exp_avg": rng.standard_normal(()), "momentum_buffer": None},
        },
        "param_groups": [{"lr": 0.1 / 3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                          "amsgrad": False, "params": [0, 3]}],
    }


def assert_same(a, b, where="state"):
    """Equal values AND types (a tuple stays a tuple, an int key stays an int, arrays keep dtype)."""
    assert type(a) is type(b) or (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)), where
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}.{i}")
    elif isinstance(a, (np.ndarray, np.generic)):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), where
    else:
        assert a == b, where


def test_checkpoint_keeps_optimizer_state_structure(tmp_path):
    weights = {"w": np.ones((3, 2), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}
    opt, sched, ema = Holder(adam_like_state()), Holder({"last_epoch": 5, "base_lrs": [0.1]}), \
        Holder({"decay": 0.99, "shadow": {"w": np.full((3, 2), 0.5)}})
    extra = {"epoch": 2, "losses": [1.5, 0.75], "best": np.float64(0.25), "ids": np.arange(3)}
    path = tmp_path / "c.safetensors"
    serialize.save_checkpoint(path, Holder(weights), opt, step=123, scheduler=sched, ema=ema, extra=extra)

    entries = load(path)  # the arrays are plain safetensors entries named by their path
    assert {"model.w", "model.b", "optim.state.0.exp_avg", "optim.state.0.exp_avg_sq", "optim.state.3.exp_avg",
            "ema.shadow.w", "extra.ids", "extra.best"} == set(entries)

    model, opt2, sched2, ema2 = Holder(dict(weights)), Holder(), Holder(), Holder()
    info = serialize.load_checkpoint(path, model, opt2, scheduler=sched2, ema=ema2)
    assert info["step"] == 123
    assert_same(model.state, weights, "model")
    assert_same(opt2.state, adam_like_state(), "optimizer")
    assert_same(sched2.state, sched.state, "scheduler")
    assert_same(ema2.state, ema.state, "ema")
    assert_same(info["extra"], extra, "extra")


def test_checkpoint_restores_the_rng_stream(tmp_path):
    core.manual_seed(11)
    core.random.default_generator.normal((5,))
    serialize.save_checkpoint(tmp_path / "c", Holder({}), step=1)
    expected = core.random.default_generator.normal((4,))
    core.manual_seed(999)  # anything in between
    core.random.default_generator.uniform((7,))
    serialize.load_checkpoint(tmp_path / "c", Holder({}))
    assert np.array_equal(core.random.default_generator.normal((4,)), expected)


def test_checkpoint_rejects_unstorable_state(tmp_path):
    with pytest.raises(TypeError, match="optim.state.0.fn"):
        serialize.save_checkpoint(tmp_path / "c", Holder({}), Holder({"state": {0: {"fn": print}}}))
    assert list(tmp_path.iterdir()) == []


def test_load_checkpoint_mismatches_name_file_key_and_shapes(tmp_path):
    path = tmp_path / "c.safetensors"
    serialize.save_checkpoint(path, Holder({"w": np.ones((3, 2)), "b": np.ones(2)}), step=1)
    with pytest.raises(SerializationError, match=r"c\.safetensors.*size mismatch for w.*\(3, 2\).*\(4, 2\)"):
        serialize.load_checkpoint(path, Holder({"w": np.ones((4, 2)), "b": np.ones(2)}))
    with pytest.raises(SerializationError, match=r"c\.safetensors.*missing keys \['extra_bias'\]"):
        serialize.load_checkpoint(path, Holder({"w": np.ones((3, 2)), "b": np.ones(2), "extra_bias": np.ones(1)}))
    with pytest.raises(SerializationError, match=r"c\.safetensors.*unexpected keys \['b'\]"):
        serialize.load_checkpoint(path, Holder({"w": np.ones((3, 2))}))
    with pytest.raises(SerializationError, match=r"c\.safetensors.*no optimizer state"):
        serialize.load_checkpoint(path, Holder({"w": np.ones((3, 2)), "b": np.ones(2)}), Holder())


def test_load_checkpoint_refuses_a_plain_tensor_file(tmp_path):
    save(tmp_path / "plain", {"model.w": np.ones(2)})
    with pytest.raises(SerializationError, match="plain.*not a t2i checkpoint"):
        serialize.load_checkpoint(tmp_path / "plain", Holder({"w": np.ones(2)}))


def test_load_checkpoint_leaves_the_model_alone_on_a_mismatch(tmp_path):
    path = tmp_path / "c"
    serialize.save_checkpoint(path, Holder({"w": np.ones((3, 2)), "b": np.ones(5)}))
    model = Holder({"w": np.zeros((3, 2)), "b": np.zeros(2)})
    with pytest.raises(SerializationError):
        serialize.load_checkpoint(path, model)
    assert np.array_equal(model.state["w"], np.zeros((3, 2)))  # checked before anything was loaded


def test_checkpoint_keys_that_spell_the_same_path_stay_apart(tmp_path):
    extra = {"a": {"b": np.ones(1)}, "a.b": np.zeros(1), "m": {"$items": 1, 3: np.full(1, 3.0), "3": np.full(1, 4.0)}}
    serialize.save_checkpoint(tmp_path / "c", Holder({}), extra=extra)
    assert_same(serialize.load_checkpoint(tmp_path / "c", Holder({}))["extra"], extra, "extra")


# --- checkpoints with the real engine: resuming equals never having stopped ----------------------

STEPS, STOP = 12, 5
DATA = [(np.random.default_rng(i).standard_normal((8, 4)).astype(np.float32),
         np.random.default_rng(100 + i).standard_normal((8, 1)).astype(np.float32)) for i in range(STEPS)]


def make_run(seed):
    """A dropout MLP (so the RNG matters), Adam with warmup+cosine, and an EMA; weights drawn from `seed`."""
    core.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
    opt = optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    sched = optim.WarmupCosine(opt, warmup_steps=3, total_steps=STEPS)
    ema = optim.EMA(model, decay=0.9)
    return model, opt, sched, ema


def train(run, steps):
    model, opt, sched, ema = run
    for i in steps:
        x, y = DATA[i]
        noise = core.randn(8, 1) * 0.01  # more draws from the default generator, between the dropout masks
        loss = F.mse_loss(model(core.tensor(x)), core.tensor(y) + noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        ema.update()


def snapshot(run):
    model, opt, sched, ema = run
    return ({k: v.numpy().copy() for k, v in model.state_dict().items()},
            {k: v.copy() for k, v in ema.state_dict()["shadow"].items()},
            sched.get_last_lr(), opt.state_dict())


def assert_bitwise_equal(a, b):
    (wa, ea, lra, oa), (wb, eb, lrb, ob) = a, b
    assert list(wa) == list(wb) and list(ea) == list(eb)
    for k in wa:
        assert wa[k].dtype == wb[k].dtype and np.array_equal(wa[k], wb[k]), f"weight {k}"
    for k in ea:
        assert np.array_equal(ea[k], eb[k]), f"ema {k}"
    assert lra == lrb
    assert_same(oa, ob, "optimizer")


def test_resume_equals_uninterrupted(tmp_path):
    straight = make_run(seed=0)
    train(straight, range(STEPS))

    first = make_run(seed=0)
    train(first, range(STOP))
    path = tmp_path / "ckpt.safetensors"
    serialize.save_checkpoint(path, first[0], first[1], step=STOP, scheduler=first[2], ema=first[3],
                              extra={"note": "halfway"})
    del first

    resumed = make_run(seed=1)  # fresh objects, other weights, the RNG elsewhere
    info = serialize.load_checkpoint(path, resumed[0], resumed[1], scheduler=resumed[2], ema=resumed[3])
    assert info == {"step": STOP, "extra": {"note": "halfway"}}
    train(resumed, range(info["step"], STEPS))

    assert_bitwise_equal(snapshot(resumed), snapshot(straight))


def test_resume_without_the_rng_state_diverges(tmp_path):
    """The control for the test above: the dropout masks do depend on the restored RNG state."""
    straight = make_run(seed=0)
    train(straight, range(STEPS))
    first = make_run(seed=0)
    train(first, range(STOP))
    serialize.save_checkpoint(tmp_path / "c", first[0], first[1], step=STOP, scheduler=first[2], ema=first[3])
    resumed = make_run(seed=1)
    serialize.load_checkpoint(tmp_path / "c", resumed[0], resumed[1], scheduler=resumed[2], ema=resumed[3])
    core.manual_seed(0)  # throw the restored RNG state away
    train(resumed, range(STOP, STEPS))
    ours, theirs = snapshot(resumed)[0], snapshot(straight)[0]
    assert not all(np.array_equal(ours[k], theirs[k]) for k in ours)


def test_checkpoint_file_holds_the_optimizer_state_as_entries(tmp_path):
    run = make_run(seed=0)
    train(run, range(2))
    path = tmp_path / "c"
    serialize.save_checkpoint(path, run[0], run[1], step=2, scheduler=run[2], ema=run[3])
    entries = load(path)
    assert {"model.0.weight", "model.0.bias", "model.3.weight", "model.3.bias"} <= set(entries)
    for i in range(4):
        assert f"optim.state.{i}.exp_avg" in entries and f"optim.state.{i}.exp_avg_sq" in entries
    meta = load_metadata(path)
    groups = json.loads(meta["optimizer"])["param_groups"]
    assert groups[0]["params"] == [0, 1, 2, 3] and json.loads(meta["step"]) == 2
    assert json.loads(meta["rng"])["bit_generator"]["bit_generator"] == "Philox"


def assert_load_changes_nothing(path, run, what):
    """Loading `path` into `run` fails on `what`, and leaves the weights, optimizer, schedule, EMA and RNG as they
    were (the parts before `what` fit, so a load that changes as it goes would have changed them)."""
    train(run, range(1))  # an optimizer state to keep
    before, rng = snapshot(run), core.random.get_rng_state()
    with pytest.raises(SerializationError, match=f"cannot load the {what} state"):
        serialize.load_checkpoint(path, run[0], run[1], scheduler=run[2], ema=run[3])
    assert_bitwise_equal(snapshot(run), before)
    assert core.random.get_rng_state() == rng


def test_an_optimizer_that_does_not_fit_changes_nothing(tmp_path):
    """The weights would fit; the optimizer has one param group where the file has two."""
    model = make_run(seed=0)[0]
    opt = optim.Adam([{"params": list(model[0].parameters())}, {"params": list(model[3].parameters())}], lr=1e-2)
    run = (model, opt, optim.WarmupCosine(opt, 3, STEPS), optim.EMA(model))
    train(run, range(2))
    serialize.save_checkpoint(tmp_path / "c", *run[:2], step=2, scheduler=run[2], ema=run[3])
    model, _, _, ema = make_run(seed=1)
    wrong = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert_load_changes_nothing(tmp_path / "c", (model, wrong, optim.WarmupCosine(wrong, 3, STEPS), ema), "optimizer")


def test_an_ema_that_does_not_fit_changes_nothing(tmp_path):
    """The weights, optimizer and schedule would fit; the EMA (of another model) does not."""
    run = make_run(seed=0)
    train(run, range(2))
    serialize.save_checkpoint(tmp_path / "c", run[0], run[1], step=2, scheduler=run[2], ema=run[3])
    model, opt, sched, _ = make_run(seed=1)
    assert_load_changes_nothing(tmp_path / "c", (model, opt, sched, optim.EMA(nn.Sequential(nn.Linear(4, 16)))), "ema")


def test_a_corrupted_rng_state_changes_nothing(tmp_path):
    save(tmp_path / "c", {"model.w": np.ones(2)},
         metadata={"format": serialize.CHECKPOINT_FORMAT, "step": "1", "rng": json.dumps({"seed": 0})})
    model, rng = Holder({"w": np.zeros(2)}), core.random.get_rng_state()
    with pytest.raises(SerializationError, match="corrupted checkpoint metadata"):
        serialize.load_checkpoint(tmp_path / "c", model)
    assert np.array_equal(model.state["w"], np.zeros(2)) and core.random.get_rng_state() == rng


def test_real_model_shape_mismatch_names_file_key_and_shapes(tmp_path):
    path = tmp_path / "small.safetensors"
    serialize.save_checkpoint(path, nn.Linear(4, 3))
    with pytest.raises(SerializationError,
                       match=r"small\.safetensors.*size mismatch for weight.*\(3, 4\).*\(5, 4\)"):
        serialize.load_checkpoint(path, nn.Linear(4, 5))


def test_buffers_round_trip(tmp_path):
    bn = nn.BatchNorm2d(3)
    bn(core.randn(4, 3, 2, 2))  # updates running stats and num_batches_tracked
    serialize.save_checkpoint(tmp_path / "bn", bn)
    other = nn.BatchNorm2d(3)
    serialize.load_checkpoint(tmp_path / "bn", other)
    for (k, a), (_, b) in zip(bn.state_dict().items(), other.state_dict().items()):
        assert a.dtype == b.dtype and np.array_equal(a.numpy(), b.numpy()), k
    assert int(other.num_batches_tracked.item()) == 1


def test_optimizer_mismatch_names_the_file(tmp_path):
    run = make_run(seed=0)
    train(run, range(1))
    serialize.save_checkpoint(tmp_path / "c.st", run[0], run[1])
    model = make_run(seed=0)[0]
    wrong = optim.Adam([model[0].weight], lr=1e-2)  # one parameter instead of four
    with pytest.raises(SerializationError, match=r"c\.st.*optimizer"):
        serialize.load_checkpoint(tmp_path / "c.st", model, wrong)
