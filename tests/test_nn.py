"""core.nn against torch.nn: names, shapes and reprs of the same architecture, default initializations
(statistically), state_dict round trips and errors, train/eval behaviour, and a small MLP that learns.

(Each module's forward and gradients against PyTorch are cases in core/verify/cases_nn.py.)
"""

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from scipy import stats

import core
import core.nn as nn
from core import functional as F
from core import init, optim


def arch(lib):
    """One model touching every layer, built the same way in core and torch."""
    n = lib.nn
    return n.Sequential(
        n.Conv2d(3, 4, 3, padding=1),
        n.BatchNorm2d(4),
        n.GroupNorm(2, 4),
        n.SiLU(),
        n.Conv2d(4, 4, 3, stride=2, padding="valid", dilation=1, groups=2, bias=False, padding_mode="zeros"),
        n.ConvTranspose2d(4, 2, 4, stride=2, padding=1, output_padding=0),
        n.Conv2d(2, 2, 3, padding="same", padding_mode="reflect"),
        n.Flatten(),
        n.Linear(2 * 4 * 4, 8),
        n.LayerNorm(8),
        n.GELU(approximate="tanh"),
        n.Dropout(0.25),
        n.ModuleList([n.Linear(8, 8) for _ in range(3)] + [n.ReLU(), n.Tanh(), n.Sigmoid(), n.LeakyReLU(0.2)]),
        n.ModuleDict({"emb": n.Embedding(10, 8, padding_idx=0), "attn": n.MultiheadAttention(8, 2),
                      "id": n.Identity(), "ln": n.LayerNorm([2, 4], elementwise_affine=False)}),
        n.BatchNorm2d(3, momentum=None, affine=False, track_running_stats=False),
    )


def run(model, x):
    """The chain part of arch (the containers at its end are not a chain)."""
    for i in range(12):
        x = model[i](x)
    return x


def shapes(pairs):
    return [(k, tuple(v.shape)) for k, v in pairs]


# --- structure ------------------------------------------------------------------------------------


def test_names_shapes_and_counts_equal_torch():
    ours, ref = arch(core), arch(torch)
    assert shapes(ours.named_parameters()) == shapes(ref.named_parameters())
    assert shapes(ours.named_buffers()) == shapes(ref.named_buffers())
    assert shapes(ours.state_dict().items()) == shapes(ref.state_dict().items())
    assert [k for k, _ in ours.named_modules()] == [k for k, _ in ref.named_modules()]
    assert [k for k, _ in ours.named_children()] == [k for k, _ in ref.named_children()]
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    assert len(list(ours.modules())) == len(list(ref.modules()))


def test_repr_equals_torch():
    assert repr(arch(core)) == repr(arch(torch))
    assert repr(nn.Linear(3, 4, bias=False)) == "Linear(in_features=3, out_features=4, bias=False)"
    assert repr(nn.ModuleList()) == repr(torch.nn.ModuleList())
    assert repr(nn.Sequential()) == repr(torch.nn.Sequential())


def test_parameter():
    p = nn.Parameter([1.0, 2.0])
    assert isinstance(p, core.Tensor) and p.requires_grad and p.dtype == np.float32 and p.is_leaf
    t = core.tensor(np.ones(3))
    q = nn.Parameter(t)
    assert q.dtype == np.float64 and q.data is t.data  # shares the array, keeps the dtype
    assert repr(nn.Parameter([1.0])).startswith("Parameter containing:\ntensor(")
    assert not nn.Parameter(np.zeros(2), requires_grad=False).requires_grad
    assert nn.Parameter().shape == (0,)
    assert type(p * 2) is core.Tensor  # ops make plain tensors


def test_registration_rules():
    m = nn.Module()
    m.w = nn.Parameter(np.zeros(2))
    m.child = nn.Linear(2, 2)
    m.register_buffer("stat", core.zeros(2))
    m.register_buffer("scratch", core.zeros(3), persistent=False)
    m.plain = 5
    assert [k for k, _ in m.named_parameters()] == ["w", "child.weight", "child.bias"]
    assert [k for k, _ in m.named_buffers()] == ["stat", "scratch"]
    assert list(m.state_dict()) == ["w", "stat", "child.weight", "child.bias"]  # own first, non-persistent out
    with pytest.raises(TypeError, match="parameter 'w'"):
        m.w = core.zeros(2)
    with pytest.raises(TypeError, match="buffer 'stat'"):
        m.stat = 3
    with pytest.raises(KeyError, match="already exists"):
        m.register_buffer("plain", core.zeros(1))
    with pytest.raises(KeyError, match="'.'"):
        m.register_parameter("a.b", None)
    m.w = None  # a declared-but-absent parameter
    assert m.w is None and [k for k, _ in m.named_parameters()] == ["child.weight", "child.bias"]
    m.child = nn.ReLU()  # a module replaces a module
    assert list(m.state_dict()) == ["stat"]
    del m.stat
    assert list(m.state_dict()) == []
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        m.nope  # noqa: B018


def test_shared_parameters_counted_once():
    lin = nn.Linear(2, 2)
    m = nn.Sequential(lin, nn.ReLU(), lin)
    assert len(list(m.parameters())) == 2 and [k for k, _ in m.named_parameters()] == ["0.weight", "0.bias"]
    ref_lin = torch.nn.Linear(2, 2)
    ref = torch.nn.Sequential(ref_lin, torch.nn.ReLU(), ref_lin)
    assert list(m.state_dict()) == list(ref.state_dict())  # state_dict keeps every path


def test_containers():
    seq = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    seq.append(nn.Linear(3, 1))
    assert len(seq) == 3 and isinstance(seq[-1], nn.Linear) and isinstance(seq[1], nn.ReLU)
    assert [type(m).__name__ for m in seq] == ["Linear", "ReLU", "Linear"]
    sub = seq[1:]
    assert isinstance(sub, nn.Sequential) and list(sub._modules) == ["1", "2"]  # keys kept, as PyTorch
    with pytest.raises(IndexError):
        seq[3]
    x = core.randn(4, 2)
    assert np.allclose(seq(x).numpy(), seq[2](seq[1](seq[0](x))).numpy())
    named = nn.Sequential(OrderedDict([("fc", nn.Linear(2, 2)), ("act", nn.Tanh())]))
    assert [k for k, _ in named.named_parameters()] == ["fc.weight", "fc.bias"]
    ml = nn.ModuleList([nn.ReLU(), nn.Tanh()])
    ml.append(nn.Sigmoid())
    ml.insert(0, nn.Identity())
    del ml[1]
    assert [type(m).__name__ for m in ml] == ["Identity", "Tanh", "Sigmoid"] and list(ml._modules) == ["0", "1", "2"]
    md = nn.ModuleDict({"a": nn.Linear(1, 1)})
    md["b"] = nn.Linear(1, 2)
    assert "a" in md and list(md) == ["a", "b"] and len(md) == 2
    assert [k for k, _ in md.named_parameters()] == ["a.weight", "a.bias", "b.weight", "b.bias"]


@pytest.mark.parametrize("make, idx", [
    (lambda n: n.Sequential(n.Linear(2, 2), n.ReLU(), n.Tanh()), 0),
    (lambda n: n.Sequential(n.ReLU(), n.Linear(2, 3)), 0),
    (lambda n: n.Sequential(n.Linear(2, 2), n.ReLU(), n.Tanh(), n.Linear(2, 3)), slice(1, 3)),
    (lambda n: n.Sequential(n.Linear(2, 2), n.ReLU(), n.Tanh(), n.Linear(2, 3)), -2),
    (lambda n: n.Sequential(OrderedDict([("fc", n.Linear(2, 2)), ("act", n.Tanh()), ("out", n.Linear(2, 1))])), 1),
], ids=["first", "before-a-linear", "slice", "negative", "named"])
def test_sequential_del_renumbers_as_torch(make, idx):
    """del renumbers the keys 0..n-1 as torch does, so a later append adds a module instead of replacing one."""
    ours, ref = make(nn), make(torch.nn)
    del ours[idx]
    del ref[idx]
    assert list(ours._modules) == list(ref._modules)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.append(nn.Sigmoid())
    ref.append(torch.nn.Sigmoid())
    assert [type(m).__name__ for m in ours] == [type(m).__name__ for m in ref]
    assert list(ours.state_dict()) == list(ref.state_dict())


@pytest.mark.parametrize("op", [
    lambda n: n.Sequential(n.Linear(1, 1), n.Linear(2, 1), n.Linear(3, 1)).insert(1, n.ReLU()),
    lambda n: n.Sequential(n.Linear(1, 1), n.Linear(2, 1), n.Linear(3, 1)).insert(-1, n.ReLU()),
    lambda n: n.Sequential(n.Linear(1, 1), n.Linear(2, 1)).insert(2, n.ReLU()),
    lambda n: (lambda s: (s.pop(-2), s)[1])(n.Sequential(n.Linear(1, 1), n.Linear(2, 1), n.Linear(3, 1))),
    lambda n: n.Sequential(n.Linear(1, 1), n.ReLU()) + n.Sequential(n.Linear(2, 1)),
    lambda n: (lambda m: (m.pop(1), m)[1])(n.ModuleList([n.Linear(1, 1), n.Linear(2, 1), n.Linear(3, 1)])),
    lambda n: n.ModuleList([n.Linear(1, 1)]) + n.ModuleList([n.ReLU(), n.Linear(2, 1)]),
    lambda n: (lambda d: (d.clear(), d.update({"b": n.ReLU()}), d)[2])(n.ModuleDict({"a": n.Linear(1, 1)})),
], ids=["seq-insert", "seq-insert-negative", "seq-insert-end", "seq-pop", "seq-add", "list-pop", "list-add",
        "dict-clear"])
def test_container_insert_pop_add_clear_as_torch(op):
    ours, ref = op(nn), op(torch.nn)
    assert type(ours).__name__ == type(ref).__name__
    assert [(k, type(m).__name__) for k, m in ours._modules.items()] == [
        (k, type(m).__name__) for k, m in ref._modules.items()]
    assert list(ours.state_dict()) == list(ref.state_dict())
    with pytest.raises(IndexError, match="index 3 is out of range"):
        nn.Sequential(nn.ReLU(), nn.ReLU()).insert(3, nn.ReLU())
    with pytest.raises(TypeError, match="should be a Module, got int"):
        nn.Sequential().insert(0, 1)
    with pytest.raises(ValueError, match="only objects of Sequential class"):
        nn.Sequential() + nn.ModuleList()


def test_apply_zero_grad_requires_grad():
    m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    seen = []
    m.apply(lambda mod: seen.append(type(mod).__name__))
    assert seen == ["Linear", "Linear", "Sequential"]  # children first, as PyTorch
    m(core.randn(3, 2)).sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    m.zero_grad(set_to_none=False)
    assert all(np.all(p.grad == 0) for p in m.parameters())
    m.zero_grad()
    assert all(p.grad is None for p in m.parameters())
    m.requires_grad_(False)
    assert not any(p.requires_grad for p in m.parameters())


def test_to_converts_in_place_and_keeps_int_buffers():
    m = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm2d(3))
    params = list(m.parameters())
    assert all(p.dtype == np.float32 for p in params)
    assert m.double() is m
    assert [id(p) for p in m.parameters()] == [id(p) for p in params]  # the same objects: optimizers keep working
    assert all(p.dtype == np.float64 for p in m.parameters())
    assert m[1].running_mean.dtype == np.float64 and m[1].num_batches_tracked.dtype == np.int64
    m.to(core.float32)
    assert all(p.dtype == np.float32 for p in m.parameters())
    m.to("cpu", dtype=np.float64)
    assert m[0].weight.dtype == np.float64
    assert nn.Linear(2, 2, dtype=core.float64).weight.dtype == np.float64
    with pytest.raises(TypeError, match="floating"):
        m.to(np.int64)


# --- initialization -------------------------------------------------------------------------------


def uniform_ok(a, bound):
    """All inside [-bound, bound], reaching near the ends, mean and variance within 5σ of U(-b, b)'s."""
    a = a.astype(np.float64).ravel()
    n = a.size
    assert np.all(np.abs(a) <= bound)
    assert np.abs(a).max() > bound * (1 - 20 / n)  # P(max |x| < b(1 - 20/n)) ≈ e^-20
    var = bound**2 / 3
    assert abs(a.mean()) < 5 * math.sqrt(var / n)
    assert abs(a.var() - var) < 5 * math.sqrt((bound**4 / 5 - var**2) / n)  # Var of the sample variance


def normal_ok(a, std, mean=0.0):
    a = a.astype(np.float64).ravel()
    n = a.size
    assert abs(a.mean() - mean) < 5 * std / math.sqrt(n)
    assert abs(a.var() - std**2) < 5 * std**2 * math.sqrt(2 / n)


def test_linear_and_conv_default_init():
    core.manual_seed(0)
    lin = nn.Linear(400, 300)
    uniform_ok(lin.weight.data, 1 / math.sqrt(400))  # kaiming_uniform_(a=√5) → bound 1/√fan_in
    uniform_ok(lin.bias.data, 1 / math.sqrt(400))
    conv = nn.Conv2d(24, 60, 5, groups=2)
    fan_in = 12 * 25
    uniform_ok(conv.weight.data, 1 / math.sqrt(fan_in))
    assert np.all(np.abs(conv.bias.data) <= 1 / math.sqrt(fan_in))
    convt = nn.ConvTranspose2d(60, 24, 4)
    fan_in = 24 * 16  # PyTorch computes fan_in from the weight (C_in, C_out, k, k): dim 1 · k²
    uniform_ok(convt.weight.data, 1 / math.sqrt(fan_in))


def test_embedding_norm_and_mha_init():
    core.manual_seed(1)
    emb = nn.Embedding(1000, 64, padding_idx=3)
    assert np.all(emb.weight.data[3] == 0)
    normal_ok(np.delete(emb.weight.data, 3, axis=0), 1.0)
    for m in (nn.LayerNorm(7), nn.GroupNorm(1, 7), nn.BatchNorm2d(7)):
        assert np.all(m.weight.data == 1) and np.all(m.bias.data == 0)
    bn = nn.BatchNorm2d(7)
    assert np.all(bn.running_mean.data == 0) and np.all(bn.running_var.data == 1)
    assert bn.num_batches_tracked.item() == 0 and bn.num_batches_tracked.dtype == np.int64
    mha = nn.MultiheadAttention(64, 4)
    uniform_ok(mha.in_proj_weight.data, math.sqrt(6 / (64 + 3 * 64)))  # xavier on the stacked (3E, E)
    assert np.all(mha.in_proj_bias.data == 0) and np.all(mha.out_proj.bias.data == 0)
    uniform_ok(mha.out_proj.weight.data, 1 / math.sqrt(64))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("max_norm, norm_type, padding_idx", [(1.0, 2.0, None), (0.5, 1.0, 0), (1.5, math.inf, 2)])
def test_embedding_max_norm_equals_torch(dtype, max_norm, norm_type, padding_idx):
    # PyTorch's positional order (padding_idx, max_norm, norm_type, ...): looked-up rows are renormed in place
    rng = np.random.default_rng(0)
    w = rng.standard_normal((7, 4)).astype(dtype)
    ours = nn.Embedding(7, 4, padding_idx, max_norm, norm_type, _weight=w.copy())
    ref = torch.nn.Embedding(7, 4, padding_idx, max_norm, norm_type, _weight=torch.from_numpy(w.copy()))
    assert repr(ours) == repr(ref)
    for _ in range(3):
        idx = rng.integers(0, 7, (2, 5))
        g = rng.standard_normal((2, 5, 4)).astype(dtype)
        out, ref_out = ours(core.tensor(idx)), ref(torch.from_numpy(idx))
        (out * core.tensor(g)).sum().backward()
        (ref_out * torch.from_numpy(g)).sum().backward()
        np.testing.assert_array_equal(out.numpy(), ref_out.detach().numpy())
        np.testing.assert_array_equal(ours.weight.numpy(), ref.weight.detach().numpy())
        np.testing.assert_array_equal(ours.weight.grad, ref.weight.grad.numpy())
        ours.weight.data -= 0.3 * ours.weight.grad  # move some rows back over max_norm
        with torch.no_grad():
            ref.weight -= 0.3 * ref.weight.grad
        ours.weight.grad = ref.weight.grad = None
    before = ours.weight.numpy().copy()
    with pytest.raises(IndexError, match="index -1 is out of range"):
        ours(core.tensor(np.array([-1, 0])))
    np.testing.assert_array_equal(ours.weight.numpy(), before)  # a bad index renorms nothing


def test_embedding_from_pretrained_and_unsupported_options():
    table = core.tensor(np.arange(6.0).reshape(3, 2))
    frozen = nn.Embedding.from_pretrained(table)
    assert frozen.weight.data is table.data and not frozen.weight.requires_grad  # shared, as in PyTorch
    trained = nn.Embedding.from_pretrained(table, freeze=False, padding_idx=1)
    assert trained.weight.requires_grad and trained.weight.data[1].tolist() == [2.0, 3.0]  # not zeroed
    with pytest.raises(ValueError, match=r"_weight of shape \(2, 2\)"):
        nn.Embedding(3, 2, _weight=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="must be 2-d"):
        nn.Embedding.from_pretrained(np.zeros(3))
    with pytest.raises(NotImplementedError, match="scale_grad_by_freq=True"):
        nn.Embedding(3, 2, scale_grad_by_freq=True)


def test_init_functions():
    g = core.random.Generator(7)
    w = core.zeros(300, 200, dtype=np.float64)
    uniform_ok(init.xavier_uniform_(w, gain=2.0, generator=g).data, 2.0 * math.sqrt(6 / 500))
    normal_ok(init.xavier_normal_(w, generator=g).data, math.sqrt(2 / 500))
    std = init.calculate_gain("leaky_relu", 0.2) / math.sqrt(200)
    normal_ok(init.kaiming_normal_(w, a=0.2, generator=g).data, std)
    normal_ok(init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu", generator=g).data, math.sqrt(2 / 300))
    uniform_ok(init.kaiming_uniform_(w, nonlinearity="relu", generator=g).data, math.sqrt(6 / 200))
    uniform_ok(init.uniform_(w, -3.0, 3.0, generator=g).data + 0.0, 3.0)
    normal_ok(init.normal_(w, 2.0, 0.5, generator=g).data, 0.5, mean=2.0)
    assert np.all(init.constant_(w, 0.25).data == 0.25) and np.all(init.ones_(w).data == 1)
    assert np.all(init.zeros_(w).data == 0)
    with pytest.raises(ValueError, match="fewer than 2 dimensions"):
        init.xavier_uniform_(core.zeros(3))
    with pytest.raises(ValueError, match="Mode"):
        init.kaiming_uniform_(w, mode="fan_avg")


@pytest.mark.parametrize("a,b,mean,std", [(-2.0, 2.0, 0.0, 1.0), (0.5, 1.0, 0.0, 0.2), (-0.04, 0.04, 0.0, 0.02)])
def test_trunc_normal_matches_the_truncated_distribution(a, b, mean, std):
    w = core.zeros(20000, dtype=np.float64)
    x = init.trunc_normal_(w, mean, std, a, b, generator=core.random.Generator(3)).data
    assert x.min() >= a and x.max() <= b
    ref = stats.truncnorm((a - mean) / std, (b - mean) / std, loc=mean, scale=std)
    assert stats.kstest(x, ref.cdf).pvalue > 1e-4


def test_gain_and_fans_equal_torch():
    for nl, param in [("linear", None), ("conv2d", None), ("sigmoid", None), ("tanh", None), ("relu", None),
                      ("leaky_relu", None), ("leaky_relu", 0.3), ("selu", None)]:
        assert init.calculate_gain(nl, param) == torch.nn.init.calculate_gain(nl, param)
    for shape in [(3, 4), (5, 2, 3, 3), (2, 7, 1, 4)]:
        assert init._calculate_fan_in_and_fan_out(core.zeros(*shape)) == \
            torch.nn.init._calculate_fan_in_and_fan_out(torch.zeros(shape))
    with pytest.raises(ValueError, match="nonlinearity"):
        init.calculate_gain("swish")


def test_init_is_reproducible_and_in_place():
    core.manual_seed(5)
    a = nn.Linear(5, 5).weight.numpy().copy()
    core.manual_seed(5)
    lin = nn.Linear(5, 5)
    assert np.array_equal(a, lin.weight.numpy())
    w, data = lin.weight, lin.weight.data
    lin.reset_parameters()
    assert lin.weight is w and lin.weight.data is data and not np.array_equal(a, data)


# --- state_dict -----------------------------------------------------------------------------------


def test_state_dict_round_trip():
    core.manual_seed(0)
    a, b = arch(core), arch(core)
    a[1].running_mean.data[:] = [1, 2, 3, 4]
    a[1].num_batches_tracked.data[...] = 7
    x = core.randn(2, 3, 6, 6)
    a.eval(), b.eval()
    assert not np.allclose(run(a, x).numpy(), run(b, x).numpy())
    result = b.load_state_dict(a.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert np.array_equal(run(a, x).numpy(), run(b, x).numpy())
    assert b[1].num_batches_tracked.item() == 7
    # the values are copied, not shared
    a[0].weight.data[...] = 0
    assert not np.all(b[0].weight.data == 0)


def test_load_state_dict_accepts_arrays_and_keeps_dtype():
    m = nn.Linear(3, 2)
    w = np.arange(6, dtype=np.float64).reshape(2, 3)
    weight = m.weight
    m.load_state_dict({"weight": w, "bias": core.tensor([1.0, 2.0], dtype=np.float64)})
    assert m.weight is weight and m.weight.dtype == np.float32 and np.array_equal(m.weight.numpy(), w)
    assert np.array_equal(m.bias.numpy(), [1.0, 2.0])


def test_load_torch_weights_gives_torch_outputs():
    ref = arch(torch).double().eval()
    ours = arch(core).double().eval()
    ours.load_state_dict(ref.state_dict())  # torch tensors are accepted directly
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6))
    out, ref_out = run(ours, core.tensor(x)), run(ref, torch.from_numpy(x))
    np.testing.assert_allclose(out.numpy(), ref_out.detach().numpy(), rtol=1e-10, atol=1e-12)


def test_load_state_dict_errors():
    m = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm2d(2))
    good = {k: v.numpy().copy() for k, v in m.state_dict().items()}
    before = m[0].weight.numpy().copy()

    missing = dict(good)
    del missing["0.bias"], missing["1.running_var"]
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "0.bias", "1.running_var"'):
        m.load_state_dict(missing)
    result = m.load_state_dict(missing, strict=False)
    assert result.missing_keys == ["0.bias", "1.running_var"] and result.unexpected_keys == []

    extra = dict(good, **{"2.weight": np.zeros(1), "0.scale": np.zeros(1)})
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "2.weight", "0.scale"'):
        m.load_state_dict(extra)
    assert m.load_state_dict(extra, strict=False).unexpected_keys == ["2.weight", "0.scale"]

    wrong = dict(good, **{"0.weight": np.ones((3, 3))})
    for strict in (True, False):  # a shape mismatch is always an error
        with pytest.raises(RuntimeError, match=r"size mismatch for 0.weight: .*\(3, 3\).*\(2, 3\)"):
            m.load_state_dict(wrong, strict=strict)
    assert np.array_equal(m[0].weight.numpy(), before)  # nothing was copied from a failed load
    with pytest.raises(TypeError, match="Expected state_dict to be dict-like, got <class 'list'>"):
        m.load_state_dict(list(good.items()))  # not reported as every key missing


def test_batchnorm_num_batches_tracked_optional_in_old_state_dicts():
    # torch treats a state_dict without version metadata (a plain dict, an old checkpoint) as saved before
    # BatchNorm had num_batches_tracked: its absence is not a missing key, and the current count is kept
    ours = nn.Sequential(nn.Linear(1, 1), nn.BatchNorm2d(2))
    ref = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.BatchNorm2d(2))
    ours[1].num_batches_tracked.data[...] = 5
    ref[1].num_batches_tracked += 5
    plain = {k: v for k, v in ref.state_dict().items() if k != "1.num_batches_tracked"}
    assert ours.load_state_dict(plain) == ref.load_state_dict(plain) == ([], [])
    assert ours[1].num_batches_tracked.item() == ref[1].num_batches_tracked.item() == 5
    versioned = ref.state_dict()  # its _metadata says version 2: the key is then required
    del versioned["1.num_batches_tracked"]
    for m in (ours, ref):
        with pytest.raises(RuntimeError, match='Missing key.*"1.num_batches_tracked"'):
            m.load_state_dict(versioned)


def test_unexpected_keys_listed_module_by_module_as_torch():
    # torch lists unexpected keys in the order it visits modules, not in the state_dict's order
    ours = nn.Sequential(nn.Linear(1, 1), nn.Sequential(nn.Linear(1, 1)))
    ref = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.Sequential(torch.nn.Linear(1, 1)))
    extra = {k: torch.zeros(1) for k in ["1.0.a", "1.b", "0.c", "d", "1.0.weight.e", "5.f"]}
    got = ours.load_state_dict(dict(ref.state_dict(), **extra), strict=False)
    want = ref.load_state_dict(dict(ref.state_dict(), **extra), strict=False)
    assert got.unexpected_keys == want.unexpected_keys == ["d", "5.f", "0.c", "1.b", "1.0.a", "1.0.weight.e"]
    with pytest.raises(RuntimeError, match='Unexpected key.*: "d", "5.f", "0.c", "1.b", "1.0.a", "1.0.weight.e". '):
        ours.load_state_dict(dict(ref.state_dict(), **extra))


# --- train / eval ---------------------------------------------------------------------------------


def test_train_eval_switches_dropout():
    m = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    assert m.training and m[1].training
    x = core.ones(1000, 4)
    h = m[0](x).numpy()
    y = m(x).numpy()
    dropped = (y == 0) & (h != 0)
    assert 0.45 < dropped.mean() < 0.55  # 4000 draws: 5σ ≈ 0.04
    np.testing.assert_allclose(y[~dropped], 2 * h[~dropped], rtol=1e-6)
    assert m.eval() is m and not m.training and not m[1].training
    assert np.array_equal(m(x).numpy(), h)
    with pytest.raises(ValueError, match="boolean"):
        m.train("yes")


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_running_stats_equal_torch(momentum):
    rng = np.random.default_rng(0)
    ours = nn.BatchNorm2d(3, momentum=momentum, dtype=core.float64)
    ref = torch.nn.BatchNorm2d(3, momentum=momentum, dtype=torch.float64)
    for _ in range(3):
        x = rng.standard_normal((4, 3, 2, 5)) * 3 + 1
        np.testing.assert_allclose(ours(core.tensor(x)).numpy(), ref(torch.from_numpy(x)).detach().numpy(),
                                   rtol=1e-10, atol=1e-12)
    for name, t in ref.state_dict().items():
        np.testing.assert_allclose(ours.state_dict()[name].numpy(), t.numpy(), rtol=1e-12, err_msg=name)
    ours.eval(), ref.eval()
    x = rng.standard_normal((2, 3, 2, 2))
    y = ours(core.tensor(x)).numpy()
    np.testing.assert_allclose(y, ref(torch.from_numpy(x)).detach().numpy(), rtol=1e-10, atol=1e-12)
    assert ours.num_batches_tracked.item() == 3  # eval does not count
    # eval uses the running statistics: a batch of one sample is normalized the same way
    np.testing.assert_allclose(ours(core.tensor(x[:1])).numpy(), y[:1], rtol=1e-12)
    with pytest.raises(ValueError, match="4D"):
        ours(core.zeros(3, 3, dtype=np.float64))


def test_mha_paths_agree_and_validate():
    core.manual_seed(0)
    m = nn.MultiheadAttention(8, 2, batch_first=True)
    x = core.randn(2, 5, 8)
    causal = core.tensor(np.triu(np.ones((5, 5), dtype=bool), 1))
    o1, w = m(x, x, x, attn_mask=causal)
    o2, none = m(x, x, x, attn_mask=causal, need_weights=False, is_causal=True)
    assert none is None and w.shape == (2, 5, 5)
    np.testing.assert_allclose(o1.numpy(), o2.numpy(), rtol=1e-5, atol=1e-6)
    assert np.allclose(np.triu(w.numpy()[0], 1), 0)  # causal: no weight on the future
    _, per_head = m(x, x, x, average_attn_weights=False)
    assert per_head.shape == (2, 2, 5, 5)
    with pytest.raises(RuntimeError, match="is_causal"):
        m(x, x, x, is_causal=True)
    with pytest.raises(ValueError, match="divisible"):
        nn.MultiheadAttention(6, 4)
    with pytest.raises(RuntimeError, match="key_padding_mask"):
        m(x, x, x, key_padding_mask=core.tensor(np.zeros((2, 4), dtype=bool)))


def test_module_validation():
    with pytest.raises(ValueError, match="divisible by groups"):
        nn.Conv2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="strided"):
        nn.Conv2d(3, 3, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="padding_mode"):
        nn.Conv2d(3, 3, 3, padding_mode="mirror")
    with pytest.raises(ValueError, match="divisible by num_groups"):
        nn.GroupNorm(3, 4)
    with pytest.raises(ValueError, match="num_groups must be a positive integer, got 0"):
        nn.GroupNorm(0, 4)  # not a ZeroDivisionError
    with pytest.raises(ValueError, match="dropout probability"):
        nn.Dropout(1.5)
    with pytest.raises(ValueError, match="output size"):
        nn.ConvTranspose2d(1, 1, 3, stride=2)(core.zeros(1, 1, 4, 4), output_size=(20, 20))
    with pytest.raises(NotImplementedError):
        nn.Module()(core.zeros(1))


# --- a small MLP learns ---------------------------------------------------------------------------


def test_small_mlp_trains():
    """Two interleaved spirals-lite (XOR of the signs): not linearly separable, an MLP gets it."""
    core.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (256, 2)).astype(np.float32)
    y = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).astype(np.int64)
    model = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    opt = optim.Adam(model.parameters(), lr=1e-2)
    xs, ys = core.tensor(x), core.tensor(y)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = F.cross_entropy(model(xs), ys)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    accuracy = (model(xs).numpy().argmax(1) == y).mean()
    assert losses[-1] < 0.25 * losses[0] and accuracy > 0.9, (losses[0], losses[-1], accuracy)


def test_deepcopy_keeps_structure_and_sharing():
    import copy

    lin = nn.Linear(2, 2)
    m = nn.Sequential(lin, nn.BatchNorm2d(2), lin)
    c = copy.deepcopy(m)  # e.g. a frozen EMA copy of a model
    assert c[0] is c[2] and c[0].weight is not lin.weight and isinstance(c[0].weight, nn.Parameter)
    assert list(c.state_dict()) == list(m.state_dict())
    c[0].weight.data[...] = 0
    assert not np.all(lin.weight.data == 0)


def test_conv_modules_expand_one_element_sequences_like_pytorch():
    """nn.Conv2d(2, 3, 3, padding=(1,), stride=[2]) computes PyTorch's Conv2d(2, 3, 3, padding=1, stride=2) (PyTorch
    keeps the one-element sequences as attributes and F.conv2d expands them; ours are stored expanded)."""
    import torch

    m = nn.Conv2d(2, 3, 3, padding=(1,), stride=[2]).double()
    assert (m.kernel_size, m.padding, m.stride) == ((3, 3), (1, 1), (2, 2))
    t = torch.nn.Conv2d(2, 3, 3, padding=(1,), stride=[2]).double()
    with torch.no_grad():
        t.weight.copy_(torch.from_numpy(m.weight.numpy()))
        t.bias.copy_(torch.from_numpy(m.bias.numpy()))
    x = np.random.default_rng(0).standard_normal((1, 2, 5, 5))
    np.testing.assert_allclose(m(core.tensor(x)).numpy(), t(torch.from_numpy(x)).detach().numpy(), rtol=1e-12)
    assert nn.ConvTranspose2d(2, 3, 3, output_padding=(1,), stride=2).output_padding == (1, 1)
