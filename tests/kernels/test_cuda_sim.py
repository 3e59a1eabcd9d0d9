"""Runs the simulator tests (tests/kernels/cudasim) in a subprocess with NUMBA_ENABLE_CUDASIM=1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def test_cuda_kernels_under_the_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", str(HERE / "cudasim")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    report = f"simulator tests failed (rc={proc.returncode}):\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, report
    assert " passed" in proc.stdout
