"""Tensor as a container: factories and the dtypes PyTorch infers, conversions, repr, comparisons,
in-place assignment rules, dtype casts with gradients, and size queries."""

import operator

import numpy as np
import pytest
import torch

import core

# --- factories and inferred dtypes ---------------------------------------------------------------------

FACTORIES = [
    ("L.tensor([1., 2.])", "float32", (2,)),
    ("L.tensor(3.5)", "float32", ()),
    ("L.tensor([1, 2.5])", "float32", (2,)),
    ("L.tensor([1, 2])", "int64", (2,)),
    ("L.tensor(3)", "int64", ()),
    ("L.tensor([True, False])", "bool", (2,)),
    ("L.tensor([])", "float32", (0,)),
    ("L.tensor(np.ones((2, 3)))", "float64", (2, 3)),
    ("L.tensor(np.ones(2, np.float32))", "float32", (2,)),
    ("L.tensor(np.arange(3, dtype=np.int32))", "int32", (3,)),
    ("L.tensor(np.float64(2.0))", "float64", ()),
    ("L.tensor([[1, 2], [3, 4]], dtype=L.float64)", "float64", (2, 2)),
    ("L.zeros(2, 3)", "float32", (2, 3)),
    ("L.zeros((2, 3), dtype=L.float64)", "float64", (2, 3)),
    ("L.ones(())", "float32", ()),
    ("L.ones(4, dtype=L.int64)", "int64", (4,)),
    ("L.full((2,), 1.5)", "float32", (2,)),
    ("L.full((2, 1), 3)", "int64", (2, 1)),
    ("L.full((2,), True)", "bool", (2,)),
    ("L.arange(5)", "int64", (5,)),
    ("L.arange(1, 7, 2)", "int64", (3,)),
    ("L.arange(5.0)", "float32", (5,)),
    ("L.arange(0, 1, 0.25)", "float32", (4,)),
    ("L.zeros_like(L.ones(2, dtype=L.float64))", "float64", (2,)),
    ("L.ones_like(L.ones(3, 1))", "float32", (3, 1)),
    ("L.randn(2, 3)", "float32", (2, 3)),
    ("L.rand((4,))", "float32", (4,)),
    ("L.randint(0, 5, (3,))", "int64", (3,)),
    ("L.randint(5, (3, 2))", "int64", (3, 2)),
]


@pytest.mark.parametrize("expr, dtype, shape", FACTORIES, ids=[f[0] for f in FACTORIES])
def test_factories_infer_pytorchs_dtypes(expr, dtype, shape):
    ours = eval(expr, {"L": core, "np": np})  # the same expression in both libraries
    ref = eval(expr, {"L": torch, "np": np})
    assert ours.dtype == np.dtype(dtype) and ours.shape == shape
    assert str(ref.dtype) == f"torch.{dtype}" and tuple(ref.shape) == shape  # the table itself is PyTorch's
    assert not ours.requires_grad and ours.is_leaf and ours.grad is None


def test_factory_values():
    np.testing.assert_array_equal(core.arange(1, 7, 2).numpy(), [1, 3, 5])
    np.testing.assert_array_equal(core.arange(0, 1, 0.25).numpy(), [0, 0.25, 0.5, 0.75])
    np.testing.assert_array_equal(core.full((2,), 1.5).numpy(), [1.5, 1.5])
    np.testing.assert_array_equal(core.zeros(2).numpy(), [0, 0])
    np.testing.assert_array_equal(core.ones_like(core.zeros(2)).numpy(), [1, 1])
    assert core.ones(2, requires_grad=True).requires_grad


def test_tensor_copies_its_data_but_Tensor_wraps_it():
    a = np.ones(3)
    t = core.tensor(a)
    a[0] = 5.0
    assert t.data[0] == 1.0
    u = core.tensor(t)  # from a Tensor: a copy too
    t.data[1] = 7.0
    assert u.data[1] == 1.0
    w = core.Tensor(a)  # the raw wrapper shares memory, as torch.from_numpy
    a[2] = 9.0
    assert w.data[2] == 9.0


def test_tensor_of_zero_dim_tensors_and_array_protocol():
    t = core.tensor([core.tensor(1.0), core.tensor(2.5)])
    assert t.dtype == np.float32 and t.tolist() == [1.0, 2.5]
    np.testing.assert_array_equal(np.asarray(core.tensor([[1, 2]])), [[1, 2]])


# --- conversions ---------------------------------------------------------------------------------------


def test_item_numpy_tolist_detach():
    x = core.tensor([[1.5, -2.0], [3.0, 4.0]], requires_grad=True)
    assert x[0, 0].item() == 1.5 and isinstance(x[0, 0].item(), float)
    assert core.tensor(3).item() == 3 and isinstance(core.tensor(3).item(), int)
    assert core.tensor([True]).item() is True
    assert core.tensor([[2.5]]).item() == 2.5  # any one-element tensor
    with pytest.raises(ValueError, match="4 elements cannot be converted to a scalar"):
        x.item()
    assert x.tolist() == [[1.5, -2.0], [3.0, 4.0]] and core.tensor(2.5).tolist() == 2.5
    a = x.numpy()
    assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == (2, 2)
    d = (x * 2).detach()
    assert not d.requires_grad and d.is_leaf and d.grad_fn is None
    np.testing.assert_array_equal(d.numpy(), [[3, -4], [6, 8]])
    assert float(core.tensor([2.0])) == 2.0 and int(core.tensor(3)) == 3
    assert [10, 20, 30][core.tensor(1)] == 20  # __index__ for integer tensors
    with pytest.raises(TypeError, match="only integer tensors"):
        [1, 2][core.tensor(1.0)]


def test_bool_of_a_tensor():
    assert bool(core.tensor([1.0])) and not bool(core.tensor(0))
    with pytest.raises(RuntimeError, match="ambiguous"):
        bool(core.tensor([1.0, 2.0]))


def test_repr_looks_like_pytorchs():
    assert repr(core.tensor([1.0, 2.0])) == "tensor([1., 2.])"
    assert repr(core.tensor([1, 2])) == "tensor([1, 2])"
    assert repr(core.tensor(3.5)) == "tensor(3.5)"
    assert repr(core.tensor([True, False])) == "tensor([ True, False])"
    assert repr(core.tensor(np.ones(2))) == "tensor([1., 1.], dtype=float64)"
    assert repr(core.tensor([1.0], requires_grad=True)) == "tensor([1.], requires_grad=True)"
    x = core.tensor([1.0], requires_grad=True)
    assert repr(x * 2) == "tensor([2.], grad_fn=<Mul>)"
    assert repr(core.zeros(2, 2)) == "tensor([[0., 0.],\n        [0., 0.]])"  # rows aligned under "tensor("


# --- comparisons -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", [operator.lt, operator.le, operator.gt, operator.ge, operator.eq, operator.ne],
                         ids=lambda f: f.__name__)
def test_comparisons_return_bool_tensors_without_grad(op):
    a = core.tensor([1.0, 2.0, 3.0], requires_grad=True)
    b = core.tensor([[2.0], [3.0]])
    for out, ref in [(op(a, b), op(a.data, b.data)), (op(a, 2.0), op(a.data, 2.0)), (op(2.0, a), op(2.0, a.data))]:
        assert isinstance(out, core.Tensor) and out.dtype == np.bool_ and not out.requires_grad
        np.testing.assert_array_equal(out.numpy(), ref)


def test_logical_operators_and_named_comparisons():
    a = core.tensor([1.0, 2.0, 3.0])
    np.testing.assert_array_equal(((a > 1) & (a < 3)).numpy(), [False, True, False])
    np.testing.assert_array_equal(((a < 2) | (a > 2)).numpy(), [True, False, True])
    np.testing.assert_array_equal((~(a > 1)).numpy(), [True, False, False])
    np.testing.assert_array_equal(a.eq(2.0).numpy(), [False, True, False])
    np.testing.assert_array_equal(a.ge(core.tensor([3.0, 2.0, 1.0])).numpy(), [False, True, True])


def test_tensors_hash_by_identity():
    a, b = core.tensor([1.0]), core.tensor([1.0])
    assert len({a, b}) == 2 and {a: 1}[a] == 1


# --- in-place assignment ------------------------------------------------------------------------------


def test_setitem_writes_values_with_pytorchs_indexing():
    x = core.zeros(3, 4)
    x[0] = 1.0
    x[1, 1:3] = core.tensor([2.0, 3.0])
    x[x > 2.5] = -1.0  # a bool tensor index
    x[core.tensor([2, 2]), core.tensor([0, 3])] = 7.0  # integer tensor indices
    x[:, -1:] = core.tensor([[5.0], [6.0], [8.0]])
    np.testing.assert_array_equal(x.numpy(), [[1, 1, 1, 5], [0, 2, -1, 6], [7, 0, 0, 8]])
    assert x.dtype == np.float32
    i = core.zeros(2, dtype=core.int64)
    i[0] = 3.7  # the tensor keeps its dtype, as in PyTorch
    assert i.dtype == np.int64 and i.tolist() == [3, 0]


def test_setitem_on_a_tensor_that_requires_grad_is_refused_outside_no_grad():
    w = core.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(RuntimeError, match="in-place assignment to a tensor that requires grad"):
        w[0] = 5.0
    with core.no_grad():
        w[0] = 5.0  # how an optimizer or an initializer writes parameters
    assert w.tolist() == [5.0, 2.0] and w.requires_grad
    x = core.zeros(2)
    with pytest.raises(RuntimeError, match="gradient would be lost"):
        x[0] = w[1]  # PyTorch records this copy; ours would silently drop w's gradient
    with core.no_grad():
        x[0] = w[1]
    assert x.tolist() == [2.0, 0.0] and not x.requires_grad


def test_setitem_shape_errors():
    x = core.zeros(2, 3)
    with pytest.raises(ValueError):
        x[0] = core.ones(4)
    with pytest.raises(IndexError):
        x[5] = 1.0


# --- dtype casts ---------------------------------------------------------------------------------------


def test_to_dtype_lets_the_gradient_flow_back_in_the_source_dtype():
    x = core.tensor([1.0, 2.0, 3.0], requires_grad=True)  # float32
    y = x.to(core.float64)
    assert y.dtype == np.float64 and y.requires_grad and y.grad_fn == "Cast"
    (y * y).sum().backward()
    assert x.grad.dtype == np.float32
    np.testing.assert_array_equal(x.grad, [2.0, 4.0, 6.0])
    z = core.tensor([0.5], dtype=core.float64, requires_grad=True)
    (z.float() * 4).sum().backward()
    assert z.grad.dtype == np.float64 and z.grad.tolist() == [4.0]


def test_casts_to_integer_and_bool_cut_the_graph():
    x = core.tensor([1.7, -2.2, 0.0], requires_grad=True)
    assert x.long().dtype == np.int64 and x.long().tolist() == [1, -2, 0]  # truncation toward zero
    assert x.int().dtype == np.int32 and not x.long().requires_grad
    assert x.bool().tolist() == [True, True, False]
    assert x.double().dtype == np.float64 and x.type(core.float64).dtype == np.float64
    assert x.to(core.float32) is x  # nothing to do: the same tensor, as in PyTorch
    assert x.to("cpu") is x and x.cpu() is x


# --- sizes -----------------------------------------------------------------------------------------------


def test_size_numel_len_and_friends():
    x = core.zeros(2, 3, 4)
    assert x.size() == (2, 3, 4) and x.shape == (2, 3, 4)
    assert x.size(-1) == 4 and x.size(0) == 2
    assert x.numel() == 24 and len(x) == 2 and x.dim() == 3 and x.ndim == 3
    assert x.device == "cpu"
    assert core.zeros(0, 5).numel() == 0 and len(core.zeros(0, 5)) == 0
    with pytest.raises(TypeError, match="0-d"):
        len(core.tensor(1.0))
    assert core.tensor(1.0).numel() == 1 and core.tensor(1.0).size() == ()


def test_is_leaf_and_grad_fn():
    x = core.tensor([1.0], requires_grad=True)
    y = x * 2
    assert x.is_leaf and x.grad_fn is None
    assert not y.is_leaf and y.grad_fn == "Mul"
    assert core.tensor([1.0]).is_leaf


# --- type promotion -------------------------------------------------------------------------------------

PROMOTIONS = [
    "L.arange(4) * 0.1",  # integers with a Python float: the default float, not NumPy's float64
    "L.arange(4) / 2",
    "L.tensor([1, 2]) / L.tensor([2, 4])",
    "L.tensor(3) / L.tensor(2)",
    "L.tensor([True, False]) + 1.5",
    "L.tensor([1, 2]) ** 0.5",
    "2.0 ** L.tensor([1, 2])",
    "L.tensor([1, 2]) * 2",
    "2 ** L.tensor([1, 2])",
    "L.ones(2) + L.tensor([1, 2])",
    "L.ones(2, dtype=L.float64) * L.tensor([1, 2])",
    "L.ones(2) * L.tensor(2.0, dtype=L.float64)",  # a 0-d tensor does not promote a float32 tensor
    "L.tensor(2.0, dtype=L.float64) / L.ones(2)",
    "L.tensor([1, 2]) * L.tensor(2.0, dtype=L.float64)",
    "L.tensor(1.0) - L.tensor(2.0, dtype=L.float64)",
    "L.ones(2) * np.float64(2.0)",
    "L.ones(2, dtype=L.float64) + L.ones(2)",
    "L.tensor([1, 2]).exp()",
    "L.tensor([1, 2]).sqrt()",
    "L.tensor([1, 2]).sigmoid()",
    "L.tensor([1, 2]).tanh()",
    "L.tensor([1, 2]).log()",
    "L.tensor([1, 2], dtype=L.int32) + L.tensor(2)",  # a 0-d int64 tensor does not promote an int32 tensor
    "L.tensor(3) * L.tensor([1, 2], dtype=L.int32)",
    "L.tensor([1, 2], dtype=L.int32) - L.tensor(3)",
    "L.tensor([True, False]) + L.tensor(2)",
    "L.tensor([True, False]) ** True",
    "L.tensor([6, -3]) & L.tensor([3, 5])",  # &, |, ^, ~ are bitwise on integers, as in PyTorch
    "L.tensor([6, 3], dtype=L.int32) | 8",
    "5 & L.tensor([6, 3])",
    "L.tensor([True, False]) & L.tensor([3, 2])",
    "L.tensor([True, False]) ^ L.tensor([True, True])",
    "~L.tensor([1, -2])",
    "~L.tensor([True, False])",
]


@pytest.mark.parametrize("expr", PROMOTIONS)
def test_type_promotion_matches_pytorch(expr):
    ours = eval(expr, {"L": core, "np": np})
    ref = eval(expr, {"L": torch, "np": np})
    assert f"torch.{ours.dtype}" == str(ref.dtype)
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=1e-6)


def test_a_float32_model_stays_float32_next_to_integer_and_double_constants():
    w = core.randn(4, 3, requires_grad=True)
    pos = core.arange(4) * 0.5  # float32, as in PyTorch
    scale = core.tensor(np.sqrt(3.0))  # a 0-d float64 tensor from a NumPy scalar
    y = ((pos.unsqueeze(1) + w) * scale / 2).sum()
    assert y.dtype == np.float32
    y.backward()
    assert w.grad.dtype == np.float32


# --- what fuzzing against PyTorch found (2026-11-26) ------------------------------------------------


@pytest.mark.parametrize("key", [(0, slice(None), [1, 2]), (1, Ellipsis, [0, 2]), (None, [1, 1], Ellipsis, 0),
                                 (slice(None), 0, [2, 2]), (0, [[1, 2], [3, 3]], slice(0, 2)), ([0, 1], 0)])
def test_integers_index_before_arrays_as_in_pytorch(key):
    """x[0, :, [1, 2]] is (5, 2) in PyTorch, which applies the integer first; NumPy's rule gives (2, 5)."""
    a = np.random.default_rng(0).standard_normal((4, 5, 3))
    x, t = core.Tensor(a, requires_grad=True), torch.tensor(a, requires_grad=True)
    y, ty = x[key], t[tuple(torch.tensor(k) if isinstance(k, list) else k for k in key)]
    assert y.shape == tuple(ty.shape)
    np.testing.assert_array_equal(y.data, ty.detach().numpy())
    g = np.random.default_rng(1).standard_normal(y.shape)
    y.backward(core.Tensor(g))
    ty.backward(torch.tensor(g))
    np.testing.assert_array_equal(x.grad, t.grad.numpy())  # repeated indices add up


def test_tensor_bounds_and_fill_values_get_their_gradients():
    x, lo, hi = (core.Tensor(np.array(v), requires_grad=True) for v in ([0.0, 2.0, 5.0], [1.0, 1.0, 1.0], [4.0]))
    x.clamp(min=lo, max=hi).sum().backward()
    np.testing.assert_array_equal(x.grad, [0, 1, 0])
    np.testing.assert_array_equal(lo.grad, [1, 0, 0])
    np.testing.assert_array_equal(hi.grad, [1])
    value = core.Tensor(np.array(5.0), requires_grad=True)
    core.Tensor(np.zeros(3), requires_grad=True).masked_fill(np.array([True, False, True]), value).sum().backward()
    assert value.grad == 2.0
    clamped = core.tensor([0, 1, 2]).clamp(min=0.5)
    assert clamped.dtype == np.float32 and clamped.data.tolist() == [0.5, 1.0, 2.0]  # torch: float32 [0.5, 1, 2]


def test_max_of_everything_sends_a_nan_its_gradient():
    x, t = core.Tensor(np.array([1.0, np.nan, 3.0]), requires_grad=True), torch.tensor([1.0, np.nan, 3.0],
                                                                                        requires_grad=True)
    x.max().backward()
    t.max().backward()
    np.testing.assert_array_equal(x.grad, t.grad.numpy())  # [0, 1, 0]


def test_dtype_promotion_and_dims_of_where_cat_stack():
    c = core.tensor(np.array([True, False]))
    assert core.where(c, core.zeros(2), core.tensor(np.array([1, 2]))).dtype == np.float32
    assert core.where(c, 1.0, 2.0).dtype == np.float32
    assert core.cat([core.zeros(2), core.tensor(np.array([1, 2]))]).dtype == np.float32
    assert core.tensor(np.array([1, 2])).logsumexp(0).dtype == np.float32
    for bad in (lambda: core.cat([core.zeros(2, 3)] * 2, 2), lambda: core.cat([core.zeros(2, 3)] * 2, -3),
                lambda: core.stack([core.zeros(2, 3)] * 2, 3), lambda: core.zeros(2, 3).transpose(0, 3)):
        with pytest.raises(IndexError, match="out of range"):
            bad()
    with pytest.raises(RuntimeError, match="start_dim 2 cannot come after end_dim 1"):
        core.zeros(2, 3, 4, 5).flatten(2, 1)
    with pytest.raises(ValueError, match="zero-dimensional"):
        core.cat([core.tensor(1.0), core.tensor(2.0)])
    with pytest.raises(ValueError, match=r"batch dims of \(2, 2, 3\) and \(3, 3, 2\)"):
        core.zeros(2, 2, 3) @ core.zeros(3, 3, 2)
    assert core.zeros(2, 3).argmax(keepdim=True).shape == (1, 1)


def test_reductions_over_empty_dims_as_in_pytorch():
    from core import functional as F

    np.testing.assert_array_equal(core.zeros(0, 3).logsumexp(0).data, torch.zeros(0, 3).logsumexp(0).numpy())
    assert F.softmax(core.zeros(0, 3), 0).shape == (0, 3) and core.zeros(0, 3).amax(1).shape == (0,)
    assert [p.shape for p in core.zeros(0, 3).split(2, 0)] == [(0, 3)]
    with pytest.raises(RuntimeError, match="empty dimension"):
        core.zeros(0, 3).amax(0)


def test_in_place_arithmetic_changes_the_tensor_itself():
    """x += 1 changes x, which other names for it see (an optimizer step `p -= lr * g` under no_grad updates the
    model's p); where a gradient would be recorded it is refused instead of silently making a new tensor."""
    x = core.zeros(3)
    alias = x
    x += 1
    x *= 3
    assert alias is x and alias.data.tolist() == [3.0, 3.0, 3.0]
    p = core.Tensor(np.ones(2), requires_grad=True)
    with core.no_grad():
        p -= 0.5 * core.Tensor(np.ones(2))
    assert p.is_leaf and p.data.tolist() == [0.5, 0.5]
    with pytest.raises(RuntimeError, match="part of a graph"):
        p += 1
    with pytest.raises(RuntimeError, match="part of a graph"):
        x += p
    with pytest.raises(TypeError, match="cannot be stored"):
        ints = core.tensor(np.array([1, 2]))
        ints += 0.5
    with pytest.raises(RuntimeError, match="shape"):
        y = core.zeros(3)
        y += core.zeros(2, 3)


def test_var_std_take_pytorch_unbiased_positionally():
    a = np.random.default_rng(0).standard_normal((3, 4))
    x, t = core.Tensor(a), torch.tensor(a)
    for args, kw in [((), {}), ((1,), {}), ((1, False), {}), ((1, True, True), {}), ((0,), {"correction": 2})]:
        np.testing.assert_allclose(x.var(*args, **kw).data, t.var(*args, **kw).numpy(), rtol=1e-12)
        np.testing.assert_allclose(x.std(*args, **kw).data, t.std(*args, **kw).numpy(), rtol=1e-12)
    with pytest.raises(ValueError, match="not both"):
        x.var(0, True, correction=1)


def _against_torch(a, ours, theirs, with_index=True):
    """ours(x) and theirs(t) on the same array: values, indices, and the gradient of a random projection."""
    x, t = core.Tensor(a, requires_grad=True), torch.tensor(a, requires_grad=True)
    (y, iy), (ty, ti) = (ours(x), theirs(t)) if with_index else ((ours(x), None), (theirs(t), None))
    np.testing.assert_allclose(y.data, ty.detach().numpy(), rtol=1e-12)
    if with_index:
        np.testing.assert_array_equal(iy.data, ti.numpy())
    if y.data.size:
        g = np.random.default_rng(3).standard_normal(y.shape)
        y.backward(core.Tensor(g))
        ty.backward(torch.tensor(g))
        np.testing.assert_allclose(x.grad, t.grad.numpy(), rtol=1e-12)


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_sort_topk_cumsum_match_pytorch(dim):
    """sort is stable (ties keep their order, as torch's stable=True); topk is compared without ties (PyTorch leaves
    their order unspecified; ours keeps the lower index first)."""
    rng = np.random.default_rng(2)
    ties, distinct = np.round(rng.standard_normal((3, 6))), rng.standard_normal((3, 6))
    for desc in (False, True):
        _against_torch(ties, lambda x: x.sort(dim, desc), lambda t: t.sort(dim=dim, descending=desc, stable=True))
    for k, largest in ((2, True), (2, False), (0, True), (distinct.shape[dim], False)):
        _against_torch(distinct, lambda x: x.topk(k, dim, largest), lambda t: t.topk(k, dim, largest))
    _against_torch(distinct, lambda x: x.cumsum(dim), lambda t: t.cumsum(dim), with_index=False)
    with pytest.raises(ValueError, match="topk: k = 7"):
        core.zeros(3, 6).topk(7)


def test_chunk_of_an_empty_dim_gives_chunks_pieces():
    for chunks in (1, 2, 3):
        assert [p.shape for p in core.zeros(0, 3).chunk(chunks, 0)] == [tuple(p.shape)
                                                                       for p in torch.zeros(0, 3).chunk(chunks, 0)]


ERRORS = [  # what PyTorch refuses, ours refuses too, naming the op
    ("L.tensor([True, False]) - 1", "sub"),
    ("1.5 - L.tensor([True, False])", "sub"),
    ("L.ones(2) - L.tensor([True, False])", "sub"),
    ("-L.tensor([True, False])", "neg"),
    ("L.ones(2) & L.tensor([True, False])", "bitwise_and"),
    ("L.tensor([1, 2]) | 0.5", "bitwise_or"),
    ("~L.ones(2)", "bitwise_not"),
    ("L.tensor([1, 2]).var()", "var"),
    ("L.tensor([True, False]).std(0)", "std"),
    ("L.tensor([True, False]).argmax()", "argmax"),
    ("L.tensor([[True, False]]).argmin(1)", "argmin"),
    ("L.ones(2, 3) @ L.ones(3, dtype=L.float64)", "matmul"),
    ("L.ones(2, 3) @ L.tensor([1, 2, 3])", "matmul"),
    ("L.ones(2).masked_fill(L.tensor([True, False]), L.tensor([5.0]))", "masked_fill"),
    ("L.arange(4)[::-1]", "step"),
    ("L.arange(6).reshape(2, 3)[1, ::-2]", "step"),
]


@pytest.mark.parametrize("expr, name", ERRORS, ids=[e[0] for e in ERRORS])
def test_what_pytorch_refuses_is_refused(expr, name):
    with pytest.raises((RuntimeError, TypeError, ValueError, NotImplementedError, IndexError)):
        eval(expr, {"L": torch})
    with pytest.raises((RuntimeError, TypeError, ValueError), match=name):
        eval(expr, {"L": core})


def test_max_min_over_a_dim_of_bools_and_an_empty_index_list():
    b = [[True, False], [False, False]]
    for ours, ref in ((core.tensor(b).max(1), torch.tensor(b).max(1)), (core.tensor(b).min(0), torch.tensor(b).min(0))):
        np.testing.assert_array_equal(ours.values.numpy(), ref.values.numpy())
        np.testing.assert_array_equal(ours.indices.numpy(), ref.indices.numpy())
    assert core.arange(6.0).reshape(2, 3)[[]].shape == tuple(torch.arange(6.0).reshape(2, 3)[[]].shape) == (0, 3)


def test_setitem_applies_integers_before_arrays_as_in_pytorch():
    ours, ref = core.zeros(2, 3, 4), torch.zeros(2, 3, 4)
    ours[0, :, [1, 2]] = core.tensor([[1.0, 2.0]] * 3)
    ref[0, :, [1, 2]] = torch.tensor([[1.0, 2.0]] * 3)
    np.testing.assert_array_equal(ours.numpy(), ref.numpy())
    with pytest.raises(ValueError, match="step"):
        ours[::-1] = 0.0


def test_sort_of_a_0d_tensor_is_itself_at_index_0():
    x, t = core.tensor(3.0, requires_grad=True), torch.tensor(3.0, requires_grad=True)
    (ours, i), (ref, ti) = x.sort(descending=True), t.sort(descending=True)
    assert ours.shape == tuple(ref.shape) == () and ours.item() == ref.item() and i.item() == ti.item() == 0
    (ours * 2).backward()
    assert x.grad.item() == 2.0
