#!/usr/bin/env bash
# The GPU checks in one go, for a machine with a CUDA GPU, CuPy, numba-cuda and PyTorch (see README, "On a GPU"):
# versions, the `gpu`-marked tests, `t2i bench --device cuda` for the four kernel families, then where a numba.cuda
# launch spends its host time (bench/launch_overhead.py), then the launch shapes of the C++ schedule and Gumbel kernels
# (bench/sweep_cuda_vec.py). About 3.5 minutes on an H200.
# Usage: bash bench/gpu_check.sh [OUT_DIR]   (default: $OUT, else /tmp/t2i-gpu). Writes log.txt, the bench JSON
# and its plots there; TESTS (test paths) and BENCH_FAMILIES narrow what runs,
# EXTRA adds a command at the end. Runs from a checkout without
# installing it (PYTHONPATH=.), the machine's Python as is.
set -u -o pipefail
out=${1:-${OUT:-/tmp/t2i-gpu}}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
py=${PYTHON:-python3}
# numba-cuda 0.30 registers an overload for np.row_stack, which numpy 2.5 removed: on such a machine (the lent H200's
# image had numpy 2.5.2) alias it to np.vstack, which it was, through a sitecustomize seen only by these commands
if ! $py -c "import numpy; numpy.row_stack" 2>/dev/null; then
  shim=$(mktemp -d)
  printf 'import numpy\nif not hasattr(numpy, "row_stack"):\n    numpy.row_stack = numpy.vstack\n' > "$shim/sitecustomize.py"
  export PYTHONPATH=$shim:$PYTHONPATH
  shim_note="numpy has no row_stack: aliased to vstack for numba-cuda ($shim/sitecustomize.py)"
fi
{
  date -u
  [ -n "${shim_note:-}" ] && echo "$shim_note"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  $py - <<'PY'
import importlib
for m in ("numpy", "numba", "numba.cuda", "cupy", "torch", "scipy", "hypothesis"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as e:  # report and go on: the tests say what a missing package costs
        print(m, "MISSING", e)
try:
    import numba_cuda
    print("numba_cuda", numba_cuda.__version__)
except Exception as e:
    print("numba_cuda ?", e)
from numba import cuda
print("numba.cuda.is_available", cuda.is_available())
try:
    cuda.detect()
except Exception as e:
    print("numba.cuda.detect failed:", type(e).__name__, e)
PY
  echo "=== gpu-marked tests"
  timeout "${TEST_TIMEOUT:-150}" $py -m pytest -o addopts="" -m gpu -q -rA -p no:cacheprovider ${TESTS:-tests/kernels}
  echo "pytest rc=$?"
  echo "=== t2i bench --device cuda"
  timeout "${BENCH_TIMEOUT:-300}" $py -m bench.cli ${BENCH_FAMILIES:-attention conv gumbel schedule} --device cuda \
    --out "$out"
  echo "bench rc=$?"
  echo "=== host time of a numba.cuda launch (python -m bench.launch_overhead)"
  timeout "${LAUNCH_TIMEOUT:-60}" $py -m bench.launch_overhead
  echo "launch_overhead rc=$?"
  echo "=== launch shapes of the C++ kernels (python -m bench.sweep_cuda_vec)"
  timeout "${SWEEP_TIMEOUT:-90}" $py -m bench.sweep_cuda_vec
  echo "sweep rc=$?"
  if [ -n "${EXTRA:-}" ]; then  # one more command for this run (an A/B script, say)
    echo "=== $EXTRA"
    timeout "${EXTRA_TIMEOUT:-90}" $EXTRA
    echo "extra rc=$?"
  fi
  date -u
} 2>&1 | tee "$out/log.txt"
