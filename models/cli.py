"""The `t2i` command line.

    t2i --version
    t2i verify [--trials N] [--seed S] [--op NAME ...] [--json]
    t2i bench [family ...] [--device cpu|cuda] [--threads N] [--quick] [--full] [--json] [--out DIR]

Each subcommand is one `_add_<name>(subparsers)` function that declares its arguments and sets
`run=<function(args) -> exit code>`; `main` parses and dispatches. To add a command, write the pair
and list the adder in `COMMANDS`.

Exit codes: 0 success, 1 a check failed (or a requirement is missing), 2 bad arguments (argparse).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("t2i")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"


def _positive_int(text):
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {n}")
    return n


def _non_negative_int(text):
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {n}")
    return n


# --- t2i verify -------------------------------------------------------------------------------


def _add_verify(sub):
    p = sub.add_parser(
        "verify",
        help="check every op against PyTorch (forward and gradient)",
        description="Run every op of core on random float64 inputs and compare its output and input "
        "gradients with PyTorch's on the same inputs. Prints one row per op with its worst error "
        "over the trials; exits 1 if any op fails.",
    )
    p.add_argument("--trials", type=_positive_int, default=3, metavar="N",
                   help="random inputs per op (default: 3)")
    p.add_argument("--seed", type=_non_negative_int, default=0, metavar="S",
                   help="seed of the random inputs (default: 0)")
    p.add_argument("--op", action="extend", nargs="+", metavar="NAME", dest="ops",
                   help="check only these ops (repeatable; default: all)")
    p.add_argument("--json", action="store_true", help="print machine-readable results instead of a table")
    p.set_defaults(run=_verify, parser=p)


def _verify(args) -> int:
    try:
        import torch  # noqa: F401 - only to fail early with a useful message
    except ImportError:
        print("t2i verify needs PyTorch: pip install -e '.[test]'", file=sys.stderr)
        return 1
    from core import verify

    if args.ops:
        known = {c.name: c for c in verify.all_cases()}
        unknown = [n for n in args.ops if n not in known]
        if unknown:
            args.parser.error(f"unknown op(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        untestable = [n for n in args.ops if not known[n].torch]
        if untestable:
            args.parser.error(f"op(s) {', '.join(untestable)} have no PyTorch equivalent (random ops); "
                              "they are checked by the statistical tests instead")
    with warnings.catch_warnings():  # PyTorch's own deprecation notices say nothing about our ops
        warnings.filterwarnings("ignore", module=r"torch(\.|$)")
        results = verify.verify(trials=args.trials, seed=args.seed, names=args.ops)
    failed = [r for r in results if not r.ok]
    if args.json:
        print(json.dumps(_json_report(results, args), indent=2, allow_nan=False))
    else:
        print(_table(results))
        for r in failed:
            print(f"FAILED {r.name}: {r.message}")
        print(f"{len(results)} ops, {len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def _finite(x):
    """A float for JSON: None where the error is not finite (the op crashed or shapes differ)."""
    return float(x) if math.isfinite(x) else None


def _json_report(results, args):
    return {
        "trials": args.trials,
        "seed": args.seed,
        "ops": len(results),
        "passed": sum(r.ok for r in results),
        "failed": sum(not r.ok for r in results),
        "results": [
            {"op": r.name, "max_abs_error": _finite(r.max_abs), "max_rel_error": _finite(r.max_rel),
             "pass": bool(r.ok), "message": r.message}
            for r in results
        ],
    }


def _table(results) -> str:
    """Aligned columns: op | max abs error | max rel error | pass."""
    header = ("op", "max abs error", "max rel error", "pass")
    rows = [(r.name, f"{r.max_abs:.2e}", f"{r.max_rel:.2e}", "ok" if r.ok else "FAIL") for r in results]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]

    def line(row):
        # names left-aligned, numbers right-aligned so their exponents line up
        cells = [row[0].ljust(widths[0]), row[1].rjust(widths[1]), row[2].rjust(widths[2]), row[3].ljust(widths[3])]
        return " | ".join(cells).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


# --- t2i bench --------------------------------------------------------------------------------


def _add_bench(sub):
    p = sub.add_parser(
        "bench",
        help="benchmark the kernels against NumPy, PyTorch and this machine's peak",
        description="Time each kernel family (attention, conv, gumbel, schedule) over a sweep of sizes: our "
        "kernel, the NumPy reference, the engine op and PyTorch, with GFLOP/s or GB/s, the fraction of this "
        "machine's measured peak, the ratio to PyTorch and the peak memory. Prints a table and writes "
        "<device>-<date>.json and PNG plots (default: bench/results/).",
    )
    from bench.cli import add_arguments  # argparse only: the benchmarks import numba/torch when they run

    add_arguments(p)
    p.set_defaults(run=_bench)


def _bench(args) -> int:
    from bench.cli import run

    return run(args)


# --- entry point ------------------------------------------------------------------------------

COMMANDS = [_add_verify, _add_bench]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per command."""
    parser = argparse.ArgumentParser(
        prog="t2i",
        description="A from-scratch text-to-image codebase: autograd engine, kernels and models.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv=None) -> int:
    """Parse `argv` (default: sys.argv[1:]), run the chosen command and return its exit code."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
