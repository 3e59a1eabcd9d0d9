"""core.functional beyond the case table: stability at extreme logits, error messages, dtypes,
batch_norm's running statistics, and dropout's statistics (its random mask cannot match PyTorch's)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import core
from core import functional as F

# --- stability at logits of ±1e4 ----------------------------------------------------------------

STABLE = {  # fn(F, logits, class targets, binary targets)
    "softmax": lambda F, x, t, y: F.softmax(x, dim=-1),
    "log_softmax": lambda F, x, t, y: F.log_softmax(x, dim=1),
    "cross_entropy": lambda F, x, t, y: F.cross_entropy(x, t),
    "cross_entropy_smoothing": lambda F, x, t, y: F.cross_entropy(x, t, label_smoothing=0.1, reduction="none"),
    "bce_with_logits": lambda F, x, t, y: F.binary_cross_entropy_with_logits(x, y, reduction="sum"),
    "logsigmoid": lambda F, x, t, y: F.logsigmoid(x),
    "softplus": lambda F, x, t, y: F.softplus(x),
    "sigmoid": lambda F, x, t, y: F.sigmoid(x),
    "silu": lambda F, x, t, y: F.silu(x),
}


def _extreme_logits():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1e4, 1e4, size=(6, 5))
    x[0] = [1e4, -1e4, 1e4, -1e4, 0.0]  # ties at the top, huge gaps
    x[1] = [-1e4] * 5  # all equal and very negative
    x[2] = [1e4] * 5
    x[3] = [1e4, 1e4 - 1e-3, -1e4, 0.0, 1.0]
    t = np.array([1, 0, 4, 1, 2, 3])  # including targets far below the maximum (loss ≈ 2e4)
    return x, t


@pytest.mark.parametrize("name", list(STABLE))
def test_stable_at_1e4_equals_pytorch(name):
    x, t = _extreme_logits()
    fn = STABLE[name]
    ours = core.Tensor(x.copy(), requires_grad=True)
    ref = torch.tensor(x.copy(), requires_grad=True)
    y = (np.random.default_rng(2).random(x.shape) < 0.5).astype(np.float64)
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # no overflow, no NaN anywhere on the way
        out = fn(F, ours, core.tensor(t), core.tensor(y))
        g = np.random.default_rng(1).standard_normal(out.shape)
        out.backward(g)
    rout = fn(TF, ref, torch.tensor(t), torch.tensor(y))
    rout.backward(torch.from_numpy(g))
    assert np.isfinite(out.data).all() and np.isfinite(ours.grad).all()
    np.testing.assert_allclose(out.data, rout.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ours.grad, ref.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_cross_entropy_of_a_far_target_is_its_logit_gap():
    # target logit 2e4 below the maximum: the loss is the gap itself, not inf
    x = core.tensor([[1e4, -1e4]], dtype=np.float32)
    assert F.cross_entropy(x, core.tensor([1])).item() == pytest.approx(2e4, rel=1e-6)
    assert F.cross_entropy(x, core.tensor([0])).item() == 0.0


# --- error messages -----------------------------------------------------------------------------


def test_cross_entropy_refuses_float_targets():
    x = core.randn(3, 4)
    with pytest.raises(TypeError, match="class indices"):
        F.cross_entropy(x, core.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(TypeError, match="class indices"):
        F.cross_entropy(x, core.rand(3, 4))  # probability targets, which PyTorch would accept
    with pytest.raises(TypeError, match="class indices"):
        F.nll_loss(x, core.tensor([0.0, 1.0, 2.0]))


def test_cross_entropy_refuses_out_of_range_targets_naming_the_value():
    x = core.randn(3, 4)
    with pytest.raises(IndexError, match=r"target value 7 .*4 classes"):
        F.cross_entropy(x, core.tensor([0, 7, 1]))
    with pytest.raises(IndexError, match="target value -3"):
        F.cross_entropy(x, core.tensor([0, -3, 1]))
    with pytest.raises(IndexError, match="target value -1"):  # -1 is only skipped when it is the ignore_index
        F.cross_entropy(x, core.tensor([0, -1, 1]))
    F.cross_entropy(x, core.tensor([0, -1, 1]), ignore_index=-1)


def test_cross_entropy_refuses_mismatched_target_shapes():
    with pytest.raises(ValueError, match=r"\(3,\).*\(2, 4\)"):
        F.cross_entropy(core.randn(2, 4), core.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"expected target of shape \(2, 5\)"):
        F.cross_entropy(core.randn(2, 4, 5), core.tensor([0, 1]))
    with pytest.raises(ValueError, match="weight"):
        F.cross_entropy(core.randn(2, 4), core.tensor([0, 1]), core.ones(3))


def test_linear_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"linear: input of shape \(2, 3\) and weight of shape \(4, 5\)"):
        F.linear(core.randn(2, 3), core.randn(4, 5))
    with pytest.raises(ValueError, match=r"bias of shape \(3,\)"):
        F.linear(core.randn(2, 5), core.randn(4, 5), core.randn(3))


def test_other_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="reduction='avg'"):
        F.mse_loss(core.randn(3), core.randn(3), reduction="avg")
    with pytest.raises(ValueError, match="reduction"):
        F.cross_entropy(core.randn(2, 3), core.tensor([0, 1]), reduction="batchmean")
    with pytest.raises(ValueError, match="same shape"):
        F.binary_cross_entropy_with_logits(core.randn(2, 3), core.rand(3))
    with pytest.raises(ValueError, match=r"normalized_shape \(4,\)"):
        F.layer_norm(core.randn(2, 3), (4,))
    with pytest.raises(ValueError, match="num_groups=4"):
        F.group_norm(core.randn(2, 6, 3), 4)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        F.batch_norm(core.randn(1, 3), None, None, training=True)
    with pytest.raises(ValueError, match="running_mean"):
        F.batch_norm(core.randn(4, 3), None, None, training=False)
    with pytest.raises(IndexError, match="index 10 is out of range for 10 embeddings"):
        F.embedding(core.tensor([1, 10]), core.randn(10, 2))
    with pytest.raises(TypeError, match="integer"):
        F.embedding(core.tensor([1.0]), core.randn(10, 2))
    with pytest.raises(TypeError, match="integer"):
        F.one_hot(core.tensor([1.0]))
    with pytest.raises(IndexError, match="index 5 is out of range for 3 classes"):
        F.one_hot(core.tensor([0, 5]), num_classes=3)
    with pytest.raises(ValueError, match="between 0 and 1"):
        F.dropout(core.randn(3), p=1.5)
    with pytest.raises(ValueError, match="approximate='erf'"):
        F.gelu(core.randn(3), approximate="erf")
    with pytest.raises(TypeError, match="dim"):
        F.softmax(core.randn(3))
    with pytest.raises(IndexError, match="dim 2"):
        F.log_softmax(core.randn(3, 4), dim=2)


# --- semantics worth stating once ---------------------------------------------------------------


def test_label_smoothing_is_pytorchs_formula():
    # loss = (1 - ε) · w[t] · (-logp[t]) + ε/C · Σ_c w_c · (-logp[c]), 'mean' divided by Σ w[t]
    rng = np.random.default_rng(0)
    x, t, w, eps = rng.standard_normal((4, 3)), np.array([0, 2, 2, 1]), np.array([0.5, 1.0, 2.0]), 0.2
    logp = x - np.log(np.exp(x).sum(1, keepdims=True))
    per = (1 - eps) * w[t] * -logp[np.arange(4), t] + eps / 3 * (w * -logp).sum(1)
    got = F.cross_entropy(core.tensor(x), core.tensor(t), core.tensor(w), label_smoothing=eps)
    assert got.item() == pytest.approx(per.sum() / w[t].sum(), rel=1e-12)


def test_cross_entropy_all_ignored_is_nan_with_zero_gradient_like_pytorch():
    x = core.randn(3, 4, dtype=np.float64, requires_grad=True)
    loss = F.cross_entropy(x, core.tensor([-100, -100, -100]))
    loss.backward()
    assert math.isnan(loss.item())
    np.testing.assert_array_equal(x.grad, np.zeros((3, 4)))


def test_embedding_accumulates_repeated_indices_and_skips_padding():
    w = core.randn(4, 2, dtype=np.float64, requires_grad=True)
    F.embedding(core.tensor([[1, 1], [1, 3]]), w, padding_idx=3).sum().backward()
    np.testing.assert_array_equal(w.grad, [[0, 0], [3, 3], [0, 0], [0, 0]])
    out = F.embedding(core.tensor([3]), w, padding_idx=-1)  # the padding row is still looked up
    np.testing.assert_array_equal(out.data, w.data[[3]])


def test_one_hot_is_int64_without_grad():
    out = F.one_hot(core.tensor([[0, 2], [1, 2]]))
    assert out.dtype == np.int64 and not out.requires_grad and out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out.data, TF.one_hot(torch.tensor([[0, 2], [1, 2]])).numpy())


# --- dtype preservation -------------------------------------------------------------------------

X32 = np.random.default_rng(0).standard_normal((4, 6, 3)).astype(np.float32)

DTYPE_OPS = {
    "linear": lambda x: F.linear(x, core.randn(5, 3), core.randn(5)),
    "softmax": lambda x: F.softmax(x, dim=1),
    "log_softmax": lambda x: F.log_softmax(x, dim=-1),
    "cross_entropy": lambda x: F.cross_entropy(x, core.tensor(np.zeros((4, 3), np.int64)),
                                               core.ones(6), label_smoothing=0.1),
    "nll_loss": lambda x: F.nll_loss(x, core.tensor(np.zeros((4, 3), np.int64)), reduction="none"),
    "mse_loss": lambda x: F.mse_loss(x, core.zeros(4, 6, 3)),
    "l1_loss": lambda x: F.l1_loss(x, core.zeros(4, 6, 3), reduction="sum"),
    "bce_with_logits": lambda x: F.binary_cross_entropy_with_logits(
        x, core.rand(4, 6, 3), core.full((3,), 2.0), pos_weight=core.full((3,), 3.0)),
    "layer_norm": lambda x: F.layer_norm(x, (6, 3), core.ones(6, 3), core.zeros(6, 3)),
    "group_norm": lambda x: F.group_norm(x, 2, core.ones(6), core.zeros(6)),
    "batch_norm_train": lambda x: F.batch_norm(x, core.zeros(6), core.ones(6), core.ones(6), core.zeros(6), True),
    "batch_norm_eval": lambda x: F.batch_norm(x, core.zeros(6), core.ones(6), training=False),
    "embedding": lambda x: F.embedding(core.tensor([[0, 3], [2, 2]]), x.reshape(8, 9)),
    "dropout": lambda x: F.dropout(x, 0.3),
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": lambda x: F.silu(x),
    "relu": lambda x: F.relu(x),
    "leaky_relu": lambda x: F.leaky_relu(x, 0.2),
    "sigmoid": lambda x: F.sigmoid(x),
    "tanh": lambda x: F.tanh(x),
    "softplus": lambda x: F.softplus(x, beta=2.0),
    "logsigmoid": lambda x: F.logsigmoid(x),
    "normalize": lambda x: F.normalize(x, p=3.0, dim=1),
}


@pytest.mark.parametrize("name", list(DTYPE_OPS))
def test_float32_in_float32_out(name):
    x = core.Tensor(X32.copy(), requires_grad=True)
    out = DTYPE_OPS[name](x)
    assert out.dtype == np.float32, f"{name}: output is {out.dtype}"
    out.sum().backward()
    assert x.grad.dtype == np.float32


def test_gelu_keeps_float16():  # scipy's erf computes float16 in float64
    x16 = X32.astype(np.float16)
    x = core.Tensor(x16, requires_grad=True)
    out = F.gelu(x)
    out.sum().backward()
    assert out.dtype == np.float16 and x.grad.dtype == np.float16
    ref = TF.gelu(torch.from_numpy(x16)).numpy()
    np.testing.assert_allclose(out.numpy().astype(np.float32), ref.astype(np.float32), rtol=2e-3, atol=1e-3)


# --- batch_norm's running statistics ------------------------------------------------------------


@pytest.mark.parametrize("shape,momentum", [((8, 3), 0.1), ((4, 3, 5, 2), 0.3)])
def test_batch_norm_running_stats_equal_pytorch(shape, momentum):
    rng = np.random.default_rng(0)
    C = shape[1]
    rm, rv = core.zeros(C, dtype=np.float64), core.ones(C, dtype=np.float64)
    trm, trv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    w, b = rng.uniform(0.5, 1.5, C), rng.standard_normal(C)
    for _ in range(4):
        x = rng.standard_normal(shape) * 3 + 2
        ours = F.batch_norm(core.tensor(x), rm, rv, core.tensor(w), core.tensor(b), True, momentum)
        ref = TF.batch_norm(torch.tensor(x), trm, trv, torch.tensor(w), torch.tensor(b), True, momentum)
        np.testing.assert_allclose(ours.data, ref.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(rm.data, trm.numpy(), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(rv.data, trv.numpy(), rtol=1e-12, atol=1e-14)  # the unbiased variance
    x = rng.standard_normal(shape)
    ours = F.batch_norm(core.tensor(x), rm, rv, core.tensor(w), core.tensor(b), training=False)
    ref = TF.batch_norm(torch.tensor(x), trm, trv, torch.tensor(w), torch.tensor(b), training=False)
    np.testing.assert_allclose(ours.data, ref.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(rm.data, trm.numpy(), rtol=1e-12)  # eval leaves them alone


# --- dropout: statistics, reproducibility, gradient ---------------------------------------------

N_DROP = 200_000


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_statistics(p):
    core.manual_seed(0)
    out = F.dropout(core.ones(N_DROP, dtype=np.float64), p)
    # each element is zeroed with probability p: the zeroed fraction has sd sqrt(p(1-p)/n)
    zeroed = float(np.mean(out.data == 0))
    assert abs(zeroed - p) < 5 * math.sqrt(p * (1 - p) / N_DROP)
    # survivors are scaled by 1/(1-p), so the mean stays 1; one element has variance p/(1-p)
    assert abs(out.data.mean() - 1.0) < 5 * math.sqrt(p / (1 - p) / N_DROP)
    np.testing.assert_allclose(np.unique(out.data), [0.0, 1 / (1 - p)])


def test_dropout_is_reproducible_and_uses_the_generator():
    x = core.ones(1000)
    core.manual_seed(3)
    a = F.dropout(x, 0.5).data
    core.manual_seed(3)
    b = F.dropout(x, 0.5).data
    c = F.dropout(x, 0.5).data
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(b, c)
    g1, g2 = core.random.Generator(7), core.random.Generator(7)
    np.testing.assert_array_equal(F.dropout(x, 0.5, generator=g1).data, F.dropout(x, 0.5, generator=g2).data)


def test_dropout_gradient_is_the_scaled_mask():
    x = core.Tensor(np.random.default_rng(0).standard_normal(500), requires_grad=True)
    out = F.dropout(x, 0.25)
    out.backward(np.ones(500))
    mask = out.data != 0
    np.testing.assert_allclose(x.grad, mask / 0.75)
    np.testing.assert_allclose(out.data, x.data * mask / 0.75)


def test_dropout_identity_and_extremes():
    x = core.randn(50, requires_grad=True)
    assert F.dropout(x, 0.0) is x
    assert F.dropout(x, 0.7, training=False) is x
    out = F.dropout(x, 1.0)
    out.sum().backward()
    assert not out.data.any() and not x.grad.any()
    assert out.dtype == np.float32


def test_dropout_inplace():
    x = core.ones(1000)
    with core.no_grad():
        y = F.dropout(x, 0.5, inplace=True)
    assert y is x and (x.data == 0).any() and (x.data == 2).any()
    with pytest.raises(RuntimeError, match="inplace"):
        F.dropout(core.ones(3, requires_grad=True), 0.5, inplace=True)


@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, 0.5])
def test_normalize_gradient_at_a_zero_or_tiny_vector_matches_pytorch(p):
    """The norm's gradient at a zero vector is 0 (PyTorch's), not 0·∞ = NaN; squares that underflow alike."""
    a = np.array([[0.0, 0.0], [3.0, 4.0], [1e-200, 2e-200], [0.5, 0.0]])
    x, t = core.Tensor(a, requires_grad=True), torch.tensor(a, requires_grad=True)
    g = np.random.default_rng(0).standard_normal(a.shape)
    y, ty = F.normalize(x, p=p, dim=1), torch.nn.functional.normalize(t, p=p, dim=1)
    y.backward(core.Tensor(g))
    ty.backward(torch.tensor(g))
    np.testing.assert_allclose(y.data, ty.detach().numpy(), rtol=1e-12)
    assert np.isfinite(x.grad).all()
    np.testing.assert_allclose(x.grad, t.grad.numpy(), rtol=1e-9)


def test_nan_and_inf_edges_match_pytorch():
    """relu passes a NaN input its gradient; softmax of a row holding +inf is all NaN (not [nan, 0])."""
    a = np.array([np.nan, 1.0, -1.0])
    x, t = core.Tensor(a, requires_grad=True), torch.tensor(a, requires_grad=True)
    x.relu().sum().backward()
    t.relu().sum().backward()
    np.testing.assert_array_equal(x.grad, t.grad.numpy())
    for row in ([np.inf, 0.0], [-np.inf, 0.0], [-np.inf, -np.inf]):
        np.testing.assert_array_equal(F.softmax(core.tensor(np.array(row)), 0).data,
                                      torch.softmax(torch.tensor(row), 0).numpy())
