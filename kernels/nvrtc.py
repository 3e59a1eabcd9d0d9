"""CUDA C++ compiled by NVRTC (the `cuda-bindings` and NVRTC wheels), without a GPU: for the tests of the CuPy RawModule
kernels (does the source compile for sm_90, to what PTX) and for `bench.sass` (the machine code it becomes). At run
time CuPy compiles the same sources itself."""

from __future__ import annotations

from typing import NamedTuple


class Build(NamedTuple):
    """What NVRTC made: the PTX, the cubin (for an `sm_` arch, else None), its log, and {name expression: the
    kernel's lowered (mangled) name, bytes}."""

    ptx: str
    cubin: bytes | None
    log: str
    lowered: dict


class CompileError(RuntimeError):
    """NVRTC refused the source (the message holds its log) or one of its calls failed."""


def build(source, filename, names, options=(), arch="compute_90", extra=()) -> Build:
    """Compile CUDA C++ `source` (named `filename` in messages) with NVRTC for the kernels `names` (name expressions,
    e.g. "fused_update<true, true, false>"), with `options`, -ftz=true as CuPy compiles, -arch=`arch` (compute_90:
    PTX only; sm_90: a cubin too) and `extra`."""
    from cuda.bindings import nvrtc

    def check(result, what):
        err = result[0] if isinstance(result, tuple) else result
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise CompileError(f"{filename}: NVRTC {what} failed: {err}")
        return result[1:] if isinstance(result, tuple) else ()

    (prog,) = check(nvrtc.nvrtcCreateProgram(source.encode(), filename.encode(), 0, [], []), "create")
    try:
        for name in names:
            check(nvrtc.nvrtcAddNameExpression(prog, name.encode()), "name")
        opts = [o.encode() for o in (*options, "-ftz=true", f"-arch={arch}", *extra)]
        status = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        # NVRTC writes into the buffers it is given: they must be fresh bytearrays, never `b" " * size`, which for
        # size 1 (an empty log) is CPython's one shared b" " — NVRTC then turned every b" " in the process into b"\0"
        (size,) = check(nvrtc.nvrtcGetProgramLogSize(prog), "log size")
        log = bytearray(size)
        check(nvrtc.nvrtcGetProgramLog(prog, log), "log")
        log = bytes(log).decode(errors="replace")
        if status[0] != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise CompileError(f"{filename} does not compile:\n{log}")
        lowered = {name: check(nvrtc.nvrtcGetLoweredName(prog, name.encode()), "lowered name")[0]
                   for name in names}
        (size,) = check(nvrtc.nvrtcGetPTXSize(prog), "ptx size")
        ptx = bytearray(size)
        check(nvrtc.nvrtcGetPTX(prog, ptx), "ptx")
        cubin = None
        if arch.startswith("sm_"):
            (size,) = check(nvrtc.nvrtcGetCUBINSize(prog), "cubin size")
            cubin = bytearray(size)
            check(nvrtc.nvrtcGetCUBIN(prog, cubin), "cubin")
            cubin = bytes(cubin)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    if b" " != bytes([32]):
        raise CompileError("a buffer handed to NVRTC was a shared bytes object")
    return Build(bytes(ptx).decode().rstrip("\x00 "), cubin, log, lowered)
