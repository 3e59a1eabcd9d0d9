"""Attention kernels: the patterns follow the issue's words, the NumPy reference equals PyTorch's SDPA, and the
Numba CPU kernel equals the reference (forward and backward, every mask kind, fully blocked rows included).

The CUDA kernels are checked in ``test_attention_cuda.py`` (simulator and PTX compile, in subprocesses).
"""

import functools
from unittest import mock

import numba
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels.attention import attention_backward, attention_forward, patterns, reference
from kernels.attention.patterns import Causal, Column, Conv, PrefixLM, Row

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------------------------
# Patterns: each rule against a loop over (q, k) written from the issue's definitions.


def brute_force(pattern, n):
    """The mask of the issue's words: text queries (q < T) see k ≤ q; image queries see every text key and,
    among image keys, only k ≤ q and the pattern's rule; PrefixLM: k < P for all, else k ≤ q."""
    m = np.zeros((n, n), dtype=bool)
    for q in range(n):
        for k in range(n):
            if isinstance(pattern, Causal):
                ok = k <= q
            elif isinstance(pattern, PrefixLM):
                ok = k < pattern.prefix_len or k <= q
            else:
                T, W = pattern.text_len, pattern.width
                if q < T:
                    ok = k <= q
                elif k < T:
                    ok = True
                elif k > q:
                    ok = False
                elif isinstance(pattern, Row):
                    ok = q - k <= W
                elif isinstance(pattern, Column):
                    ok = (q - k) % W == 0
                else:  # Conv
                    r = pattern.kernel // 2
                    row_q, col_q = divmod(q - T, W)
                    row_k, col_k = divmod(k - T, W)
                    dc = abs(col_q - col_k)
                    ok = row_q - row_k <= r and min(dc, W - dc) <= r
            m[q, k] = ok
    return m


@st.composite
def any_pattern(draw):
    kind = draw(st.sampled_from(["causal", "row", "column", "conv", "prefix"]))
    T, W = draw(st.integers(0, 6)), draw(st.integers(1, 6))
    if kind == "causal":
        return Causal()
    if kind == "row":
        return Row(text_len=T, width=W)
    if kind == "column":
        return Column(text_len=T, width=W)
    if kind == "conv":
        return Conv(text_len=T, width=W, kernel=draw(st.sampled_from([1, 3, 5])))
    return PrefixLM(prefix_len=draw(st.integers(0, 12)))


def pattern_size(pattern, extra):
    """n covering the text and the whole grid, plus ``extra`` (a partial last row, or more)."""
    if isinstance(pattern, (Row, Column, Conv)):
        return pattern.text_len + pattern.width**2 + extra
    return 1 + extra


@SETTINGS
@given(any_pattern(), st.integers(0, 12))
def test_pattern_mask_matches_the_issue(pattern, extra):
    n = pattern_size(pattern, extra)
    expected = brute_force(pattern, n)
    np.testing.assert_array_equal(pattern.mask(n), expected)
    scalar = np.array([[pattern.visible(q, k) for k in range(n)] for q in range(n)])  # the in-kernel rule
    np.testing.assert_array_equal(scalar, expected)


def test_pattern_examples():
    # DALL·E's row pattern at T = 1, W = 3: query 7 (grid row 1, column 2) sees the text, then 4..7.
    row = Row(text_len=1, width=3).mask(10)
    assert row[7].nonzero()[0].tolist() == [0, 4, 5, 6, 7]
    col = Column(text_len=1, width=3).mask(10)
    assert col[7].nonzero()[0].tolist() == [0, 1, 4, 7]
    # Conv 3×3 on a 4-wide grid, query at row 2, column 0: rows 1..2, columns 3, 0, 1 (wrapping), causal.
    conv = Conv(text_len=0, width=4, kernel=3).mask(16)
    assert conv[8].nonzero()[0].tolist() == [4, 5, 7, 8]
    assert PrefixLM(prefix_len=3).mask(5)[0].tolist() == [True, True, True, False, False]
    np.testing.assert_array_equal(Causal().mask(4), np.tril(np.ones((4, 4), dtype=bool)))


@st.composite
def tile(draw, n):
    q0, k0 = draw(st.integers(0, n - 1)), draw(st.integers(0, n - 1))
    return q0, draw(st.integers(q0 + 1, n)), k0, draw(st.integers(k0 + 1, n))


@SETTINGS
@given(any_pattern(), st.integers(0, 8), st.data())
def test_tile_rules_are_safe(pattern, extra, data):
    """A skipped tile holds no visible pair (exact for all but Conv, which may keep an empty tile);
    a tile declared all-visible has no blocked pair."""
    n = pattern_size(pattern, extra)
    m = pattern.mask(n)
    # every tile of the grids of 1×1 ... 4×4 tiles, and some arbitrary tiles
    grid = [(i, min(i + b, n), j, min(j + b, n)) for b in range(1, 5) for i in range(0, n, b) for j in range(0, n, b)]
    for q0, q1, k0, k1 in grid + [data.draw(tile(n)) for _ in range(20)]:
        any_visible = bool(m[q0:q1, k0:k1].any())
        may = pattern.tile_may_attend(q0, q1, k0, k1)
        if not isinstance(pattern, Conv):
            assert may == any_visible, (q0, q1, k0, k1)
        assert may or not any_visible, (q0, q1, k0, k1)
        if patterns.tile_all_visible(*pattern.params, q0, q1, k0, k1):
            assert m[q0:q1, k0:k1].all(), (q0, q1, k0, k1)


def test_tile_skipping_prunes_the_dalle_shape():
    """At T = 64 with a 32×32 grid and 64×64 tiles, Row and Conv leave most tiles out (that is the speed-up)."""
    n, b = 64 + 32 * 32, 64
    for pattern, most in [(Causal(), 0.55), (Row(text_len=64, width=32), 0.35), (Conv(64, 32, 11), 0.45)]:
        tiles = [(i, min(i + b, n), j, min(j + b, n)) for i in range(0, n, b) for j in range(0, n, b)]
        kept = [pattern.tile_may_attend(*t) for t in tiles]
        assert np.mean(kept) < most, (pattern, np.mean(kept))


# ---------------------------------------------------------------------------------------------------------------
# Shared strategies for the kernel tests.


@st.composite
def attention_case(draw, max_len=80, max_dim=12, dtypes=(np.float32, np.float64), tile=64, max_batch=2, max_heads=3):
    """Random q, k, v, dout with odd sizes, L ≠ S, D ≠ Dv, and a mask kind: none, causal, pattern, bool, additive
    (broadcast over heads and/or batch), possibly with fully blocked rows. Lengths favour the tile edges."""
    dtype = draw(st.sampled_from(dtypes))
    B, H = draw(st.integers(1, max_batch)), draw(st.integers(1, max_heads))
    edges = [n for t in range(tile, max_len + 2, tile) for n in (t - 1, t, t + 1) if n <= max_len]
    length = st.one_of(st.integers(1, max_len), st.sampled_from([1] + edges))
    L, S = draw(length), draw(length)
    D, Dv = draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim))
    kind = draw(st.sampled_from(["none", "causal", "pattern", "bool", "additive", "pattern+bool"]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    kw = {"scale": draw(st.sampled_from([None, 0.1, 1 / np.sqrt(D), 1.7])), "causal": False}
    if kind == "causal":
        kw["causal"] = True
    if kind.startswith("pattern"):
        pattern = draw(any_pattern())
        S = L  # patterns are over one sequence (self-attention)
        kw["pattern"] = pattern
        kw["causal"] = draw(st.booleans())
    if kind in ("bool", "additive", "pattern+bool"):
        shape = draw(st.sampled_from([(B, H, L, S), (B, 1, L, S), (1, H, L, S), (L, S), (S,), (B, 1, 1, S)]))
        if kind == "additive":
            mask = rng.standard_normal(shape)
            mask = np.where(rng.random(shape) < 0.3, -np.inf, mask)  # blocked entries, maybe whole rows
        else:
            mask = rng.random(shape) < draw(st.sampled_from([0.3, 0.7, 0.95]))
            if draw(st.booleans()) and len(shape) >= 2:
                mask[..., 0, :] = False  # a fully blocked row
        kw["mask"] = mask
    q = rng.standard_normal((B, H, L, D)).astype(dtype)
    k = rng.standard_normal((B, H, S, D)).astype(dtype)
    v = rng.standard_normal((B, H, S, Dv)).astype(dtype)
    dout = rng.standard_normal((B, H, L, Dv)).astype(dtype)
    return q, k, v, dout, kw


def tolerances(dtype):
    return {"rtol": 2e-4, "atol": 2e-5} if dtype == np.float32 else {"rtol": 1e-10, "atol": 1e-12}


def assert_same(form, q, k, v, dout, kw):
    """``form`` equals the reference: out, lse (−inf in the same places), dq, dk, dv; all finite."""
    tol = tolerances(q.dtype)
    out_r, lse_r = attention_forward(q, k, v, form="reference", **kw)
    out, lse = attention_forward(q, k, v, form=form, **kw)
    assert out.shape == out_r.shape and out.dtype == q.dtype and lse.dtype == q.dtype
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse_r))
    assert np.isfinite(out).all() and not np.isnan(lse).any()
    np.testing.assert_allclose(out, out_r, **tol)
    finite = np.isfinite(lse_r)
    np.testing.assert_allclose(lse[finite], lse_r[finite], **tol)
    grads_r = attention_backward(q, k, v, out_r, lse_r, dout, form="reference", **kw)
    grads = attention_backward(q, k, v, out, lse, dout, form=form, **kw)
    for name, g, g_r in zip(("dq", "dk", "dv"), grads, grads_r):
        assert g.shape == g_r.shape and g.dtype == q.dtype and np.isfinite(g).all(), name
        scale = max(1.0, float(np.abs(g_r).max()))
        np.testing.assert_allclose(g, g_r, rtol=tol["rtol"], atol=tol["atol"] * scale, err_msg=name)


def nan_cases(dtype, D=4):
    """Scores PyTorch turns into NaN rows: an additive mask holding a NaN and a +inf (beside a fully blocked row,
    which stays 0), a key holding a NaN (every row sees it), and mask rows of only NaN or of −inf and one NaN."""
    rng = np.random.default_rng(8)
    q, k, v, dout = (rng.standard_normal((1, 2, 9, D)).astype(dtype) for _ in range(4))
    mask = np.zeros((9, 9), dtype)
    mask[2, 3], mask[5, 0], mask[7] = np.nan, np.inf, -np.inf
    k_nan = k.copy()
    k_nan[0, 1, 4, D - 1] = np.nan
    yield q, k, v, dout, {"scale": 0.5, "mask": mask}
    yield q, k_nan, v, dout, {"scale": 0.5}
    # rows with no finite score at all, which the online softmax's max (skipping NaN) takes for blocked ones (a NaN
    # query too, but PyTorch's float32 kernel gives that row zeros and its float64 one NaN: see nan_query_case)
    blocked = np.zeros((9, 9), dtype)
    blocked[1], blocked[4] = -np.inf, np.nan
    blocked[1, 8] = np.nan
    yield q, k, v, dout, {"scale": 0.5, "mask": blocked}


def nan_query_case(dtype, D=4):
    """A query holding a NaN: its row has no finite score (NaN, as the reference and PyTorch's float64 give it)."""
    q, k, v, dout, kw = next(nan_cases(dtype, D))
    q = q.copy()
    q[0, 1, 2, D - 1] = np.nan
    return q, k, v, dout, {"scale": 0.5}


def assert_nan_where_reference(form, q, k, v, dout, kw):
    """``form`` is NaN exactly where the reference is (out, lse, dq, dk, dv), and equals it elsewhere."""
    tol = tolerances(q.dtype)
    fwd_r = attention_forward(q, k, v, form="reference", **kw)
    fwd = attention_forward(q, k, v, form=form, **kw)
    grads_r = attention_backward(q, k, v, *fwd_r, dout, form="reference", **kw)
    grads = attention_backward(q, k, v, *fwd, dout, form=form, **kw)
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), (*fwd, *grads), (*fwd_r, *grads_r)):
        assert np.isnan(want).any(), name
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=name)
        finite = np.abs(want[np.isfinite(want)])
        scale = max(1.0, float(finite.max())) if finite.size else 1.0
        np.testing.assert_allclose(got, want, rtol=tol["rtol"], atol=tol["atol"] * scale, err_msg=name)


# ---------------------------------------------------------------------------------------------------------------
# The reference equals PyTorch (float64, forward and backward).


def torch_sdpa(q, k, v, dout, kw):
    """PyTorch's SDPA on the same inputs, the pattern given as a dense boolean attn_mask."""
    allowed = reference.pattern_mask(q.shape[-2], k.shape[-2], False, kw.get("pattern"))
    mask = kw.get("mask")
    attn_mask = None
    if mask is not None:
        attn_mask = torch.from_numpy(np.ascontiguousarray(mask).reshape((1,) * (mask.ndim < 2) + mask.shape))
    if allowed is not None:
        a = torch.from_numpy(allowed)
        if attn_mask is None:
            attn_mask = a
        elif attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & a
        else:
            attn_mask = attn_mask.masked_fill(~a, -np.inf)
    causal = kw.get("causal", False)
    if causal and attn_mask is not None:  # torch refuses attn_mask together with is_causal
        tril = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        attn_mask = attn_mask & tril if attn_mask.dtype == torch.bool else attn_mask.masked_fill(~tril, -np.inf)
        causal = False
    tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(
        tq, tk, tv, attn_mask=attn_mask, is_causal=causal, scale=kw.get("scale")
    )
    out.backward(torch.from_numpy(dout))
    return out.detach().numpy(), tq.grad.numpy(), tk.grad.numpy(), tv.grad.numpy()


@SETTINGS
@given(attention_case(max_len=40, dtypes=(np.float64,)))
def test_reference_equals_pytorch(case):
    q, k, v, dout, kw = case
    out, lse = reference.attention_forward(q, k, v, **{**kw, "scale": kw["scale"] or 1 / np.sqrt(q.shape[-1])})
    grads = reference.attention_backward(
        q, k, v, out, lse, dout, **{**kw, "scale": kw["scale"] or 1 / np.sqrt(q.shape[-1])}
    )
    t_out, t_dq, t_dk, t_dv = torch_sdpa(q, k, v, dout, kw)
    live = np.isfinite(lse)  # rows with something to attend to
    np.testing.assert_allclose(out[live], t_out[live], rtol=1e-10, atol=1e-12)
    # A fully blocked row: ours gives out = 0 and no gradient; PyTorch gives 0 (this version) or NaN (some).
    assert (out[~live] == 0).all() and (grads[0][~live] == 0).all()
    torch_defined = np.isfinite(t_out).all() and all(np.isfinite(g).all() for g in (t_dq, t_dk, t_dv))
    if torch_defined:
        np.testing.assert_array_equal(t_out[~live], 0.0)
        for g, tg in zip(grads, (t_dq, t_dk, t_dv)):
            np.testing.assert_allclose(g, tg, rtol=1e-9, atol=1e-11)
    else:  # NaN from the blocked rows may reach every key's gradient: compare what it cannot reach
        np.testing.assert_allclose(grads[0][live], t_dq[live], rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------------------------------------------------------
# The Numba CPU kernel equals the reference.


@settings(SETTINGS, max_examples=60)
@given(attention_case(max_len=150))
def test_cpu_equals_reference(case):
    q, k, v, dout, kw = case
    assert_same("cpu", q, k, v, dout, kw)


def tile_edge_cases(tile):
    """Deterministic cases at the tile edges (one query or key past a tile, exactly full tiles), causal and
    every pattern with the extra causal flag, where an off-by-one in the tile loops would show."""
    rng = np.random.default_rng(3)
    for n in (1, tile - 1, tile, tile + 1, 2 * tile + 1):
        for kw in [
            {"causal": True},
            {"pattern": Row(text_len=3, width=5), "causal": True},
            {"pattern": Column(text_len=2, width=4), "causal": True},
            {"pattern": Conv(text_len=1, width=6, kernel=3), "causal": True},
            {"pattern": PrefixLM(prefix_len=n // 2), "causal": True},
            {"pattern": PrefixLM(prefix_len=n // 2), "mask": rng.random(n) < 0.8},
        ]:
            q, k = (rng.standard_normal((1, 2, n, 3)) for _ in range(2))
            v, dout = (rng.standard_normal((1, 2, n, 2)) for _ in range(2))
            yield q, k, v, dout, {"scale": 0.7, **kw}


def test_cpu_at_tile_edges():
    from kernels.attention import cpu

    for q, k, v, dout, kw in tile_edge_cases(cpu.BQ):
        assert_same("cpu", q, k, v, dout, kw)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "pattern",
    [
        Causal(),
        Row(text_len=5, width=9),
        Column(text_len=3, width=11),
        Conv(text_len=7, width=10, kernel=5),
        PrefixLM(prefix_len=70),
    ],
    ids=repr,
)
def test_cpu_patterns_across_many_tiles(pattern, dtype):
    """Sequences spanning several tiles with partial ones at the end, so skipped and partial tiles both occur."""
    rng = np.random.default_rng(0)
    L = 131 if not isinstance(pattern, (Row, Column, Conv)) else pattern.text_len + pattern.width**2 + 3
    q, k = (rng.standard_normal((2, 2, L, 8)).astype(dtype) for _ in range(2))
    v, dout = (rng.standard_normal((2, 2, L, 5)).astype(dtype) for _ in range(2))
    assert_same("cpu", q, k, v, dout, {"scale": 0.4, "pattern": pattern})


@settings(SETTINGS, max_examples=40)
@given(attention_case(max_len=260, max_dim=8, max_batch=1, max_heads=2), st.integers(2, 5))
def test_cpu_backward_splits_key_blocks_over_groups(case, groups):
    """Few heads (B·H = 1 or 2): the backward deals a head's key blocks to groups (parallel tasks) and sums their
    partial dQ. Every mask kind and pattern, L and S across several key tiles: equal to the reference, and dK, dV
    bitwise equal to one group per head (each key block is computed the same way, only dQ's sum order changes)."""
    from kernels.attention import cpu

    q, k, v, dout, kw = case
    assert_same("cpu", q, k, v, dout, kw)  # groups from the thread count (1 or 2 here)
    out, lse = attention_forward(q, k, v, form="cpu", **kw)
    backward = cpu.backward
    runs = {}
    for g in (1, groups):
        with mock.patch.object(cpu, "backward", functools.partial(backward, groups=g)):
            runs[g] = attention_backward(q, k, v, out, lse, dout, form="cpu", **kw)
    grads_r = attention_backward(q, k, v, out, lse, dout, form="reference", **kw)
    tol = tolerances(q.dtype)
    for name, g, g_r in zip(("dq", "dk", "dv"), runs[groups], grads_r):
        scale = max(1.0, float(np.abs(g_r).max()))
        np.testing.assert_allclose(g, g_r, rtol=tol["rtol"], atol=tol["atol"] * scale, err_msg=name)
    np.testing.assert_array_equal(runs[groups][1], runs[1][1])
    np.testing.assert_array_equal(runs[groups][2], runs[1][2])


def test_cpu_backward_groups_follow_the_thread_count():
    """One head and two threads: two key-block groups (one task a thread); many heads: one group per head; never
    more groups than key blocks."""
    from kernels.attention import cpu

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs two Numba threads")
    seen = []
    real = cpu._backward
    previous = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        with mock.patch.object(cpu, "_backward", lambda *a: seen.append((a[-2], a[-1].shape)) or real(*a)):
            for bh, s in [(1, 300), (4, 300), (1, 30)]:
                x = np.ones((1, bh, s, 4))
                out, lse = attention_forward(x, x, x, form="cpu")
                attention_backward(x, x, x, out, lse, x, form="cpu")
    finally:
        numba.set_num_threads(previous)
    assert seen == [(2, (2, 300, 4)), (1, (0, 300, 4)), (1, (0, 30, 4))]


def test_cpu_three_dim_inputs_and_default_scale():
    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((3, 17, 6)), rng.standard_normal((3, 70, 6)), rng.standard_normal((3, 70, 4))
    mask = rng.random((3, 1, 70)) < 0.5  # broadcast over queries: key padding per sequence
    out, lse = attention_forward(q, k, v, mask=mask)
    out_r, lse_r = reference.attention_forward(q, k, v, scale=1 / np.sqrt(6), mask=mask)
    np.testing.assert_allclose(out, out_r, rtol=1e-10, atol=1e-12)
    assert out.shape == (3, 17, 4) and lse.shape == (3, 17)
    dq, dk, dv = attention_backward(q, k, v, out, lse, np.ones_like(out), mask=mask)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


def test_cpu_non_contiguous_inputs():
    """Views in another memory order (heads after the sequence, as a (B, L, H, D) projection gives them)."""
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((2, 67, 3, 8)).transpose(0, 2, 1, 3) for _ in range(3))
    dout = rng.standard_normal((2, 67, 3, 8)).transpose(0, 2, 1, 3)
    assert not q.flags.c_contiguous
    assert_same("cpu", q, k, v, dout, {"scale": 0.3, "pattern": Conv(text_len=3, width=8, kernel=3)})
    strided = [x[..., ::2, :] for x in (q, k, v, dout)]  # every other position
    assert_same("cpu", *strided, {"scale": 0.3, "causal": True})


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fully_blocked_rows_give_zeros_not_nan(dtype):
    rng = np.random.default_rng(2)
    q, k, v, dout = (rng.standard_normal((1, 2, 70, 4)).astype(dtype) for _ in range(4))
    mask = np.ones((70, 70), dtype=bool)
    mask[[0, 5, 69]] = False
    additive = np.where(mask, 0.0, -np.inf)
    for m in (mask, additive):
        for form in ("reference", "cpu"):
            out, lse = attention_forward(q, k, v, scale=0.5, mask=m, form=form)
            assert (out[:, :, [0, 5, 69]] == 0).all() and np.isneginf(lse[:, :, [0, 5, 69]]).all()
            assert np.isfinite(out).all() and np.isfinite(lse[:, :, 1:5]).all()
            dq, dk, dv = attention_backward(q, k, v, out, lse, dout, scale=0.5, mask=m, form=form)
            assert (dq[:, :, [0, 5, 69]] == 0).all()
            assert np.isfinite(dq).all() and np.isfinite(dk).all() and np.isfinite(dv).all()
    # every row blocked: everything zero
    out, lse = attention_forward(q, k, v, scale=0.5, mask=np.zeros((70, 70), dtype=bool))
    assert (out == 0).all() and np.isneginf(lse).all()
    grads = attention_backward(q, k, v, out, lse, dout, scale=0.5, mask=np.zeros((70, 70), dtype=bool))
    assert all((g == 0).all() for g in grads)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_and_inf_scores_make_their_rows_nan_as_in_pytorch(dtype):
    """A NaN or +inf score is not a blocked key: the rows (and the gradients) it reaches are NaN, where PyTorch's
    are — never a finite answer with the key dropped, nor a zero row, which would hide a diverging run."""
    for q, k, v, dout, kw in nan_cases(dtype):
        tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
        mask = kw.get("mask")
        out = torch.nn.functional.scaled_dot_product_attention(
            tq, tk, tv, attn_mask=None if mask is None else torch.tensor(mask), scale=kw["scale"])
        out.backward(torch.tensor(dout))
        want = [a.detach().numpy() for a in (out, tq.grad, tk.grad, tv.grad)]
        out_r, lse_r = attention_forward(q, k, v, form="reference", **kw)
        got = [out_r, *attention_backward(q, k, v, out_r, lse_r, dout, form="reference", **kw)]
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.isnan(g), np.isnan(w))
            np.testing.assert_allclose(g, w, **tolerances(dtype))
        assert_nan_where_reference("cpu", q, k, v, dout, kw)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_scores_in_a_row_with_no_finite_score_make_it_nan(dtype):
    """A row whose visible scores are only NaN and −inf (a NaN query; a mask of −inf with a NaN, in the first key
    tile or a later one) is NaN, as in PyTorch and the reference — not a fully blocked row of zeros with lse −inf:
    the online softmax's max skips the NaN, so the kernel must still carry it into the row sum."""
    rng = np.random.default_rng(11)
    for S in (3, 70, 130):
        q, dout = (rng.standard_normal((1, 2, 5, 4)).astype(dtype) for _ in range(2))
        k, v = (rng.standard_normal((1, 2, S, 4)).astype(dtype) for _ in range(2))
        q_nan = q.copy()
        q_nan[0, 1, 2, 3] = np.nan
        assert_nan_where_reference("cpu", q_nan, k, v, dout, {"scale": 0.5})
        mask = np.zeros((5, S), dtype)
        mask[1] = -np.inf
        mask[1, S - 1] = np.nan  # the last key tile
        mask[3, : min(S, 64)] = np.nan  # the first key tile, finite scores after it
        kw = {"scale": 0.5, "mask": mask}
        assert_nan_where_reference("cpu", q, k, v, dout, kw)
        tq, tk, tv = (torch.tensor(a) for a in (q, k, v))
        want = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=torch.tensor(mask), scale=0.5)
        out, lse = attention_forward(q, k, v, form="cpu", **kw)
        np.testing.assert_array_equal(np.isnan(out), np.isnan(want.numpy()))
        assert np.isnan(lse[:, :, [1, 3]]).all()


def test_empty_inputs_are_refused_with_their_shapes():
    q = np.zeros((1, 1, 4, 3))
    with pytest.raises(ValueError, match=r"non-empty q, k, v, got \(1, 1, 4, 3\), \(1, 1, 0, 3\)"):
        attention_forward(q, q[:, :, :0], q[:, :, :0], scale=1.0)


def test_arguments_are_checked():
    q = np.zeros((1, 1, 4, 3))
    with pytest.raises(ValueError):
        attention_forward(q, q, np.zeros((1, 1, 5, 3)), scale=1.0)
    with pytest.raises(TypeError):
        attention_forward(q, q.astype(np.float32), q, scale=1.0)
    with pytest.raises(ValueError):
        attention_forward(q, q, q, scale=1.0, mask=np.ones((2, 4), dtype=bool))
    with pytest.raises(TypeError):
        attention_forward(q, q, q, scale=1.0, pattern="causal")


def test_cpu_kernels_keep_openblas_on_one_thread():
    """Tiles with m·n·k > 262144 (e.g. D = 128) would make OpenBLAS start threads inside the kernel's threads
    (20× slower, or a hang under OpenMP): the CPU kernels run with SciPy's OpenBLAS set to one thread."""
    from kernels.attention import cpu

    control = cpu._openblas_thread_control()
    if control is None:
        pytest.skip("SciPy's BLAS is not a bundled OpenBLAS here")
    get, set_ = control
    before = get()
    with cpu._single_threaded_blas():
        assert get() == 1
    assert get() == before


def test_cpu_exp_polynomial():
    """The vectorizable float32 exp of the CPU kernel: within 2e-7 relative of exp on [−87, 0], 0 below, 0 at −inf
    (a blocked score); float64 uses the libm exp."""
    from numba import njit

    from kernels.attention.cpu import FASTMATH, exp_nonpositive

    @njit(fastmath=FASTMATH)
    def apply(x):
        y = np.empty_like(x)
        for i in range(x.size):
            y[i] = exp_nonpositive(x[i])
        return y

    x = -np.linspace(0, 87, 200_001).astype(np.float32)
    y = apply(x)
    assert y.dtype == np.float32
    exact = np.exp(x.astype(np.float64))
    assert np.max(np.abs(y - exact) / exact) < 2e-7
    np.testing.assert_array_equal(apply(np.array([-np.inf, -88.0, -1e4], dtype=np.float32)), 0.0)
    assert np.isnan(apply(np.array([np.nan], dtype=np.float32))).all()  # a NaN score is not a blocked one
    x64 = -np.linspace(0, 700, 1001)
    np.testing.assert_allclose(apply(x64), np.exp(x64), rtol=1e-15)


def test_cuda_tc_form_routes_the_backward(monkeypatch):
    """form="cuda_tc" (half precision on a GPU) sends the backward to the tensor-core kernel with every argument."""
    from kernels import attention
    from kernels.attention import cuda_tc

    seen = {}
    monkeypatch.setattr(cuda_tc, "attention_backward", lambda *a, **kw: seen.update(args=a, kw=kw) or "grads")
    q, k, v, out, lse, do = (np.zeros((1, 2, 3, 4), np.float16) for _ in range(6))
    got = attention.attention_backward(q, k, v, out, lse, do, scale=0.5, causal=True, form="cuda_tc")
    assert got == "grads" and all(a is b for a, b in zip(seen["args"], (q, k, v, out, lse, do)))
    assert seen["kw"] == dict(scale=0.5, mask=None, causal=True, pattern=None)


def test_pattern_arguments_must_be_counts():
    """A float or a bool is refused, not rounded into a count (PrefixLM(2.5) would see 2 prefix keys)."""
    for make in (lambda: Conv(text_len=0, width=3, kernel=2.5), lambda: PrefixLM(prefix_len=2.5),
                 lambda: Row(text_len=1.7, width=2), lambda: Row(text_len=float("nan"), width=2),
                 lambda: Conv(text_len=0, width=3, kernel=True), lambda: Column(text_len=-1, width=2)):
        with pytest.raises(ValueError, match="must be an int >="):
            make()
    with pytest.raises(ValueError, match="odd"):
        Conv(text_len=0, width=3, kernel=4)
    assert Row(text_len=np.int64(3), width=4).text_len == 3
