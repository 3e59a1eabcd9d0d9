"""How a kernel family picks its form: by array type (NumPy → cpu, CuPy → cuda) unless `form=` names one."""

from __future__ import annotations

import importlib

FORMS = ("reference", "cpu", "cuda")


def form_module(family: str, form, a):
    """The module `kernels.<family>.<form>`; form None means cpu for NumPy arrays and cuda for CuPy arrays."""
    if form is None:
        form = "cuda" if type(a).__module__.startswith("cupy") else "cpu"
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    return importlib.import_module(f"kernels.{family}.{form}")


def cuda_array(a):
    """A CuPy array as a Numba device array, for a numba.cuda launch; anything else is returned as it is.

    Handed a foreign array, Numba synchronizes the stream the array names before every launch, one wait per
    argument: on a GPU that cost more than the elementwise kernels themselves. Skipped where it is safe: when CuPy
    works on the default stream, as Numba's launches do, the two stay in order without it.
    """
    if not type(a).__module__.startswith("cupy"):
        return a
    import cupy
    from numba import cuda

    on_default = cupy.cuda.get_current_stream().ptr == 0
    return cuda.from_cuda_array_interface(a.__cuda_array_interface__, owner=a, sync=not on_default)
