"""core.optim against torch.optim: the same float64 model and data give the same weights after N steps
(to 1e-10), clipping equals torch's, a state_dict round trip continues exactly, schedules and EMA math."""

import math

import numpy as np
import pytest
import torch

import core
import core.nn as nn
from core import functional as F
from core import optim

N = 20
RNG = np.random.default_rng(0)
X, Y = RNG.standard_normal((16, 4)), RNG.standard_normal((16, 3))


def models():
    """The same float64 MLP in both libraries (core's weights copied from torch's)."""
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    ours = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def groups(params, split):
    """One group, or two (weights with the given options; biases without weight decay, a smaller lr)."""
    params = list(params)
    if not split:
        return params
    return [{"params": params[0::2]}, {"params": params[1::2], "weight_decay": 0.0, "lr": 0.01}]


def train_ours(model, opt, steps, sched=None):
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(core.tensor(X)), core.tensor(Y)).backward()
        opt.step()
        if sched is not None:
            sched.step()


def train_ref(model, opt, steps):
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(torch.from_numpy(X)), torch.from_numpy(Y)).backward()
        opt.step()


CONFIGS = [
    ("SGD", dict(lr=0.1), False),
    ("SGD", dict(lr=0.1, momentum=0.9), False),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.3), False),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True), False),
    ("SGD", dict(lr=0.1, momentum=0.5, weight_decay=0.1), True),
    ("SGD", dict(lr=0.01, weight_decay=0.01, maximize=True), False),
    ("Adam", dict(lr=0.05), False),
    ("Adam", dict(lr=0.05, betas=(0.8, 0.99), eps=1e-6, amsgrad=True), False),
    ("Adam", dict(lr=0.05, weight_decay=0.1), True),
    ("Adam", dict(lr=0.01, weight_decay=0.1, amsgrad=True, maximize=True), False),
    ("AdamW", dict(lr=0.05), False),
    ("AdamW", dict(lr=0.05, weight_decay=0.3, amsgrad=True), True),
]


@pytest.mark.parametrize("name,kwargs,split", CONFIGS, ids=[f"{n}-{k}-{s}" for n, k, s in CONFIGS])
def test_same_weights_as_torch(name, kwargs, split):
    ours, ref = models()
    opt = getattr(optim, name)(groups(ours.parameters(), split), **kwargs)
    ref_opt = getattr(torch.optim, name)(groups(ref.parameters(), split), foreach=False, **kwargs)
    train_ours(ours, opt, N)
    train_ref(ref, ref_opt, N)
    moved = 0.0
    for (key, ref_p), (_, p0) in zip(ref.state_dict().items(), models()[1].state_dict().items()):
        np.testing.assert_allclose(ours.state_dict()[key].numpy(), ref_p.numpy(), rtol=0, atol=1e-10, err_msg=key)
        moved = max(moved, float((ref_p - p0).abs().max()))
    assert moved > 1e-3  # the comparison is not between two untouched models
    # the optimizer state matches too
    ref_state = ref_opt.state_dict()["state"]
    for i, state in opt.state_dict()["state"].items():
        for k, v in state.items():
            expected = ref_state[i][k]
            np.testing.assert_allclose(np.asarray(v, dtype=np.float64), np.asarray(expected, dtype=np.float64),
                                       rtol=0, atol=1e-10, err_msg=f"state {i} {k}")


def test_adam_first_step_by_hand():
    """Step 1 of Adam moves each weight by lr·g/(|g| + ε·…) ≈ lr·sign(g): the bias correction at work."""
    p = nn.Parameter(np.array([1.0, -2.0, 3.0]))
    p.grad = np.array([0.5, -1e-3, 2.0])
    opt = optim.Adam([p], lr=0.1, eps=1e-8)
    opt.step()
    expected = np.array([1.0, -2.0, 3.0]) - 0.1 * p.grad / (np.abs(p.grad) + 1e-8)
    np.testing.assert_allclose(p.data, expected, rtol=1e-12)
    assert opt.state[p]["step"] == 1


def test_adamw_decay_is_decoupled():
    """With a zero gradient, Adam's coupled decay still moves by lr·sign(p), AdamW by lr·wd·p."""
    p, q = nn.Parameter(np.array([2.0])), nn.Parameter(np.array([2.0]))
    p.grad, q.grad = np.zeros(1), np.zeros(1)
    optim.AdamW([p], lr=0.1, weight_decay=0.5).step()
    optim.Adam([q], lr=0.1, weight_decay=0.5).step()
    np.testing.assert_allclose(p.data, 2.0 * (1 - 0.1 * 0.5), rtol=1e-15)
    np.testing.assert_allclose(q.data, 2.0 - 0.1, rtol=1e-6)


def test_params_without_grad_are_skipped_and_zero_grad():
    a, b = nn.Parameter(np.ones(2)), nn.Parameter(np.ones(2))
    a.grad = np.ones(2)
    opt = optim.SGD([a, b], lr=0.5, momentum=0.9)
    opt.step()
    assert np.array_equal(a.data, [0.5, 0.5]) and np.array_equal(b.data, [1.0, 1.0]) and b not in opt.state
    opt.zero_grad(set_to_none=False)
    assert np.array_equal(a.grad, [0.0, 0.0])
    opt.zero_grad()
    assert a.grad is None


# --- clip_grad_norm_ ------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf])
@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_grad_norm_equals_torch(norm_type, max_norm):
    rng = np.random.default_rng(1)
    grads = [rng.standard_normal(s) for s in [(3, 4), (5,), (2, 2, 2)]]
    ours = [nn.Parameter(np.zeros(g.shape)) for g in grads]
    ref = [torch.zeros(g.shape, dtype=torch.float64, requires_grad=True) for g in grads]
    for p, r, g in zip(ours, ref, grads):
        p.grad, r.grad = g.copy(), torch.from_numpy(g.copy())
    total = optim.clip_grad_norm_(ours, max_norm, norm_type)
    ref_total = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type, foreach=False)
    np.testing.assert_allclose(total.item(), ref_total.item(), rtol=1e-12)
    for p, r in zip(ours, ref):
        np.testing.assert_allclose(p.grad, r.grad.numpy(), rtol=1e-12)
    if max_norm > total.item():
        assert all(np.array_equal(p.grad, g) for p, g in zip(ours, grads))  # below the limit: untouched


def test_clip_grad_norm_edge_cases():
    p = nn.Parameter(np.zeros(2))
    assert optim.clip_grad_norm_([p], 1.0).item() == 0.0  # no gradients
    p.grad = np.array([3.0, 4.0])
    assert nn.utils.clip_grad_norm_(p, 1.0).item() == 5.0  # a single tensor; also under nn.utils
    np.testing.assert_allclose(np.linalg.norm(p.grad), 1.0, rtol=1e-6)
    p.grad = np.array([np.inf, 1.0])
    with pytest.raises(RuntimeError, match="non-finite"):
        optim.clip_grad_norm_([p], 1.0, error_if_nonfinite=True)


@pytest.mark.parametrize("clip_value", [0.5, 2, -0.5])
def test_clip_grad_value_equals_torch(clip_value):
    rng = np.random.default_rng(2)
    grads = [rng.standard_normal(s).astype(np.float32) * 2 for s in [(3, 4), (5,)]] + [None]
    ours = [nn.Parameter(np.zeros((1,), np.float32) if g is None else np.zeros_like(g)) for g in grads]
    ref = [torch.zeros(p.shape, requires_grad=True) for p in ours]
    for p, r, g in zip(ours, ref, grads):
        if g is not None:
            p.grad, r.grad = g.copy(), torch.from_numpy(g.copy())
    shared = ours[0].grad
    assert torch.nn.utils.clip_grad_value_(ref, clip_value, foreach=False) is None
    assert nn.utils.clip_grad_value_(ours, clip_value, foreach=False) is None
    for p, r in zip(ours, ref):
        assert (p.grad is None) == (r.grad is None)
        if p.grad is not None:
            assert p.grad.dtype == np.float32
            np.testing.assert_array_equal(p.grad, r.grad.numpy())
    np.testing.assert_array_equal(shared, grads[0])  # a new array: another holder of the old grad keeps it
    total = optim.clip_grad_norm_(ours, 1.0, foreach=True)  # PyTorch's signature
    ref_total = torch.nn.utils.clip_grad_norm_(ref, 1.0, foreach=True)
    np.testing.assert_allclose(total.item(), ref_total.item(), rtol=1e-6)


@pytest.mark.parametrize("norm_type", [math.inf, -math.inf, -1.0])
def test_clip_grad_norm_empty_gradient_has_no_max_norm(norm_type):
    # a zero-size gradient has no max (or min, or negative-order) norm: torch raises, leaving the grads alone
    p, q = nn.Parameter(np.zeros(0)), nn.Parameter(np.zeros(3))
    p.grad, q.grad = np.zeros(0), np.array([1.0, -2.0, 4.0])
    r, s = torch.zeros(0, requires_grad=True), torch.zeros(3, requires_grad=True)
    r.grad, s.grad = torch.zeros(0), torch.tensor([1.0, -2.0, 4.0])
    with pytest.raises(RuntimeError, match="empty tensor"):
        torch.nn.utils.clip_grad_norm_([r, s], 1.0, norm_type)
    with pytest.raises(RuntimeError, match=f"compute the {norm_type:g} norm on an empty tensor"):
        optim.clip_grad_norm_([p, q], 1.0, norm_type)
    np.testing.assert_array_equal(q.grad, [1.0, -2.0, 4.0])
    assert optim.clip_grad_norm_([p, q], 1.0, 2.0).item() == pytest.approx(math.sqrt(21))  # other orders: 0


# --- state_dict -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name,kwargs", [("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)),
                                         ("Adam", dict(lr=0.05, amsgrad=True, weight_decay=0.01)),
                                         ("AdamW", dict(lr=0.05))])
def test_state_dict_round_trip_continues_exactly(name, kwargs):
    whole, _ = models()
    opt = getattr(optim, name)(groups(whole.parameters(), True), **kwargs)
    train_ours(whole, opt, 2 * N)

    first, _ = models()
    opt1 = getattr(optim, name)(groups(first.parameters(), True), **kwargs)
    train_ours(first, opt1, N)
    saved_model = {k: v.numpy().copy() for k, v in first.state_dict().items()}
    saved_opt = opt1.state_dict()
    train_ours(first, opt1, 3)  # the saved state is a snapshot: later steps don't change it

    resumed = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    resumed.load_state_dict(saved_model)
    opt2 = getattr(optim, name)(groups(resumed.parameters(), True), lr=123.0)  # options come from the state
    opt2.load_state_dict(saved_opt)
    assert opt2.param_groups[1]["lr"] == 0.01 and opt2.param_groups[0]["lr"] == kwargs["lr"]
    train_ours(resumed, opt2, N)
    for k, v in whole.state_dict().items():
        assert np.array_equal(resumed.state_dict()[k].numpy(), v.numpy()), k


def test_state_dict_format_is_torchs():
    ours, ref = models()
    opt = optim.Adam(ours.parameters(), lr=0.01)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    train_ours(ours, opt, 2)
    train_ref(ref, ref_opt, 2)
    sd, ref_sd = opt.state_dict(), ref_opt.state_dict()
    assert sorted(sd["state"]) == sorted(ref_sd["state"]) == [0, 1, 2, 3]
    assert set(sd["state"][0]) == set(ref_sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert sd["state"][0]["step"] == int(ref_sd["state"][0]["step"]) == 2
    assert sd["param_groups"][0]["params"] == ref_sd["param_groups"][0]["params"] == [0, 1, 2, 3]
    for k in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"):
        assert sd["param_groups"][0][k] == ref_sd["param_groups"][0][k]


@pytest.mark.parametrize("name,kwargs", [("SGD", dict(lr=0.1, momentum=0.9)), ("Adam", dict(lr=0.1, amsgrad=True))])
def test_load_torchs_state_dict_with_a_0d_parameter(name, kwargs):
    # a 0-d parameter's state is a 0-d array: it is converted (and cast to the parameter's dtype) like any other
    ref = [torch.tensor(1.5, dtype=torch.float64, requires_grad=True), torch.ones(2, dtype=torch.float64,
                                                                               requires_grad=True)]
    ref_opt = getattr(torch.optim, name)(ref, **kwargs)
    ours = [nn.Parameter(np.array(1.5, np.float32)), nn.Parameter(np.ones(2, np.float32))]
    opt = getattr(optim, name)(ours, **kwargs)
    for t in range(6):
        if t == 3:
            for p, r in zip(ours, ref):
                p.data[...] = r.detach().numpy()
            opt.load_state_dict(ref_opt.state_dict())  # float64 state into float32 parameters
            assert all(isinstance(v, np.ndarray) and v.dtype == np.float32
                       for s in opt.state.values() for k, v in s.items() if k != "step")
        for p, r in zip(ours, ref):
            p.grad, r.grad = np.full(p.shape, t + 1.0, np.float32), torch.full(r.shape, t + 1.0, dtype=torch.float64)
        ref_opt.step()
        if t >= 3:
            opt.step()
    for p, r in zip(ours, ref):
        np.testing.assert_allclose(p.numpy(), r.detach().numpy(), rtol=1e-6)


def test_load_state_dict_errors():
    model, _ = models()
    params = list(model.parameters())
    opt = optim.Adam(params, lr=0.01)
    train_ours(model, opt, 1)
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="number of parameter groups"):
        optim.Adam([{"params": params[:2]}, {"params": params[2:]}]).load_state_dict(sd)
    with pytest.raises(ValueError, match="doesn't match the size"):
        optim.Adam(params[:3]).load_state_dict(sd)
    swapped = optim.Adam([params[1], params[0], *params[2:]])  # same count, wrong shapes
    with pytest.raises(ValueError, match=r"exp_avg.*parameter 0.*\(8, 4\).*\(8,\)"):
        swapped.load_state_dict(sd)


def test_optimizer_validation():
    p = nn.Parameter(np.zeros(2))
    with pytest.raises(ValueError, match="empty parameter list"):
        optim.SGD([], lr=0.1)
    with pytest.raises(ValueError, match="learning rate"):
        optim.Adam([p], lr=-1.0)
    with pytest.raises(ValueError, match="Nesterov"):
        optim.SGD([p], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="beta"):
        optim.AdamW([p], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="more than one parameter group"):
        optim.SGD([{"params": [p]}, {"params": [p]}], lr=0.1)
    with pytest.raises(TypeError, match="iterable of Tensors"):
        optim.SGD(p, lr=0.1)
    with pytest.raises(ValueError, match="non-leaf"):
        optim.SGD([p * 2], lr=0.1)


def test_param_group_as_a_set_is_refused_as_torch():
    # a set's order changes between runs, so its state_dict indices would too
    p, r = nn.Parameter(np.zeros(2)), torch.zeros(2, requires_grad=True)
    with pytest.raises(TypeError, match="ordered collections"):
        torch.optim.SGD([{"params": {r}}], lr=0.1)
    with pytest.raises(TypeError, match="ordered collections"):
        optim.SGD([{"params": {p}}], lr=0.1)
    opt = optim.SGD([p], lr=0.1)
    with pytest.raises(TypeError, match="ordered collections"):
        opt.add_param_group({"params": frozenset([nn.Parameter(np.zeros(1))])})


# --- schedules ------------------------------------------------------------------------------------


def test_warmup_cosine_values():
    p = nn.Parameter(np.zeros(1))
    opt = optim.SGD([p, ], lr=1.0)
    sched = optim.WarmupCosine(opt, warmup_steps=10, total_steps=110, min_lr=0.1)
    lrs = [sched.get_last_lr()[0]]
    for _ in range(150):
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    expected = {0: 0.0, 1: 0.1, 5: 0.5, 10: 1.0, 35: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)), 60: 0.55,
                85: 0.1 + 0.9 * 0.5 * (1 + math.cos(3 * math.pi / 4)), 110: 0.1, 150: 0.1}
    for t, lr in expected.items():
        assert lrs[t] == pytest.approx(lr, abs=1e-15), t
    assert opt.param_groups[0]["lr"] == lrs[-1]
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone after the warmup


def test_warmup_cosine_equals_torch_lambda_lr_and_resumes():
    """The same schedule as a torch LambdaLR (per group base lrs), and a state_dict round trip."""
    def factor(t, w=5, total=40):
        return t / w if t < w else 0.5 * (1 + math.cos(math.pi * min(1.0, (t - w) / (total - w))))

    p, q = nn.Parameter(np.zeros(1)), nn.Parameter(np.zeros(1))
    opt = optim.SGD([{"params": [p]}, {"params": [q], "lr": 0.5}], lr=2.0)
    sched = optim.WarmupCosine(opt, 5, 40)
    ref_opt = torch.optim.SGD([{"params": [torch.zeros(1)]}, {"params": [torch.zeros(1)], "lr": 0.5}], lr=2.0)
    ref = torch.optim.lr_scheduler.LambdaLR(ref_opt, factor)
    ours_lambda = optim.LambdaLR(optim.SGD([{"params": [p]}, {"params": [q], "lr": 0.5}], lr=2.0), factor)
    for t in range(50):
        assert sched.get_last_lr() == pytest.approx(ref.get_last_lr(), abs=1e-15), t
        assert ours_lambda.get_last_lr() == ref.get_last_lr(), t
        if t == 20:
            saved = sched.state_dict()
            resumed = optim.WarmupCosine(optim.SGD([{"params": [p]}, {"params": [q], "lr": 0.5}], lr=2.0), 1, 2)
            resumed.load_state_dict(saved)
        if t > 20:
            resumed.step()
            assert resumed.get_last_lr() == sched.get_last_lr()
        ref_opt.step()
        sched.step(), ref.step(), ours_lambda.step()
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.WarmupCosine(opt, 50, 40)


class _Decay:
    """A stateful callable lr_lambda: LambdaLR's state_dict keeps its attributes, as torch's does."""

    def __init__(self, rate):
        self.rate = rate

    def __call__(self, t):
        return self.rate**t


def test_lambda_lr_state_dict_keeps_callable_objects_attributes():
    def run(lib, param):
        sched = lib.optim.lr_scheduler.LambdaLR if lib is torch else optim.LambdaLR
        opt = (torch.optim.SGD if lib is torch else optim.SGD)([{"params": [param]}], lr=1.0)
        return sched(opt, [_Decay(0.5)])

    ours, ref = run(core, nn.Parameter(np.zeros(1))), run(torch, torch.zeros(1, requires_grad=True))
    for s in (ours, ref):
        s.lr_lambdas[0].rate = 0.9
        s.optimizer.step()
        s.step()
    saved, ref_saved = ours.state_dict(), ref.state_dict()
    assert saved["lr_lambdas"] == ref_saved["lr_lambdas"] == [{"rate": 0.9}]
    ours2, ref2 = run(core, nn.Parameter(np.zeros(1))), run(torch, torch.zeros(1, requires_grad=True))
    ours2.load_state_dict(saved)
    ref2.load_state_dict(ref_saved)
    for s in (ours2, ref2):
        s.optimizer.step()
        s.step()
    assert ours2.lr_lambdas[0].rate == ref2.lr_lambdas[0].rate == 0.9
    assert ours2.get_last_lr() == pytest.approx(ref2.get_last_lr(), rel=1e-15) == [0.9**2]
    plain = optim.LambdaLR(optim.SGD([nn.Parameter(np.zeros(1))], lr=1.0), lambda t: 1.0)
    assert plain.state_dict()["lr_lambdas"] == [None]  # a function is not saved


# --- EMA ------------------------------------------------------------------------------------------


def test_ema_math_and_swap():
    m = nn.Linear(2, 1, dtype=np.float64)
    w0 = m.weight.numpy().copy()
    ema = optim.EMA(m, decay=0.9)
    values = [w0 + k for k in range(1, 6)]
    for v in values:
        m.weight.data[...] = v
        ema.update()
    # s_k = d^k s_0 + (1 − d) Σ_i d^(k−i) p_i
    expected = 0.9**5 * w0 + 0.1 * sum(0.9 ** (5 - i) * v for i, v in enumerate(values, 1))
    np.testing.assert_allclose(ema.shadow["weight"], expected, rtol=1e-13)
    assert ema.num_updates == 5
    current = m.weight.numpy().copy()
    ema.store()
    ema.copy_to()
    np.testing.assert_allclose(m.weight.numpy(), expected, rtol=1e-13)
    ema.restore()
    assert np.array_equal(m.weight.numpy(), current)
    with pytest.raises(RuntimeError, match="store"):
        ema.restore()


def test_ema_state_dict_round_trip():
    m = nn.Linear(2, 2)
    ema = optim.EMA(m, decay=0.5)
    m.weight.data += 1
    ema.update()
    sd = ema.state_dict()
    other = optim.EMA(m, decay=0.99)
    other.load_state_dict(sd)
    assert other.decay == 0.5 and other.num_updates == 1
    for k in ema.shadow:
        assert np.array_equal(other.shadow[k], ema.shadow[k]) and other.shadow[k].dtype == np.float32
    sd["shadow"]["weight"] = np.zeros((3, 3))
    with pytest.raises(ValueError, match=r"weight has shape \(3, 3\)"):
        other.load_state_dict(sd)
    del sd["shadow"]["bias"]
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict(sd)


def test_state_dict_of_a_zero_dim_parameter():
    """A 0-d parameter (CLIP's temperature) has NumPy-scalar Adam moments after a step; they save and restore."""
    p = nn.Parameter(core.tensor(np.float32(2.0)))
    opt = optim.AdamW([p], lr=0.1)
    (p * p).backward()
    opt.step()
    sd = opt.state_dict()
    assert isinstance(sd["state"][0]["exp_avg"], np.ndarray) and sd["state"][0]["exp_avg"].shape == ()
    q = nn.Parameter(core.tensor(p.numpy().copy()))
    other = optim.AdamW([q], lr=0.1)
    other.load_state_dict(sd)
    for o, x in ((opt, p), (other, q)):
        x.grad = np.float32(1.0) * np.ones((), np.float32)
        o.step()
    assert p.item() == q.item()
