"""The pre-LN transformer block that every text and image transformer of this project shares (GPT, BERT,
ViT, CLIP and the text-to-image transformers after them), with a key/value cache for incremental decoding.

One block (Vaswani et al. 2017, §3.1, with the layer norm moved to the input of each sub-layer as in
GPT-2, Radford et al. 2019, §2.3, and Xiong et al. 2020, which is what makes deep stacks train without
warm-up tricks):

    x = x + Dropout(Attention(LN₁(x)))        multi-head self-attention, Vaswani et al. eq. 1 and §3.2.2
    x = x + Dropout(W₂ GELU(W₁ LN₂(x)))        the position-wise MLP, §3.3, with GELU (Hendrycks & Gimpel 2016)

and a final LayerNorm after the last block. Attention runs through F.scaled_dot_product_attention, i.e. the
project's tiled kernel (kernels/attention), so a structured `pattern` (Causal, Row, Column, Conv, PrefixLM)
is evaluated inside the kernel and never materialized.

Names follow GPT-2/nanoGPT (c_attn, c_proj, c_fc, ln_1, ln_2, ln_f), so a reader can line this file up with
theirs weight by weight.

Incremental decoding: a `KVCache` keeps every layer's keys and values. A forward with `cache=` appends the
new positions' keys and values and lets the new queries, which sit at positions cache.length …, attend to
everything stored before them plus (causally, or per the pattern) each other. That gives the same outputs
as one forward over the whole sequence (for a pattern in which a query sees later keys, PrefixLM's prefix,
that prefix must come in the first forward), at the cost of one new row of attention per generated token
instead of a whole new sequence.
"""

from __future__ import annotations

import numpy as np

import core
from core import functional as F
from core import nn


class KVCache:
    """The keys and values of every layer, (B, heads, S, head_dim) each, grown by each cached forward.

    For inference (generation): it stores arrays, not graph nodes, so nothing stored carries a gradient.
    Buffers grow by doubling, so appending one position at a time costs amortized O(1) copies.
    """

    def __init__(self, depth):
        self.depth = depth
        self.keys, self.values, self.lengths = [None] * depth, [None] * depth, [0] * depth

    @property
    def length(self):
        """The number of positions stored (those of the first layer: all layers agree between forwards)."""
        return self.lengths[0]

    def reset(self):
        """Forget every stored position."""
        self.__init__(self.depth)

    def update(self, layer, k, v):
        """Append `k`, `v` (B, heads, L, head_dim) to layer `layer`; return all its keys and values so far."""
        k, v = (np.asarray(t.data if isinstance(t, core.Tensor) else t) for t in (k, v))
        if not 0 <= layer < self.depth:
            raise IndexError(f"KVCache.update: layer {layer} out of range for a cache of depth {self.depth}")
        n, new = self.lengths[layer], k.shape[2]
        buf_k, buf_v = self.keys[layer], self.values[layer]
        if buf_k is not None and (buf_k.shape[:2] != k.shape[:2] or buf_k.shape[3] != k.shape[3]):
            raise ValueError(f"KVCache.update: layer {layer} holds keys of shape {buf_k[:, :, :n].shape}, "
                             f"cannot append keys of shape {k.shape}")
        if buf_k is None or n + new > buf_k.shape[2]:
            cap = max(2 * (n + new), 16)
            grown_k = np.empty(k.shape[:2] + (cap,) + k.shape[3:], k.dtype)
            grown_v = np.empty(v.shape[:2] + (cap,) + v.shape[3:], v.dtype)
            if n:
                grown_k[:, :, :n], grown_v[:, :, :n] = buf_k[:, :, :n], buf_v[:, :, :n]
            self.keys[layer], self.values[layer] = buf_k, buf_v = grown_k, grown_v
        buf_k[:, :, n:n + new], buf_v[:, :, n:n + new] = k, v
        self.lengths[layer] = n + new
        return core.tensor(buf_k[:, :, :n + new]), core.tensor(buf_v[:, :, :n + new])


class SelfAttention(nn.Module):
    """Multi-head self-attention (Vaswani et al. 2017, §3.2.2): heads = dim / head_dim projections of the
    input to queries, keys and values (one fused matrix c_attn), attention per head, heads concatenated and
    projected back (c_proj)."""

    def __init__(self, dim, heads, dropout=0.0, bias=True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"SelfAttention: dim {dim} must be divisible by heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.c_attn = nn.Linear(dim, 3 * dim, bias=bias)
        self.c_proj = nn.Linear(dim, dim, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x, *, attn_mask=None, is_causal=False, pattern=None, cache=None, layer=0):
        """x (B, L, dim) -> (B, L, dim). With `cache`, x holds the positions after those already cached."""
        B, L, D = x.shape
        q, k, v = self.c_attn(x).split(D, dim=2)
        q, k, v = (t.reshape(B, L, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        offset = 0
        if cache is not None:
            offset = cache.lengths[layer]
            k, v = cache.update(layer, k, v)
        if offset and L == 1 and pattern is None:
            is_causal = False  # one new query after everything cached: every key is visible, no mask needed
        if offset and (is_causal or pattern is not None):
            # the new queries sit at positions offset.., the kernels' rules count queries from 0: spell the
            # visible keys out as a mask (only L rows: one when decoding token by token)
            S = offset + L
            visible = pattern.mask(S)[offset:] if pattern is not None else np.ones((L, S), bool)
            if is_causal:
                visible = visible & np.tri(L, S, offset, dtype=bool)
            if attn_mask is None:
                attn_mask = core.tensor(visible)
            elif np.dtype(attn_mask.dtype) == np.bool_:
                attn_mask = core.tensor(visible) & attn_mask
            else:  # additive: add −inf where hidden (broadcasts like the mask, e.g. (B, 1, 1, S) with (L, S))
                attn_mask = attn_mask + core.tensor(np.where(visible, 0.0, -np.inf).astype(attn_mask.dtype))
            is_causal, pattern = False, None
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, pattern=pattern,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, L, D)  # heads side by side again (Vaswani et al. eq. after 1: Concat)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """The position-wise feed-forward network (Vaswani et al. 2017, eq. 2) with GELU instead of ReLU."""

    def __init__(self, dim, mlp_ratio=4, dropout=0.0, bias=True, approximate="none"):
        super().__init__()
        self.c_fc = nn.Linear(dim, mlp_ratio * dim, bias=bias)
        self.gelu = nn.GELU(approximate=approximate)
        self.c_proj = nn.Linear(mlp_ratio * dim, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """One pre-LN transformer block: x + Attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim, heads, mlp_ratio=4, dropout=0.0, bias=True):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, bias=bias)
        self.attn = SelfAttention(dim, heads, dropout, bias)
        self.ln_2 = nn.LayerNorm(dim, bias=bias)
        self.mlp = MLP(dim, mlp_ratio, dropout, bias)

    def forward(self, x, *, attn_mask=None, is_causal=False, pattern=None, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), attn_mask=attn_mask, is_causal=is_causal, pattern=pattern, cache=cache,
                          layer=layer)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """`depth` pre-LN blocks and the final LayerNorm: (B, L, dim) -> (B, L, dim).

    attn_mask: PyTorch's SDPA mask (bool, True = may attend; or additive float), broadcastable to
    (B, heads, L, S) — e.g. a padding mask of shape (B, 1, 1, S). is_causal / pattern: as in
    F.scaled_dot_product_attention. cache: a KVCache(depth) for incremental decoding (inference only).
    """

    def __init__(self, depth, dim, heads, mlp_ratio=4, dropout=0.0, bias=True):
        super().__init__()
        self.depth, self.dim, self.heads = depth, dim, heads
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio, dropout, bias) for _ in range(depth)])
        self.ln_f = nn.LayerNorm(dim, bias=bias)

    def forward(self, x, *, attn_mask=None, is_causal=False, pattern=None, cache=None):
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"Transformer: expected input (B, L, {self.dim}), got {tuple(x.shape)}")
        if cache is not None:
            if cache.depth != self.depth:
                raise ValueError(f"Transformer: cache has depth {cache.depth}, the model {self.depth}")
            if core.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
                raise RuntimeError("Transformer: a KVCache is for inference; run it under core.no_grad()")
        for i, block in enumerate(self.blocks):
            x = block(x, attn_mask=attn_mask, is_causal=is_causal, pattern=pattern, cache=cache, layer=i)
        return self.ln_f(x)

    def new_cache(self):
        """An empty KVCache for this model."""
        return KVCache(self.depth)
