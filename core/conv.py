"""Spatial ops of core.functional: convolution, transposed convolution, pooling, interpolation, padding."""


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):  # noqa: A002
    raise NotImplementedError


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):  # noqa: A002
    raise NotImplementedError


def avg_pool2d(input, kernel_size, stride=None, padding=0):  # noqa: A002
    raise NotImplementedError


def max_pool2d(input, kernel_size, stride=None, padding=0):  # noqa: A002
    raise NotImplementedError


def interpolate(input, size=None, scale_factor=None, mode="nearest"):  # noqa: A002
    raise NotImplementedError


def pad(input, pad, mode="constant", value=0.0):  # noqa: A002
    raise NotImplementedError
