"""Attention and Gumbel-softmax ops of core.functional (the kernel issue swaps their insides)."""


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    raise NotImplementedError


def gumbel_softmax(logits, tau=1.0, hard=False, eps=1e-10, dim=-1):
    raise NotImplementedError
