"""ptxas_usage: what ptxas allocates for a kernel's PTX on sm_90, for the tests that check occupancy claims."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path


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
