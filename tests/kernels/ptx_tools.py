"""ptxas_usage: what ptxas allocates for a kernel's PTX on sm_90, for the tests that check occupancy claims;
nvrtc_build: CUDA C++ compiled by NVRTC (kernels.nvrtc.build), for the tests of the CuPy RawModule kernels."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from kernels.nvrtc import build as nvrtc_build  # noqa: F401  (the tests' name for it)


def ptxas_usage(ptx):
    """(registers per thread, bytes of spill stores) that ptxas allocates for sm_90, or None without ptxas.

    A PTX ISA version above 9.0, newer than the CUDA 13.0 ptxas knows, is lowered to 9.0: the kernels use nothing
    newer."""
    ptxas = shutil.which("ptxas")
    if ptxas is None:
        return None
    version = re.search(r"^\.version (\d+)\.(\d+)", ptx, flags=re.M)
    if (int(version[1]), int(version[2])) > (9, 0):
        ptx = ptx.replace(version[0], ".version 9.0", 1)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([ptxas, "-arch=sm_90", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    return int(re.search(r"Used (\d+) registers", out)[1]), int(re.search(r"(\d+) bytes spill stores", out)[1])


def host_build(directory, files, std="c++17", extra=()):
    """A CUDA C++ kernel built for the CPU by the system's C++ compiler (the tests' emulations): `files` maps file
    names to their text, written into `directory`; "emulate.cpp" among them is compiled, with -ffp-contract=off (no
    fused multiply-adds: the NumPy spec's roundings) into a shared library, returned as a ctypes.CDLL. Skips the
    calling test when there is no compiler; fails with the compiler's output when the build fails."""
    import ctypes

    import pytest

    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the CPU emulation of the kernel")
    directory = Path(directory)
    for name, text in files.items():
        (directory / name).write_text(text)
    lib = directory / "libemulation.so"
    # GCC makes a static variable of a template or inline function (a kernel's __shared__ arrays, here `static`) one
    # object for the whole process (STB_GNU_UNIQUE), even across libraries opened RTLD_LOCAL: a second build of the
    # same kernel with another block size would share the first one's smaller buffers
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    unique = ["-fno-gnu-unique"] if "Free Software Foundation" in version else []
    cmd = [cxx, f"-std={std}", "-O1", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared", *unique, *extra,
           f"-I{directory}", str(directory / "emulate.cpp"), "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the CPU build of the kernel fails:\n{proc.stderr}"
    return ctypes.CDLL(str(lib))
