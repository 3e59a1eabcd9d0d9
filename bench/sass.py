"""The machine code of the CUDA C++ elementwise kernels, read without a GPU: `python -m bench.sass`.

NVRTC compiles each instance of kernels/schedule/fused_update.cu and kernels/gumbel/softmax_rows.cu for sm_90 (a
cubin, as CuPy would load on an H100 or H200), and nvdisasm (the `nvidia-cuda-nvdisasm` wheel of the test extra)
turns it into SASS, the instructions the GPU issues. For each instance this prints the registers a thread holds
(they set how many threads an SM keeps in flight), its instructions in all, a count by kind (integer multiply-adds,
float32 and float64 arithmetic, conversions, special functions, loads and stores by width), and for the diffusion
updates the instructions one trip of the grid-stride loop issues on its common path — for four elements, so that a
change to the kernel can be weighed before a GPU times it. At 132 SMs × 4 warp schedulers × 1.98 GHz (an H200),
305 instructions a trip take 0.46 ms of issue over 64×3×1024×1024 elements; a copy of q_sample's bytes, ~0.58 ms.

The common path: from the loop's head to its backward branch, at each forward conditional branch the arm that
reaches the point where the two arms meet again (the next BSYNC) in fewer instructions, never a CALL (the slow path
of the IEEE square root). In fused_update.cu that is the float4 loads and stores (the tails' scalar loops are the
longer arms), the four elements in one sample (the per-element one is longer) and the fast square root. Static
reading: the GPU's own counters (CUPTI, Nsight Compute) are the measurement, on a GPU.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

from kernels.nvrtc import build

ARCH = "sm_90"
# instruction kinds counted (the opcode's first word); the rest go to "other"
KINDS = {
    "int mul-add": ("IMAD",), "int logic/shift": ("LOP3", "SHF", "LEA", "IADD3", "VIADD", "SEL", "ISETP", "IABS"),
    "fp32": ("FFMA", "FMUL", "FADD", "FSETP", "FSEL", "FMNMX", "HFMA2"), "fp64": ("DFMA", "DMUL", "DADD", "DSETP"),
    "convert": ("I2F", "F2I", "F2F", "I2FP", "F2FP"), "special (MUFU)": ("MUFU",),
    "global load": ("LDG",), "global store": ("STG",), "shared": ("LDS", "STS"), "barrier": ("BAR",),
    "control": ("BRA", "BSSY", "BSYNC", "EXIT", "CALL", "RET"), "move": ("MOV", "LDC", "S2R", "S2UR", "CS2R"),
}


def nvdisasm() -> str:
    """The path of nvdisasm, found by cuda.pathfinder: the nvidia-cuda-nvdisasm wheel's, else a conda environment's or
    a CUDA toolkit's (CUDA_PATH, CUDA_HOME)."""
    from cuda.pathfinder import find_nvidia_binary_utility

    path = find_nvidia_binary_utility("nvdisasm")
    if path is None:
        raise FileNotFoundError("nvdisasm not found: pip install -e '.[test]' (nvidia-cuda-nvdisasm)")
    return path


def disassemble(cubin: bytes) -> dict[str, tuple[list[str], dict[str, int]]]:
    """{kernel's mangled name: (its instructions, {label: index of the instruction it precedes})}."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([nvdisasm(), "-c", str(path)], capture_output=True, text=True, check=True).stdout
    kernels, current = {}, None
    for line in text.splitlines():
        header = re.match(r"^\.text\.(\S+):$", line)
        if header:
            current = kernels.setdefault(header[1], ([], {}))
            continue
        if current is None:
            continue
        label = re.match(r"^(\.L_x_\d+):", line)
        if label:
            current[1][label[1]] = len(current[0])
            continue
        ins = re.search(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line)
        if ins:
            current[0].append(ins[1])
    return kernels


def opcode(ins: str) -> str:
    """The opcode of an instruction, its predicate (@P0, @!P1) dropped: "LDG.E.128", "IMAD.WIDE.U32", …"""
    return re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0]


def kinds(instructions) -> Counter:
    """Instructions by kind (KINDS; "uniform": the warp's scalar datapath, U… opcodes), loads and stores by width
    ("global load 128-bit")."""
    out = Counter()
    for ins in instructions:
        op = opcode(ins)
        base = op.split(".")[0]
        kind = next((k for k, bases in KINDS.items() if base in bases), "uniform" if base[0] == "U" else "other")
        if kind in ("global load", "global store"):
            width = op.rsplit(".", 1)[-1]
            kind = f"{kind} {width if width.isdigit() else 32}-bit"
        out[kind] += 1
    return out


def _target(ins: str) -> str | None:
    m = re.search(r"\((\.L_x_\d+)\)", ins)
    return m[1] if m else None


def common_path(instructions: list[str], labels: dict[str, int]) -> list[str]:
    """The instructions one trip of the kernel's loop issues on its common path (see the module docstring); where the
    kernel has several loops (a version of the loop with scalar loads, a remainder loop after an unrolled one), the
    one with the most 128-bit loads, the last of those."""

    def arm(i):  # the instructions from i to the next BSYNC; a CALL makes an arm the longer one
        n = 0
        while i < len(instructions) and not opcode(instructions[i]).startswith("BSYNC"):
            n += 10**6 if opcode(instructions[i]).startswith("CALL") else 1
            i += 1
        return n

    backs = [i for i, ins in enumerate(instructions)
             if opcode(ins).startswith("BRA") and ins.startswith("@") and labels.get(_target(ins), i) < i]
    if not backs:
        raise ValueError("no loop in this kernel")
    def vector_loads(b):
        return sum(opcode(x) == "LDG.E.128" for x in instructions[labels[_target(instructions[b])]:b])

    back = max(reversed(backs), key=vector_loads)  # max keeps the first of equals: the last loop
    i, path = labels[_target(instructions[back])], []
    while i <= back:
        ins = instructions[i]
        path.append(ins)
        if opcode(ins).startswith("BRA") and i != back and _target(ins) in labels:
            t = labels[_target(ins)]
            conditional = ins.startswith("@") or re.search(r"BRA\s+!?P\d", ins)
            if not conditional or arm(t) < arm(i + 1):
                i = t
                continue
        i += 1
    return path


def instances():
    """(family, source, file name, options, {label: name expression}, labels whose loop trip is counted, elements a
    trip) of every C++ elementwise kernel: fused_update.cu as cuda_vec launches it and with FU_UNROLL = 2 (two Philox
    blocks a trip). The trip is counted where the shorter arm is the common case: not for given noise, whose read
    (where S ≠ 0) is the longer arm."""
    from kernels.gumbel import cuda_vec as gumbel_vec
    from kernels.schedule import cuda_vec as schedule_vec

    what = {(False, True, True): "q_sample (draws ε, writes it)", (False, False, False): "q_sample (ε given)",
            (True, True, False): "DDPM / DDIM step (draws its noise)",
            (True, False, False): "DDPM / DDIM step (noise given, or none: DDIM η = 0)"}
    names = {what[k]: schedule_vec.kernel_name(*k) for k in schedule_vec.INSTANCES}
    walked = {what[(False, True, True)], what[(True, True, False)], what[(True, False, False)]}
    for unroll in (schedule_vec.UNROLL, 2):
        yield (f"schedule (unroll {unroll})", schedule_vec.source(), "fused_update.cu", schedule_vec.options(unroll),
               names, walked, 4 * unroll)
    for threads in (256, 512, 1024):
        yield (f"gumbel ({threads} threads)", gumbel_vec.source(), "softmax_rows.cu", gumbel_vec.options(threads),
               {"forward, seeded": gumbel_vec.kernel_name(True), "forward, noise given": gumbel_vec.kernel_name(False)},
               set(), None)


def report() -> list[dict]:
    """One row per kernel instance: family, instance, registers, instructions, kinds, and where counted the common
    path's length, kinds and elements (the trip of η = 0 for the step given no noise)."""
    rows = []
    for family, source, filename, options, names, walked, elements in instances():
        b = build(source, filename, list(names.values()), options, arch=ARCH, extra=("-Xptxas", "-v"))
        code = disassemble(b.cubin)
        for label, name in names.items():
            mangled = b.lowered[name].decode()
            registers = re.search(rf"Function properties for {re.escape(mangled)}.*?Used (\d+) registers", b.log,
                                  flags=re.S)
            ins, labels = code[mangled]
            row = dict(family=family, instance=label, registers=int(registers[1]) if registers else None,
                       instructions=len(ins), kinds=dict(kinds(ins)))
            if label in walked:
                path = common_path(ins, labels)
                row.update(common_path=len(path), common_kinds=dict(kinds(path)), trip_elements=elements)
            rows.append(row)
    return rows


def main(argv=None):
    """Print the report (see the module docstring)."""
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    for row in report():
        trip = f"; one loop trip ({row['trip_elements']} elements) {row['common_path']}" if "common_path" in row else ""
        print(f"{row['family']:22s} {row['instance']:52s} {row['registers']} registers, "
              f"{row['instructions']} instructions{trip}")
        counts = row.get("common_kinds", row["kinds"])
        print(" " * 23 + ("per trip: " if "common_kinds" in row else "in all: ")
              + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
