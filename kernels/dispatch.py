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
