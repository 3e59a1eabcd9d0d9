"""Cases for the spatial, attention and Gumbel-softmax ops of core.functional.

Sizes stay small (N ≤ 2, C ≤ 4, H, W ≤ 7, k ≤ 3): gradcheck runs two forward passes per input
element (or per probe for inputs above 256 elements).
"""

from __future__ import annotations

import numpy as np

from . import Case


def _pair(d, lo, hi):
    """An int or a pair of ints in [lo, hi] (both spellings PyTorch accepts)."""
    a = d.int(lo, hi)
    return a if d.bool() else (a, d.int(lo, hi))


def _two(v):
    return v if isinstance(v, tuple) else (v, v)


def _image(d, shape):
    """An image batch; sometimes unbatched (C, H, W), which every spatial op also accepts."""
    x = d.array(shape)
    return x[0] if shape[0] == 1 and d.int(0, 3) == 0 else x


# --- convolution -----------------------------------------------------------------------------------


def _conv2d(d):
    groups = d.int(1, 2)
    c, k = groups * d.int(1, 2), groups * d.int(1, 2)
    kernel, stride, dilation = _pair(d, 1, 3), _pair(d, 1, 2), _pair(d, 1, 2)
    options = [_pair(d, 0, 2), "valid"] + (["same"] if _two(stride) == (1, 1) else [])
    padding = d.choice(options)
    pads = {"valid": (0, 0), "same": tuple(dd * (kk - 1) for dd, kk in zip(_two(dilation), _two(kernel)))}
    total = pads.get(padding) if isinstance(padding, str) else tuple(2 * p for p in _two(padding))
    eff = [dd * (kk - 1) + 1 for dd, kk in zip(_two(dilation), _two(kernel))]
    hw = [d.int(max(1, e - t), 7) for e, t in zip(eff, total)]
    x = _image(d, (d.int(1, 2), c, *hw))
    w = d.array((k, c // groups, *_two(kernel)))
    arrays = [x, w] + ([d.array((k,))] if d.bool() else [])
    return arrays, {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}


def _conv_transpose2d(d):
    groups = d.int(1, 2)
    cin, cout = groups * d.int(1, 2), groups * d.int(1, 2)
    kernel, stride, dilation = _two(_pair(d, 1, 3)), _two(_pair(d, 1, 3)), _two(_pair(d, 1, 2))
    output_padding = tuple(d.int(0, max(s, dd) - 1) for s, dd in zip(stride, dilation))
    hw = (d.int(1, 5), d.int(1, 5))
    # padding p shrinks the output by 2p: keep it >= 1
    full = [(h - 1) * s + dd * (kk - 1) + op + 1 for h, s, dd, kk, op in zip(hw, stride, dilation, kernel, output_padding)]
    padding = tuple(d.int(0, min(2, (f - 1) // 2)) for f in full)
    x = _image(d, (d.int(1, 2), cin, *hw))
    w = d.array((cin, cout // groups, *kernel))
    arrays = [x, w] + ([d.array((cout,))] if d.bool() else [])
    kwargs = {"stride": stride, "padding": padding, "output_padding": output_padding, "groups": groups,
              "dilation": dilation}
    return arrays, kwargs


# --- pooling ------------------------------------------------------------------------------------------


def _pool_geometry(d, dilation=1):
    kernel = _two(_pair(d, 1, 3))
    stride = None if d.bool() else _pair(d, 1, 3)
    padding = tuple(d.int(0, kk // 2) for kk in kernel)
    # padding of at most half the kernel keeps a real element in every window; with dilation a window
    # could still fall wholly in the padding (output -inf, tested in test_spatial.py), so then H >= the span
    hw = [d.int(max(1, dilation * (kk - 1) + 1 - (2 * p if dilation == 1 else 0)), 7) for kk, p in zip(kernel, padding)]
    return kernel, stride, padding, hw


def _avg_pool2d(d):
    kernel, stride, padding, hw = _pool_geometry(d)
    x = _image(d, (d.int(1, 2), d.int(1, 3), *hw))
    kwargs = {"kernel_size": kernel, "stride": stride, "padding": padding, "ceil_mode": d.bool(),
              "count_include_pad": d.bool()}
    if d.int(0, 4) == 0:
        kwargs["divisor_override"] = d.int(1, 5)
    return [x], kwargs


def _distinct(d, shape):
    """Values 0.01 or more apart, in random order: finite differences never flip a max (ties would)."""
    size = int(np.prod(shape))
    order = np.argsort(d.array((size,)))
    return (order * (4.0 / size) - 2.0).reshape(shape)


def _max_pool2d(d):
    dilation = d.int(1, 2)
    kernel, stride, padding, hw = _pool_geometry(d, dilation)
    n = d.int(1, 2)
    x = _distinct(d, (n, d.int(1, 3), *hw))
    if n == 1 and d.bool():
        x = x[0]
    kwargs = {"kernel_size": kernel, "stride": stride, "padding": padding, "dilation": dilation,
              "ceil_mode": d.bool()}
    return [x], kwargs


# --- interpolation and padding --------------------------------------------------------------------------


def _interpolate(d):
    spatial = d.shape(1, 3, 1, 5)
    x = d.array((d.int(1, 2), d.int(1, 3), *spatial))
    if d.bool():
        return [x], {"size": _one_or_all(d, [d.int(1, 9) for _ in spatial])}
    factors = [d.choice([0.5, 0.7, 1.0, 1.5, 1.7, 2.0, 2.5, 3.0]) for _ in spatial]
    kwargs = {"scale_factor": _one_or_all(d, [f if n * f >= 1 else 2.0 for n, f in zip(spatial, factors)])}
    if d.bool():
        kwargs["recompute_scale_factor"] = True
    return [x], kwargs


def _one_or_all(d, values):
    """One value for every spatial dim when they agree (sometimes), else a tuple."""
    return values[0] if len(set(values)) == 1 and d.bool() else tuple(values)


def _pad(d):
    mode = d.choice(["constant", "reflect", "replicate", "circular"])
    if mode == "constant":
        shape = d.shape(1, 4, 1, 4)
        dims = d.int(1, len(shape))
    else:
        dims = d.int(1, 3)
        shape = d.shape(dims + 1, dims + 1, 1, 4) if d.bool() else d.shape(dims + 2, dims + 2, 1, 3)
    pad = []
    for n in reversed(shape[len(shape) - dims :]):  # PyTorch's order: the last dim first
        before = d.int(-(n - 1) // 2, 3) if mode == "constant" else d.int(-(n // 2), 2)
        before = before if mode == "constant" else min(before, _limit(mode, n - max(-before, 0)))
        kept = n - max(-before, 0)
        after = d.int(-(kept - 1), 3) if mode == "constant" else d.int(0, 2)
        after = after if mode == "constant" else min(after, _limit(mode, kept))
        pad += [before, after]
    kwargs = {"mode": mode}
    if mode == "constant" and d.bool():
        kwargs["value"] = d.choice([0.0, 1.5, -2.0])
    return [d.array(shape)], {"pad": tuple(pad), **kwargs}


def _limit(mode, n):
    """The largest pad a non-constant mode allows on an axis of n elements."""
    return {"reflect": n - 1, "circular": n}.get(mode, 99)


# --- attention --------------------------------------------------------------------------------------------


def _sdpa(d):
    batch = d.shape(0, 2, 1, 3)
    length, source, e, ev = d.int(1, 5), d.int(1, 5), d.int(1, 4), d.int(1, 4)
    q = d.array((*batch, length, e))
    k = d.array((*d.broadcastable(batch), source, e))  # leading dims broadcast, as in PyTorch
    v = d.array((*k.shape[:-2], source, ev))
    kind = d.choice(["none", "bool", "additive", "causal"])
    arrays, kwargs = [q, k, v], {}
    # PyTorch broadcasts the mask but raises on a 1-D one (core accepts it), so keep the last two dims
    mask_shape = (*d.broadcastable(batch), *(1 if d.int(0, 3) == 0 else n for n in (length, source)))
    if kind == "bool":  # some rows may end up fully masked: they must give zeros, as in PyTorch
        arrays.append(d.bools(mask_shape, p=0.7))
    elif kind == "additive":
        arrays.append(d.array(mask_shape, -3.0, 1.0))
    elif kind == "causal":
        kwargs["is_causal"] = True
    if d.bool():
        kwargs["scale"] = d.choice([0.1, 0.5, 2.0])
    return arrays, kwargs


def _sdpa_fn(lib, F, q, k, v, *mask, **kwargs):
    return F.scaled_dot_product_attention(q, k, v, *mask, **kwargs)


def _sdpa_stable(d):
    """Scores of order ±1e4 (softmax without the max-shift overflows here) and near-ties of huge scores."""
    q = d.array((2, d.int(1, 4), 3), -100.0, 100.0)
    k = d.array((2, d.int(1, 4), 3), -100.0, 100.0)
    return [q, k, d.array((2, k.shape[1], 2))], {"scale": 1.0}


# --- Gumbel-softmax ---------------------------------------------------------------------------------------


def _gumbel(lib, F, logits, g, tau=1.0, hard=False, dim=-1):
    """core: F.gumbel_softmax with the noise injected. torch: the same formula from the same g, written as
    torch.nn.functional.gumbel_softmax computes it after drawing its own noise (straight-through when hard)."""
    if lib.__name__ != "torch":
        return F.gumbel_softmax(logits, tau=tau, hard=hard, dim=dim, noise=g)
    y_soft = ((logits + g) / tau).softmax(dim)
    if not hard:
        return y_soft
    index = y_soft.max(dim, keepdim=True)[1]
    y_hard = lib.zeros_like(logits).scatter_(dim, index, 1.0)
    return y_hard - y_soft.detach() + y_soft


def _gumbel_inputs(d, hard):
    shape = d.shape(1, 3, 1, 5)
    logits = d.array(shape, -3.0, 3.0)
    g = -np.log(-np.log(d.array(shape, 0.01, 0.99)))  # Gumbel(0, 1) noise by inversion
    return [logits, g], {"tau": d.choice([0.5, 1.0, 2.0]), "hard": hard, "dim": d.int(-len(shape), len(shape) - 1)}


CASES = [
    Case("conv2d", lambda lib, F, x, w, *b, **kw: F.conv2d(x, w, *b, **kw), _conv2d),
    Case("conv_transpose2d", lambda lib, F, x, w, *b, **kw: F.conv_transpose2d(x, w, *b, **kw), _conv_transpose2d),
    Case("avg_pool2d", lambda lib, F, x, **kw: F.avg_pool2d(x, **kw), _avg_pool2d),
    Case("max_pool2d", lambda lib, F, x, **kw: F.max_pool2d(x, **kw), _max_pool2d),
    Case("interpolate_nearest", lambda lib, F, x, **kw: F.interpolate(x, mode="nearest", **kw), _interpolate),
    Case("pad", lambda lib, F, x, **kw: F.pad(x, **kw), _pad),
    Case("scaled_dot_product_attention", _sdpa_fn, _sdpa),
    Case("scaled_dot_product_attention_large_scores", _sdpa_fn, _sdpa_stable),
    Case("gumbel_softmax", _gumbel, lambda d: _gumbel_inputs(d, hard=False)),
    # hard=True: the forward is piecewise constant (finite differences see 0) while the backward is
    # the straight-through estimator by design, so only the comparison with PyTorch applies
    Case("gumbel_softmax_hard", _gumbel, lambda d: _gumbel_inputs(d, hard=True), gradcheck=False),
]


# --- attention with structured patterns (kernels.attention.patterns) ---------------------------------------


def _sdpa_pattern_fn(lib, F, q, k, v, *mask, pattern, is_causal=False, **kwargs):
    """core: the pattern evaluated inside the kernels, ANDed with attn_mask or is_causal. torch: the same
    rule as one dense bool attn_mask, pattern.mask(n) cut to (L, S) (query q and key k are flat positions)."""
    if lib.__name__ != "torch":
        return F.scaled_dot_product_attention(q, k, v, *mask, is_causal=is_causal, pattern=pattern, **kwargs)
    length, source = q.shape[-2], k.shape[-2]
    allowed = lib.from_numpy(pattern.mask(max(length, source))[:length, :source])
    if is_causal:
        allowed = allowed & lib.ones(length, source, dtype=lib.bool).tril()
    if mask:
        allowed = allowed & mask[0]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, **kwargs)


def _sdpa_pattern(kind):
    """Inputs for one pattern kind: sequences around T text tokens + a W×W grid, mostly L = S."""

    def make(d):
        from kernels.attention import patterns

        text, width = d.int(0, 3), d.int(1, 3)
        pattern = {
            "causal": lambda: patterns.Causal(),
            "row": lambda: patterns.Row(text, width),
            "column": lambda: patterns.Column(text, width),
            "conv": lambda: patterns.Conv(text, width, kernel=d.choice([1, 3, 5])),
            "prefix_lm": lambda: patterns.PrefixLM(d.int(0, 4)),
        }[kind]()
        n = max(1, text + width * width - d.int(0, 2))
        source = n if d.int(0, 3) else d.int(1, n + 2)  # sometimes L ≠ S
        batch = d.shape(0, 2, 1, 2)
        e, ev = d.int(1, 4), d.int(1, 3)
        q = d.array((*batch, n, e))
        k = d.array((*d.broadcastable(batch), source, e))
        v = d.array((*k.shape[:-2], source, ev))
        arrays, kwargs = [q, k, v], {"pattern": pattern}
        extra = d.choice(["none", "bool", "causal"])  # each ANDed with the pattern
        if extra == "bool":  # with the pattern, some rows are fully masked: zeros, as in PyTorch
            arrays.append(d.bools((*d.broadcastable(batch), n, source), p=0.8))
        elif extra == "causal":
            kwargs["is_causal"] = True
        if d.bool():
            kwargs["scale"] = d.choice([0.5, 2.0])
        return arrays, kwargs

    return make


CASES += [
    Case(f"scaled_dot_product_attention_pattern_{kind}", _sdpa_pattern_fn, _sdpa_pattern(kind))
    for kind in ("causal", "row", "column", "conv", "prefix_lm")
]
