"""`t2i bench`: run the kernel and model benchmarks, print a table, save JSON and PNG plots.

    t2i bench [family ...] [--device cpu|cuda] [--threads N] [--quick] [--full] [--json] [--out DIR]

Order of work: pin the thread pools, record the machine, measure its peak (sgemm GFLOP/s, copy GB/s), then
each family's cases, each implementation in turn (its inputs built, timed, its peak memory probed, freed).
A family whose kernels cannot be imported yet is reported as unavailable; an implementation that fails
is reported with its error, and the others still run.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import sys
from pathlib import Path

from bench import harness

FAMILIES = ("attention", "conv", "gumbel", "schedule", "model")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# a measurement's calls take at least MIN_TIME_S in all (up to MAX_REPEATS calls): the median of five calls of 10 ms
# moved with two stalls of this project's VM (bench/README.md); that of 25 does not
MIN_TIME_S, MAX_REPEATS = 0.5, 25


def _positive_int(text):
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {n}")
    return n


def _seconds(text):
    x = float(text)
    if not (x >= 0 and math.isfinite(x)):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, got {text}")
    return x


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Declare `t2i bench`'s arguments on p."""
    p.add_argument("families", nargs="*", metavar="family",
                   help=f"families to run (default: all of {', '.join(FAMILIES)})")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="threads for Numba, PyTorch and BLAS alike (default: the usable cores)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny sizes: checks that everything runs (seconds)")
    size.add_argument("--full", action="store_true", help="add the largest sizes (attention N = 2048, 4096)")
    p.add_argument("--repeats", type=_positive_int, default=None, metavar="R",
                   help="timed calls per measurement after one warm-up (default: 5; 2 with --quick), and more, up to "
                        f"{MAX_REPEATS}, until they take --min-time seconds")
    p.add_argument("--min-time", type=_seconds, default=None, metavar="S",
                   help=f"seconds of timed calls a measurement takes at least (default: {MIN_TIME_S}; 0 with --quick)")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown (for the README)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help=f"where to write the JSON and PNGs (default: {RESULTS_DIR})")


def run(args) -> int:
    """Run the benchmarks `args` selects; 0 on success, 1 if the device is missing or an implementation errored."""
    unknown = [f for f in args.families if f not in FAMILIES]
    if unknown:
        print(f"unknown family {', '.join(unknown)}; known: {', '.join(FAMILIES)}", file=sys.stderr)
        return 2
    out_dir = args.out or RESULTS_DIR
    try:  # before any measuring: a bad --out would otherwise lose the run at its end
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"t2i bench --out {out_dir}: {e.strerror}", file=sys.stderr)
        return 2
    openmp = passive_openmp()
    families = list(dict.fromkeys(args.families)) or list(FAMILIES)
    threads = args.threads or usable_cores()
    repeats = args.repeats or (2 if args.quick else 5)
    min_time_s = args.min_time if args.min_time is not None else (0.0 if args.quick else MIN_TIME_S)
    try:
        backend = harness.Backend(args.device)
    except (harness.UnavailableError, ImportError) as e:
        print(f"t2i bench --device {args.device}: {e}", file=sys.stderr)
        return 1
    report = run_benchmarks(backend, families, threads=threads, quick=args.quick, full=args.full, repeats=repeats,
                            min_time_s=min_time_s, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    report["settings"]["openmp"] = openmp
    stem = result_stem(args.device, report["machine"]["date"][:10], families, args.quick, args.full)
    json_path = out_dir / f"{stem}.json"
    from bench.plot import plot_report
    from bench.targets import check, format_targets

    report["targets"] = check(report)
    if "model" in families:  # the transformers issue's targets (bench/model.py)
        from bench import model

        report["targets"] += model.targets(report)
    report["plots"] = [p.name for p in plot_report(report, out_dir, stem)]
    json_path.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    if args.json:
        print(json.dumps(report, indent=1, allow_nan=False))
    else:
        print(format_table(report["results"], markdown=args.markdown))
        print("\ntargets (kernels and transformers issues):\n" + format_targets(report["targets"]))
        if "model" in families:
            print("\n".join(model.notes(report)))
        print(f"\nratio = our time / PyTorch's (below 1: faster). Peak: {report['peak']['GFLOP/s']:.1f} GFLOP/s "
              f"(sgemm), {report['peak']['GB/s']:.1f} GB/s (copy). {threads} threads. Load average at start "
              f"{_load(report['machine'])}, at end {_load(report['machine_end'])}.")
        print(f"wrote {json_path} and {len(report['plots'])} plot(s) in {out_dir}")
    errors = [r for r in report["results"] if r.get("status") == "error"]
    return 1 if errors else 0


def passive_openmp() -> dict:
    """Make OpenMP threads sleep, not spin, while they wait (OMP_WAIT_POLICY=PASSIVE), unless the user chose.

    One process holds two OpenMP runtimes (Numba's and PyTorch's own libgomp) besides OpenBLAS's threads. By
    default a libgomp thread spins for a while at every barrier; when the cores are shared — by the other
    runtime, or by other processes on a loaded machine — the spinning threads eat the time slices of the
    threads being waited for, and every parallel region can cost a scheduler slice. Measured here under load,
    PyTorch's attention forward+backward ran 3-10x slower with spinning, our kernels about 1.2x. The policy is
    read when a runtime is loaded, so it only takes effect for runtimes not loaded yet (the JSON says which).
    """
    chosen = "OMP_WAIT_POLICY" in os.environ
    loaded = [m for m in ("torch", "numba.np.ufunc.omppool") if m in sys.modules]
    if not chosen:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return {"OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"], "set_by": "user" if chosen else "t2i bench",
            "runtimes_loaded_before": loaded}


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _load(machine):
    la = machine.get("load_average")
    return "/".join(f"{x:.1f}" for x in la) if la else "?"


def result_stem(device, date, families, quick=False, full=False) -> str:
    """<device>-<date>, with -quick/-full and the families appended when not the default run of all of them."""
    stem = f"{device}-{date}"
    if quick:
        stem += "-quick"
    if full:
        stem += "-full"
    if list(families) != list(FAMILIES):
        stem += "-" + "-".join(families)
    return stem


def run_benchmarks(backend, families, *, threads, quick=False, full=False, repeats=5, budget_s=3.0, min_time_s=0.0,
                   clock=None, log=print) -> dict:
    """Measure every case of every family; returns the report (machine, settings, peak, results)."""
    pinned = harness.pin_threads(threads)
    machine = harness.machine_info(backend.device)
    settings = dict(device=backend.device, threads=threads, pinned=pinned, quick=quick, full=full, repeats=repeats,
                    min_time_s=min_time_s, max_repeats=MAX_REPEATS, budget_s=budget_s, families=families,
                    argv=sys.argv)
    log(f"measuring peak on {machine['cpu_model']} ({threads} threads, load {_load(machine)})")
    from bench.peak import best_of, measure_peak

    peak = measure_peak(backend.device, quick=quick)
    log(f"peak: {peak['GFLOP/s']:.1f} GFLOP/s sgemm, {peak['GB/s']:.1f} GB/s copy")
    timing_kw = dict(repeats=repeats, budget_s=budget_s, min_time_s=min_time_s, max_repeats=MAX_REPEATS,
                     sync=backend.sync)
    if clock is not None:
        timing_kw["clock"] = clock
    results, status = [], {}
    for family in families:
        module = importlib.import_module(f"bench.{family}")
        try:
            cases = module.cases(backend, quick=quick, full=full)
        except (harness.UnavailableError, ImportError) as e:
            status[family] = f"unavailable: {e}"
            results.append({"family": family, "case": "*", "impl": "*", "status": "unavailable", "reason": str(e)})
            log(f"{family}: unavailable ({e})")
            continue
        except Exception as e:  # a broken family is reported, the run goes on (as for a broken implementation)
            reason = f"{type(e).__name__}: {e}"
            status[family] = f"error: {reason}"
            results.append({"family": family, "case": "*", "impl": "*", "status": "error", "reason": reason})
            log(f"{family}: error ({reason})")
            continue
        status[family] = "ok"
        for case in cases:
            timings, memory, stream = {}, {}, {}
            beside = case.unit == "GB/s" and backend.device == "cpu"  # a copy of its bytes before and after it
            copies = [_copy_rate(case.work, threads, timing_kw)] if beside else []
            for impl in case.impls:
                timings[impl.name], mem, streamed = _measure_impl(impl, backend, threads, timing_kw)
                if mem:
                    memory[impl.name] = mem
                if streamed is not None:
                    stream[impl.name] = streamed
            rows = harness.summarize(case, timings, peak, memory, stream)
            if beside:
                copies.append(_copy_rate(case.work, threads, timing_kw))
                harness.set_copy_fractions(rows, max(copies))
            for row in rows:
                if isinstance(timings.get(row["impl"]), str) and timings[row["impl"]].startswith("error"):
                    row["status"] = "error"
            results.extend(rows)
            log(f"{family} | {case.name} | " + ", ".join(
                f"{r['impl']} {r['median_ms']:.3g} ms" if r["status"] == "ok" else f"{r['impl']} {r['status']}"
                for r in rows))
    # the peak again: a shared machine's bandwidth moves over a run of minutes; fractions are of the better probe
    peak_end = measure_peak(backend.device, quick=quick)
    log(f"peak at the end: {peak_end['GFLOP/s']:.1f} GFLOP/s sgemm, {peak_end['GB/s']:.1f} GB/s copy")
    peak = best_of(start=peak, end=peak_end)
    harness.set_fractions([r for r in results if r.get("status") == "ok"], peak)
    return {"schema": 1, "machine": machine, "settings": settings, "peak": peak, "families": status,
            "results": results, "machine_end": {"load_average": list(os.getloadavg())}}


def _copy_rate(nbytes, threads, timing_kw):
    """GB/s of a CPU copy of nbytes (bench.peak.copy_rate), timed as the implementations are."""
    from bench.peak import copy_rate

    harness.pin_threads(threads)
    return copy_rate(nbytes, **{k: timing_kw[k] for k in ("repeats", "min_time_s", "max_repeats")})


def _measure_impl(impl, backend, threads, timing_kw):
    """(Timing or the reason it did not run, memory dict or None, stream seconds or None) for one implementation
    of one case; the stream time (calls queued back to back) on a GPU only."""
    harness.pin_threads(threads)
    try:
        fn = impl.setup()
    except harness.UnavailableError as e:
        return f"unavailable: {e}", None, None
    except Exception as e:  # a broken implementation is reported, the run goes on
        return f"error: {type(e).__name__}: {e}", None, None
    try:
        timing = harness.measure(fn, **timing_kw)
        stream = harness.measure_stream(fn, sync=backend.sync) if backend.device == "cuda" else None
        memory = harness.memory_peak(fn, backend.device, traced=impl.name != harness.TORCH)
    except Exception as e:  # likewise
        return f"error: {type(e).__name__}: {e}", None, None
    finally:
        del fn
        gc.collect()
    return timing, memory, stream


# --- the table ------------------------------------------------------------------------------------

COLUMNS = ("family", "case", "impl", "ours ms", "torch ms", "ratio", "GFLOP/s or GB/s", "% of peak", "peak MiB")
STREAM_COLUMNS = ("stream ms", "stream ratio", "% of peak (stream)")  # on a GPU: calls queued back to back
COPY_COLUMNS = ("% of copy",)  # on a CPU, for elementwise cases: of a copy of the same bytes timed beside the case


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def format_table(rows, markdown=False) -> str:
    """The results as aligned text columns (or a Markdown table); implementations that did not run show why.

    Where rows have a stream time (a GPU run), three more columns give it, its ratio to PyTorch's and its fraction
    of the peak; where they have a fraction of a copy timed beside the case (a CPU run), one more gives that."""
    streamed = any(r.get("stream_ms") is not None for r in rows)
    copied = any(r.get("fraction_of_copy") is not None for r in rows)
    columns = COLUMNS + (STREAM_COLUMNS if streamed else ()) + (COPY_COLUMNS if copied else ())
    lines = []
    for r in rows:
        if r.get("status") != "ok":
            lines.append((r["family"], r["case"], r["impl"], r.get("status", "?"), "", "", "",
                          "", (r.get("reason") or "")[:60]) + ("",) * (len(columns) - len(COLUMNS)))
            continue
        frac = r.get("fraction_of_peak")
        cells = (r["family"], r["case"], r["impl"], _fmt(r["median_ms"], ".4g"), _fmt(r.get("torch_ms"), ".4g"),
                 _fmt(r.get("ratio_to_torch"), ".2f"), f"{r['rate']:.3g} {r['unit']}",
                 _fmt(None if frac is None else 100 * frac, ".1f"), _fmt(r.get("peak_mib"), ".1f"))
        if streamed:
            sfrac = r.get("stream_fraction_of_peak")
            cells += (_fmt(r.get("stream_ms"), ".4g"), _fmt(r.get("stream_ratio_to_torch"), ".2f"),
                      _fmt(None if sfrac is None else 100 * sfrac, ".1f"))
        if copied:
            cfrac = r.get("fraction_of_copy")
            cells += (_fmt(None if cfrac is None else 100 * cfrac, ".1f"),)
        lines.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(columns, *lines)]
    numeric = set(range(3, len(columns)))

    def line(cells):
        text = " | ".join(str(c).rjust(w) if i in numeric else str(c).ljust(w)
                          for i, (c, w) in enumerate(zip(cells, widths)))
        return f"| {text} |" if markdown else text.rstrip()

    if markdown:
        rule = "|" + "|".join(("-" * (w + 1) + ":") if i in numeric else ("-" * (w + 2))
                              for i, w in enumerate(widths)) + "|"
    else:
        rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line(columns), rule, *(line(x) for x in lines)])


def main(argv=None) -> int:
    """`python -m bench.cli ...`: the same as `t2i bench ...`."""
    p = argparse.ArgumentParser(prog="t2i bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
