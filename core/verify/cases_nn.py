"""Cases for core.nn modules: a module built in each library, its weights replaced by the case's inputs.

`_with(module, {name: tensor})` deletes the registered parameter and puts the input tensor in its
place (both libraries allow a plain tensor attribute once the parameter is gone), so the module's
forward runs on the drawn weights and their gradients are compared with PyTorch's too. Modules are
built in float64 (`dtype=lib.float64`) so that buffers such as BatchNorm's running statistics match.
"""

from __future__ import annotations

import core.nn  # noqa: F401  (makes lib.nn resolve for lib = core)

from . import Case


def _with(module, weights):
    """module with each named parameter (dotted path) replaced by the given tensor."""
    for path, t in weights.items():
        *parents, name = path.split(".")
        owner = module
        for p in parents:
            owner = getattr(owner, p)
        delattr(owner, name)
        setattr(owner, name, t)
    return module


# --- MultiheadAttention ---------------------------------------------------------------------------


def _mha_weights(d, E):
    return [d.array((3 * E, E), -1, 1), d.array((3 * E,)), d.array((E, E), -1, 1), d.array((E,))]


def _mha(lib, x_q, x_k, x_v, w, b, ow, ob, E, H, batch_first, **kw):
    m = lib.nn.MultiheadAttention(E, H, batch_first=batch_first, dtype=lib.float64)
    _with(m, {"in_proj_weight": w, "in_proj_bias": b, "out_proj.weight": ow, "out_proj.bias": ob})
    return m(x_q, x_k, x_v, **kw)


def _seq(d, L, N, E, batch_first):
    return d.array((N, L, E) if batch_first else (L, N, E))


def _mha_self(d):
    H = d.int(1, 3)
    E, L, N, bf = H * d.int(1, 2), d.int(1, 4), d.int(1, 3), d.bool()
    return [_seq(d, L, N, E, bf), *_mha_weights(d, E)], {"E": E, "H": H, "batch_first": bf,
                                                         "need_weights": d.bool()}


def _masks(d, L, S, N, H):
    """A key_padding_mask (N, S) and an attn_mask (L, S) or (N·H, L, S), each bool or given as integers
    (turned into an additive float mask inside the lambda: no gradient). Key 0 is never masked, so
    no query row is fully masked (PyTorch's weights path would give NaN there)."""
    kpm = d.bools((N, S), 0.4)
    kpm[:, 0] = False
    shape = d.choice([(L, S), (N * H, L, S)])
    if d.bool():
        am = d.bools(shape, 0.4)
        am[..., 0] = False
    else:
        am = d.ints(shape, -4, 3)
    return kpm, am, {"use_kpm": d.bool(), "use_am": d.bool()}


def _mha_masked(d):
    H = d.int(1, 2)
    E, L, S, N, bf = H * d.int(1, 2), d.int(1, 4), d.int(1, 4), d.int(1, 3), d.bool()
    kpm, am, use = _masks(d, L, S, N, H)
    arrays = [_seq(d, L, N, E, bf), _seq(d, S, N, E, bf), _seq(d, S, N, E, bf), *_mha_weights(d, E), kpm, am]
    return arrays, {"E": E, "H": H, "batch_first": bf, "need_weights": d.bool(), **use}


def _mask_kwargs(kpm, am, q, use_kpm, use_am):
    """Bool masks as they are, or, when the attn_mask is drawn as integers, both masks additive floats:
    attn_mask am/2 and key_padding_mask −30 where masked (PyTorch deprecates mixing the two kinds)."""
    if not str(am.dtype).endswith("bool"):
        am, kpm = am.to(q.dtype) * 0.5, kpm.to(q.dtype) * -30.0
    return {"key_padding_mask": kpm if use_kpm else None, "attn_mask": am if use_am else None}


def _mha_cross(lib, F, q, k, v, w, b, ow, ob, kpm, am, E, H, batch_first, need_weights, use_kpm, use_am):
    kw = _mask_kwargs(kpm, am, q, use_kpm, use_am)
    return _mha(lib, q, k, v, w, b, ow, ob, E, H, batch_first, need_weights=need_weights, **kw)[0]


def _mha_attn_weights(d):
    arrays, kwargs = _mha_masked(d)
    kwargs.update(average_attn_weights=d.bool())
    return arrays, kwargs


def _mha_weights_fn(lib, F, q, k, v, w, b, ow, ob, kpm, am, E, H, batch_first, need_weights, use_kpm, use_am,
                    average_attn_weights):
    kw = _mask_kwargs(kpm, am, q, use_kpm, use_am)
    return _mha(lib, q, k, v, w, b, ow, ob, E, H, batch_first, need_weights=True,
                average_attn_weights=average_attn_weights, **kw)[1]


def _mha_unbatched(d):
    H = d.int(1, 2)
    E, L, S = H * d.int(1, 2), d.int(1, 4), d.int(1, 4)
    return [d.array((L, E)), d.array((S, E)), *_mha_weights(d, E)], {"E": E, "H": H, "need_weights": d.bool()}


# --- convolutions ---------------------------------------------------------------------------------


def _conv2d_module(d):
    groups = d.int(1, 2)
    cin, cout = groups * d.int(1, 2), groups * d.int(1, 2)
    k, stride, dilation = d.int(1, 3), d.int(1, 2), d.int(1, 2)
    mode = d.choice(["zeros", "reflect", "replicate", "circular"])
    padding = d.choice([0, 1, 2, "valid"] + (["same"] if stride == 1 else []))
    pad = {"valid": 0, "same": dilation * (k - 1)}.get(padding, padding if isinstance(padding, int) else 0)
    # reflect padding needs pad < side; every mode needs the padded side to hold the dilated kernel
    lo = max(dilation * (k - 1) + 1 - 2 * pad, pad + 1, 1)
    x = d.array((d.int(1, 2), cin, d.int(lo, lo + 3), d.int(lo, lo + 3)))
    bias = d.bool()
    arrays = [x, d.array((cout, cin // groups, k, k))] + ([d.array((cout,))] if bias else [])
    return arrays, {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups,
                    "padding_mode": mode}


def _conv2d_fn(lib, F, x, w, b=None, **kw):
    m = lib.nn.Conv2d(x.shape[1], w.shape[0], w.shape[-1], bias=b is not None, dtype=lib.float64, **kw)
    return _with(m, {"weight": w, **({"bias": b} if b is not None else {})})(x)


def _conv_transpose2d_module(d):
    groups = d.int(1, 2)
    cin, cout = groups * d.int(1, 2), groups * d.int(1, 2)
    k, stride = d.int(1, 3), d.int(1, 2)
    padding = d.int(0, (k - 1) // 2)
    h, w = d.int(2, 4), d.int(2, 4)
    lo = [(n - 1) * stride - 2 * padding + k for n in (h, w)]  # the smallest output size; up to stride-1 more
    size = [n + d.int(0, stride - 1) for n in lo] if d.bool() else None
    arrays = [d.array((d.int(1, 2), cin, h, w)), d.array((cin, cout // groups, k, k)), d.array((cout,))]
    return arrays, {"stride": stride, "padding": padding, "groups": groups, "output_size": size}


def _conv_transpose2d_fn(lib, F, x, w, b, output_size, **kw):
    m = lib.nn.ConvTranspose2d(x.shape[1], w.shape[1] * kw["groups"], w.shape[-1], dtype=lib.float64, **kw)
    return _with(m, {"weight": w, "bias": b})(x, output_size=output_size)


# --- normalization --------------------------------------------------------------------------------


def _batch_norm2d(d):
    C = d.int(1, 3)
    return [d.array((d.int(2, 3), C, d.int(1, 3), d.int(1, 3))), d.array((C,)), d.array((C,))], {}


def _batch_norm2d_fn(lib, F, x, w, b):
    m = lib.nn.BatchNorm2d(x.shape[1], dtype=lib.float64)  # training mode: batch statistics
    return _with(m, {"weight": w, "bias": b})(x)


def _group_norm(d):
    G = d.int(1, 3)
    C = G * d.int(1, 2)  # H·W >= 2: a group of one value has no variance (an error in both libraries)
    return [d.array((d.int(1, 2), C, d.int(1, 3), d.int(2, 3))), d.array((C,)), d.array((C,))], {"G": G}


def _group_norm_fn(lib, F, x, w, b, G):
    return _with(lib.nn.GroupNorm(G, x.shape[1], dtype=lib.float64), {"weight": w, "bias": b})(x)


def _layer_norm(d):
    shape = d.shape(2, 3, max_side=4)
    n = d.int(1, 2)
    return [d.array(shape), d.array(shape[-n:]), d.array(shape[-n:])], {}


def _layer_norm_fn(lib, F, x, w, b):
    return _with(lib.nn.LayerNorm(w.shape, dtype=lib.float64), {"weight": w, "bias": b})(x)


# --- Linear, Embedding ----------------------------------------------------------------------------


def _linear(d):
    i, o = d.int(1, 4), d.int(1, 4)
    return [d.array(d.shape(1, 2, max_side=3) + (i,)), d.array((o, i)), d.array((o,))], {}


def _linear_fn(lib, F, x, w, b):
    return _with(lib.nn.Linear(w.shape[1], w.shape[0], dtype=lib.float64), {"weight": w, "bias": b})(x)


def _embedding(d, padding=False):
    n, dim = d.int(2, 5), d.int(1, 3)
    idx = d.ints(d.shape(1, 2, max_side=4), 0, n)
    return [idx, d.array((n, dim))], {"padding_idx": d.choice([0, -1]) if padding else None}


def _embedding_fn(lib, F, idx, w, padding_idx):
    m = lib.nn.Embedding(w.shape[0], w.shape[1], padding_idx=padding_idx, dtype=lib.float64)
    return _with(m, {"weight": w})(idx)


CASES = [
    Case("nn.MultiheadAttention.self",
         lambda lib, F, x, w, b, ow, ob, E, H, batch_first, need_weights:
         _mha(lib, x, x, x, w, b, ow, ob, E, H, batch_first, need_weights=need_weights)[0], _mha_self),
    Case("nn.MultiheadAttention.cross_masked", _mha_cross, _mha_masked),
    Case("nn.MultiheadAttention.attn_weights", _mha_weights_fn, _mha_attn_weights),
    Case("nn.MultiheadAttention.unbatched",
         lambda lib, F, q, kv, w, b, ow, ob, E, H, need_weights:
         _mha(lib, q, kv, kv, w, b, ow, ob, E, H, False, need_weights=need_weights)[0], _mha_unbatched),
    Case("nn.Conv2d", _conv2d_fn, _conv2d_module),
    Case("nn.ConvTranspose2d", _conv_transpose2d_fn, _conv_transpose2d_module),
    Case("nn.BatchNorm2d.train", _batch_norm2d_fn, _batch_norm2d),
    Case("nn.GroupNorm", _group_norm_fn, _group_norm),
    Case("nn.LayerNorm", _layer_norm_fn, _layer_norm),
    Case("nn.Linear", _linear_fn, _linear),
    Case("nn.Embedding", _embedding_fn, _embedding),
    # the padding row is read by forward but gets zero gradient by definition: not a derivative to gradcheck
    Case("nn.Embedding.padding_idx", _embedding_fn, lambda d: _embedding(d, padding=True), gradcheck=False),
]
