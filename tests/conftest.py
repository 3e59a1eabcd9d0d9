"""Test-session settings that must be in place before NumPy, Numba or PyTorch start their thread pools.

pytest runs with two xdist workers on a 2-core machine, so each worker's OpenMP threads (Numba's parallel
kernels, PyTorch) would otherwise spin-wait for cores the other worker holds: every tiny parallel region then
costs milliseconds, and gradcheck makes thousands of them. Passive waiting and one BLAS thread per worker keep
the suite fast; a value already in the environment wins.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
