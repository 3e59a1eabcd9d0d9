"""Tests of the numba.cuda kernels under the Numba CUDA simulator.

NUMBA_ENABLE_CUDASIM must be set before numba.cuda is first imported, and it then holds for the whole
process (where the PTX compile checks need the real numba.cuda). So these modules are collected only in a
process started with NUMBA_ENABLE_CUDASIM=1: tests/kernels/test_cuda_sim.py runs this folder in such a
subprocess (and fails when any test here fails); `NUMBA_ENABLE_CUDASIM=1 pytest tests/kernels/cudasim` runs it
directly. The simulator runs one Python thread per CUDA thread: keep sizes tiny.
"""

import os

if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
    collect_ignore_glob = ["test_*.py"]
