"""core.functional (imported as F): the neural-network ops with PyTorch's names and semantics."""

from __future__ import annotations

from .attention import gumbel_softmax, scaled_dot_product_attention  # noqa: F401
from .conv import avg_pool2d, conv2d, conv_transpose2d, interpolate, max_pool2d, pad  # noqa: F401
