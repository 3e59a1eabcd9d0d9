"""The benchmark suite: `t2i bench --quick` runs end to end, and its arithmetic is right on a fake clock.

No assertion here is about speed: the machine running the tests may be loaded, and the numbers are the
benchmark's output, not its correctness.
"""

import json
import math
import os
import sys
from pathlib import Path

import pytest

from bench import attention, cli, conv, gumbel, harness, schedule
from models.cli import main


class FakeClock:
    """perf_counter stand-in: returns the given instants in turn."""

    def __init__(self, instants):
        self.instants = list(instants)

    def __call__(self):
        return self.instants.pop(0)


def test_measure_takes_the_median_after_warmup():
    calls = []
    clock = FakeClock([0.0, 1.0, 1.0, 4.0, 4.0, 6.0])  # three timed calls: 1 s, 3 s, 2 s
    t = harness.measure(lambda: calls.append(1), repeats=3, warmup=2, clock=clock)
    assert len(calls) == 5  # two warm-up calls, untimed, then three timed
    assert t.times == [1.0, 3.0, 2.0]
    assert t.median == 2.0


def test_measure_stops_at_the_budget_but_not_before_min_repeats():
    clock = FakeClock([0.0, 10.0, 10.0, 20.0, 20.0, 30.0, 30.0, 40.0])
    t = harness.measure(lambda: None, repeats=10, warmup=0, budget_s=5.0, min_repeats=3, clock=clock)
    assert t.times == [10.0, 10.0, 10.0]


def test_measure_repeats_a_fast_call_until_min_time_up_to_max_repeats():
    clock = FakeClock([x for k in range(40) for x in (k, k + 0.125)])  # calls of 1/8 s
    t = harness.measure(lambda: None, repeats=3, warmup=0, min_time_s=1.0, max_repeats=20, clock=clock)
    assert len(t.times) == 8  # 3 were asked for; 8 make the second
    clock = FakeClock([x for k in range(40) for x in (k, k + 0.125)])
    t = harness.measure(lambda: None, repeats=3, warmup=0, min_time_s=10.0, max_repeats=20, clock=clock)
    assert len(t.times) == 20  # the cap
    clock = FakeClock([x for k in range(40) for x in (k, k + 2.0)])  # slow calls: the repeats asked for, no more
    t = harness.measure(lambda: None, repeats=3, warmup=0, min_time_s=1.0, max_repeats=20, clock=clock)
    assert len(t.times) == 3


def test_summary_arithmetic():
    """rate = work/time, fraction = rate/peak, ratio = ours/torch, for a known workload on known times."""
    case = harness.Case("fam", "c", work=6e9, unit="GFLOP/s",
                        impls=[harness.Impl("cpu", None), harness.Impl("ref", None), harness.Impl("torch", None)])
    timings = {"cpu": harness.Timing([0.5, 0.2, 0.3]),  # median 0.3 s
               "torch": harness.Timing([0.1]),
               "ref": "unavailable: not here"}
    rows = {r["impl"]: r for r in harness.summarize(case, timings, {"GFLOP/s": 40.0, "GB/s": 10.0},
                                                    {"cpu": {"peak_mib": 3.0}})}
    cpu = rows["cpu"]
    assert cpu["median_ms"] == pytest.approx(300.0)
    assert cpu["rate"] == pytest.approx(20.0)  # 6e9 FLOPs in 0.3 s = 20 GFLOP/s
    assert cpu["fraction_of_peak"] == pytest.approx(0.5)  # of 40 GFLOP/s
    assert cpu["ratio_to_torch"] == pytest.approx(3.0)  # 0.3 s / 0.1 s
    assert cpu["torch_ms"] == pytest.approx(100.0)
    assert cpu["peak_mib"] == 3.0
    assert rows["torch"]["ratio_to_torch"] is None and rows["torch"]["rate"] == pytest.approx(60.0)
    assert rows["ref"]["status"] == "unavailable" and "not here" in rows["ref"]["reason"]


def test_summary_stream_time():
    """On a GPU the stream time (calls queued back to back) gets its own rate, fraction of peak and ratio."""
    case = harness.Case("fam", "c", work=8e9, unit="GB/s",
                        impls=[harness.Impl("cuda", None), harness.Impl("torch", None)])
    timings = {"cuda": harness.Timing([0.004]), "torch": harness.Timing([0.004])}
    rows = {r["impl"]: r for r in harness.summarize(case, timings, {"GFLOP/s": 1.0, "GB/s": 4000.0}, {},
                                                    {"cuda": 0.002, "torch": 0.004})}
    assert rows["cuda"]["stream_ms"] == pytest.approx(2.0)
    assert rows["cuda"]["stream_rate"] == pytest.approx(4000.0)  # 8 GB in 2 ms
    assert rows["cuda"]["stream_fraction_of_peak"] == pytest.approx(1.0)
    assert rows["cuda"]["stream_ratio_to_torch"] == pytest.approx(0.5)
    assert rows["cuda"]["ratio_to_torch"] == pytest.approx(1.0)  # the synchronized times are unchanged
    assert rows["torch"]["stream_ratio_to_torch"] is None
    # a CPU run has no stream time: no such fields
    cpu = harness.summarize(case, timings, {"GB/s": 10.0})
    assert all("stream_ms" not in r for r in cpu)


def test_measure_stream_brackets_queued_calls_with_events(monkeypatch):
    """measure_stream: one synchronized warm-up, then `calls` calls between two events, no sync among them."""
    import types

    log = []

    class Event:
        def record(self):
            log.append("record")

        def synchronize(self):
            log.append("event sync")

    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(
        Event=Event, get_elapsed_time=lambda start, end: 30.0,
        Device=lambda: types.SimpleNamespace(synchronize=lambda: log.append("sync"))))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    seconds = harness.measure_stream(lambda: log.append("call"), calls=3)
    assert seconds == pytest.approx(0.010)  # 30 ms over 3 calls
    assert log == ["call", "sync", "record", "call", "call", "call", "record", "event sync", "sync"]


def test_work_counts():
    # causal attention: n(n+1)/2 visible pairs; 4·D FLOPs per pair forward, 14·D forward+backward
    assert attention.visible_pairs(4) == 10
    assert attention.flops(2, 3, 8, 10, backward=False) == 2 * 3 * 10 * 4 * 8
    assert attention.flops(2, 3, 8, 10, backward=True) == 2 * 3 * 10 * 14 * 8
    from kernels.attention.patterns import Row

    row = Row(text_len=2, width=3)
    assert attention.visible_pairs(11, row) == row.mask(11).sum() < attention.visible_pairs(11)
    # conv 3×3 pad 1 keeps the size: 2·N·K·C·9·H·W, three times with both gradients
    assert conv.flops(64, 64, 64, 16, 16) == 2 * 64 * 64 * 64 * 9 * 256
    assert conv.flops(64, 64, 64, 16, 16, backward=True) == 3 * conv.flops(64, 64, 64, 16, 16)
    assert gumbel.nbytes_moved(4096, 8192, 4, backward=False) == 2 * 4096 * 8192 * 4
    assert schedule.nbytes_moved((2, 3, 4, 4)) == 3 * 96 * 4


def test_memory_peak_sees_numpy_allocations():
    import numpy as np

    m = harness.memory_peak(lambda: np.ones(4 * 2**20, dtype=np.uint8))  # 4 MiB, freed on return
    assert 3.9 < m["peak_mib"] < 64
    assert m["traced_mib"] == pytest.approx(4.0, abs=0.1)


def test_memory_peak_untraced_allocator_is_a_lower_bound_or_unknown():
    m = harness.memory_peak(lambda: None, traced=False)
    assert m["peak_mib"] is None or m["peak_mib"] == m["rss_mib"] > 0
    assert "lower bound" in m["peak_note"]


def test_table_formats_every_row():
    rows = [{"family": "f", "case": "c", "impl": "cpu", "status": "ok", "median_ms": 1.5, "torch_ms": 3.0,
             "ratio_to_torch": 0.5, "rate": 12.0, "unit": "GB/s", "fraction_of_peak": 0.25, "peak_mib": 2.0},
            {"family": "f", "case": "c", "impl": "reference", "status": "unavailable", "reason": "missing"}]
    lines = cli.format_table(rows).splitlines()
    assert lines[0].split(" | ")[0].strip() == "family" and len(lines) == 4
    assert "0.50" in lines[2] and "12 GB/s" in lines[2] and "25.0" in lines[2]
    assert "unavailable" in lines[3] and "missing" in lines[3]


def test_table_copy_column_and_fraction():
    row = {"family": "f", "case": "c", "impl": "cpu", "status": "ok", "median_ms": 1.5, "torch_ms": 3.0,
           "ratio_to_torch": 0.5, "rate": 12.0, "unit": "GB/s", "fraction_of_peak": 0.25, "peak_mib": 2.0}
    harness.set_copy_fractions([row], 16.0)
    assert row["copy_gbs"] == 16.0 and row["fraction_of_copy"] == 0.75
    header, _, line = cli.format_table([row]).splitlines()
    assert header.split(" | ")[-1].strip() == "% of copy" and line.split(" | ")[-1].strip() == "75.0"


def test_table_stream_columns():
    row = {"family": "f", "case": "c", "impl": "cuda", "status": "ok", "median_ms": 1.5, "torch_ms": 3.0,
           "ratio_to_torch": 0.5, "rate": 12.0, "unit": "GB/s", "fraction_of_peak": 0.25, "peak_mib": 2.0,
           "stream_ms": 0.75, "stream_ratio_to_torch": 0.4, "stream_fraction_of_peak": 0.5}
    lines = cli.format_table([row]).splitlines()
    assert "stream ms" in lines[0] and lines[2].rstrip().endswith("0.75 |         0.40 |               50.0")
    assert "stream" not in cli.format_table([{k: v for k, v in row.items() if not k.startswith("stream")}])


def test_result_names():
    assert cli.result_stem("cpu", "2026-01-02", cli.FAMILIES) == "cpu-2026-01-02"
    assert cli.result_stem("cuda", "2026-01-02", ["gumbel"], quick=True) == "cuda-2026-01-02-quick-gumbel"


def test_targets_are_met_missed_or_not_measured():
    from bench import targets

    results = [{"family": "attention", "case": "fwd+bwd causal N=1024", "impl": "cpu", "status": "ok",
                "ratio_to_torch": 1.5},
               {"family": "gumbel", "case": "fwd 4096x8192", "impl": "cpu", "status": "ok", "ratio_to_torch": 0.5},
               {"family": "conv", "case": "fwd+bwd N=64 C=K=64 16x16 3x3 pad1", "impl": "cpu", "status": "unavailable"}]
    checks = targets.check({"settings": {"device": "cpu"}, "results": results})
    verdict = {(c["family"], c["case"]): c["verdict"] for c in checks}
    assert verdict[("attention", "fwd+bwd causal N=1024")] == "met"  # 1.5 ≤ 2
    assert verdict[("gumbel", "fwd 4096x8192")] == "missed"  # 0.5 > 0.2
    assert verdict[("conv", "fwd+bwd N=64 C=K=64 16x16 3x3 pad1")] == "not measured"
    assert "missed" in targets.format_targets(checks)


def test_cpu_schedule_targets_read_bandwidth_into_buffers_and_ratio_fresh():
    """The bandwidth target reads the kernel writing into buffers made once (as the peak copy does), the PyTorch
    ratio the kernel returning fresh arrays (as PyTorch's eager code does); both rows exist in the CPU cases."""
    from types import SimpleNamespace

    from bench import targets

    case = "q_sample 64x3x256x256"
    results = [{"family": "schedule", "case": case, "impl": "cpu", "status": "ok", "fraction_of_copy": 0.5,
                "ratio_to_torch": 0.2},
               {"family": "schedule", "case": case, "impl": schedule.OUT_BUFFERS, "status": "ok",
                "fraction_of_copy": 0.8, "fraction_of_peak": 0.6, "ratio_to_torch": 0.5}]
    checks = [c for c in targets.check({"settings": {"device": "cpu"}, "results": results}) if c["case"] == case]
    assert {c["field"]: (c["value"], c["verdict"]) for c in checks} == {"fraction_of_copy": (0.8, "met"),
                                                                       "ratio_to_torch": (0.2, "met")}
    cpu_cases = schedule.cases(SimpleNamespace(device="cpu", ours="cpu"), quick=True)
    for c in cpu_cases:
        if c.params["op"] in schedule.OPS:
            assert [impl.name for impl in c.impls][:2] == ["cpu", schedule.OUT_BUFFERS]
        else:  # the noise alone, into a buffer made once, beside torch.randn(out=)
            assert c.params["op"] == "draw" and [impl.name for impl in c.impls] == [schedule.OUT_BUFFERS, "torch"]
            assert c.work == 4 * math.prod(c.params["shape"])


def test_gpu_elementwise_targets_read_both_times():
    from bench import targets

    results = [{"family": "schedule", "case": "ddim_step 64x3x1024x1024", "impl": "cuda", "status": "ok",
                "fraction_of_peak": 0.6, "stream_fraction_of_peak": 0.75}]
    checks = [c for c in targets.check({"settings": {"device": "cuda"}, "results": results})
              if c["case"] == "ddim_step 64x3x1024x1024"]
    assert {c["field"]: c["verdict"] for c in checks} == {"stream_fraction_of_peak": "met",
                                                          "fraction_of_peak": "missed"}


def test_markdown_table():
    rows = [{"family": "f", "case": "c", "impl": "cpu", "status": "ok", "median_ms": 1.5, "torch_ms": None,
             "ratio_to_torch": None, "rate": 12.0, "unit": "GB/s", "fraction_of_peak": None, "peak_mib": 2.0}]
    lines = cli.format_table(rows, markdown=True).splitlines()
    assert all(line.startswith("| ") and line.endswith(" |") for line in (lines[0], lines[2]))
    assert set(lines[1]) <= set("|-:")


def _finite_numbers(x):
    if isinstance(x, dict):
        return all(_finite_numbers(v) for v in x.values())
    if isinstance(x, list):
        return all(_finite_numbers(v) for v in x)
    return not isinstance(x, float) or math.isfinite(x)


def test_passive_openmp_unless_the_user_chose(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert cli.passive_openmp()["set_by"] == "user"
    assert cli.passive_openmp()["OMP_WAIT_POLICY"] == "ACTIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")  # recorded, so the variable is restored after the test
    info = cli.passive_openmp()
    assert info["set_by"] == "t2i bench" and info["OMP_WAIT_POLICY"] == "PASSIVE"
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


def test_quick_bench_writes_json_and_plots(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # what t2i bench would set; restored after the test
    code = main(["bench", "--quick", "--threads", "2", "--repeats", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    files = sorted(p.name for p in tmp_path.iterdir())
    json_files = [f for f in files if f.endswith(".json")]
    assert len(json_files) == 1 and json_files[0].startswith("cpu-") and json_files[0].endswith("-quick.json")
    report = json.loads((tmp_path / json_files[0]).read_text())
    assert _finite_numbers(report)
    assert report["settings"]["threads"] == 2 and report["peak"]["GFLOP/s"] > 0 and report["peak"]["GB/s"] > 0
    assert report["machine"]["cpu_model"] and report["machine"]["numpy"]
    assert set(report["families"]) == set(cli.FAMILIES)
    ok = [r for r in report["results"] if r["status"] == "ok"]
    assert {r["family"] for r in ok} == {f for f, s in report["families"].items() if s == "ok"}
    assert all(r["status"] != "error" for r in report["results"]), [r for r in report["results"] if "error" in r]
    for r in ok:  # the stored rate is the stored work over the stored median
        assert r["rate"] == pytest.approx(r["work"] / (r["median_ms"] / 1e3) / 1e9)
    # the peak is the better of the probes at the start and the end, and the fractions are of it
    details = report["peak"]["details"]
    assert report["peak"]["GB/s"] == max(v for k, v in details.items() if k.startswith("copy"))
    assert {k.rsplit(" ", 1)[1] for k in details} == {"(start)", "(end)"}
    for r in ok:
        if r["unit"] in report["peak"]:
            assert r["fraction_of_peak"] == pytest.approx(r["rate"] / report["peak"][r["unit"]])
        # an elementwise case's rows also hold the GB/s of a copy of its bytes timed beside it, and the fraction of it
        if r["unit"] == "GB/s":
            assert r["copy_gbs"] > 0 and r["fraction_of_copy"] == pytest.approx(r["rate"] / r["copy_gbs"])
        else:
            assert "fraction_of_copy" not in r
        if r["impl"] == "torch":  # PyTorch's CPU allocations are seen only as resident-set growth, if any
            assert r["peak_mib"] is None or r["peak_mib"] > 0
        else:
            assert r["peak_mib"] >= 0
    pngs = [f for f in files if f.endswith(".png")]
    assert pngs and set(pngs) == set(report["plots"])
    for name in pngs:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "family" in out and "ratio" in out and "wrote" in out and "% of copy" in out


def test_missing_kernels_are_reported_unavailable(monkeypatch, tmp_path, capsys):
    def missing(*args):
        raise harness.UnavailableError("kernels.gumbel is not importable: test")

    monkeypatch.setattr(gumbel, "_kernels", missing)
    code = main(["bench", "gumbel", "--quick", "--repeats", "1", "--json", "--out", str(tmp_path)])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["families"]["gumbel"].startswith("unavailable")
    assert [r["status"] for r in report["results"]] == ["unavailable"]


def test_cuda_without_a_gpu_says_so(capsys, monkeypatch):
    try:
        import cupy

        if cupy.is_available():
            pytest.skip("a GPU is present")
    except ImportError:  # no CuPy at all (the test extra does not install it): the same clear refusal
        pass
    assert main(["bench", "--device", "cuda", "--quick"]) == 1
    assert "no CUDA device" in capsys.readouterr().err


def test_cuda_cases_are_built_without_a_gpu():
    """The CUDA path cannot run here; at least its cases must build: our cuda form against torch, no CPU-only forms."""
    from types import SimpleNamespace

    fake = SimpleNamespace(device="cuda", ours="cuda")
    for family in (attention, conv, gumbel, schedule):
        cases = family.cases(fake, quick=True)
        assert cases
        for case in cases:
            names = [impl.name for impl in case.impls]
            assert names[-1] == "torch" and names[0] in ("cuda", "cuda_tc")
            assert not {"reference", "core", "cpu"} & set(names)
            assert case.work > 0
    assert any(c.name.startswith("fwd causal fp16") for c in attention.cases(fake, quick=True))
    assert all(schedule.CUDA_NUMBA in [i.name for i in c.impls] for c in schedule.cases(fake, quick=True))
    assert all("cuda_numba" in [i.name for i in c.impls] for c in gumbel.cases(fake, quick=True))


def test_gpu_sweep_includes_the_default_launch():
    """bench.sweep_cuda_vec times cuda_vec's default launch shape among the others (its baseline), each once."""
    from bench import sweep_cuda_vec
    from kernels.schedule import cuda_vec

    shapes = sweep_cuda_vec.configs(132)
    assert (cuda_vec.WAVES * 132, cuda_vec.THREADS) in shapes and len(set(shapes)) == len(shapes)
    assert all(block <= cuda_vec.THREADS for _, block in shapes)  # __launch_bounds__(256)


def test_gpu_sweep_runs_through_on_a_fake_gpu(monkeypatch, capsys):
    """bench.sweep_cuda_vec end to end with NumPy standing in for CuPy, tiny shapes and kernels that copy x: every
    update × unroll × launch shape and every Gumbel block size prints its line (a lent GPU's minutes are not spent
    finding a typo), and a result that differs from the default launch's is flagged."""
    import types

    import numpy as np

    from bench import sweep_cuda_vec as sweep
    from kernels import dispatch
    from kernels.gumbel import cuda_vec as gumbel_vec
    from kernels.schedule import cuda_vec

    class Device:
        attributes = {"MultiProcessorCount": 2}

        def synchronize(self):
            pass

    fake = types.SimpleNamespace(
        is_available=lambda: True, asarray=np.asarray, empty_like=np.empty_like, copyto=np.copyto,
        array_equal=np.array_equal, allclose=np.allclose,
        cuda=types.SimpleNamespace(Device=Device, runtime=types.SimpleNamespace(
            getDeviceProperties=lambda i: {"name": b"Fake GPU"})))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(dispatch, "sm_count", lambda: 2)
    monkeypatch.setattr(sweep, "measure_stream", lambda fn, **kw: (fn(), 1e-3)[1])
    monkeypatch.setattr(sweep, "SHAPE", (2, 3, 8, 8))
    monkeypatch.setattr(sweep, "GUMBEL_SHAPE", (4, 64))
    monkeypatch.setattr(sweep.schedule_bench, "_ours", lambda *a: lambda: lambda: None)
    launched = []

    def schedule_kernels(unroll=cuda_vec.UNROLL):
        def kernel(grid, block, args):  # out = x, or x + 1 for unroll 2 on 2 blocks per SM of 256: "differs"
            launched.append((unroll, grid[0], block[0]))
            args[10][...] = args[0] + (unroll == 2 and grid[0] == 4 and block[0] == 256)
        return {k: kernel for k in cuda_vec.INSTANCES}

    def gumbel_kernels(threads=gumbel_vec.THREADS):
        def kernel(grid, block, args):
            args[-1][...] = args[0]
        return {True: kernel, False: kernel}

    monkeypatch.setattr(cuda_vec, "_kernels", schedule_kernels)
    monkeypatch.setattr(gumbel_vec, "_kernels", gumbel_kernels)
    sweep.main()
    lines = capsys.readouterr().out.splitlines()
    shapes = sweep.configs(2)
    for name in ("q_sample", "ddpm_step", "ddim_step"):
        for form in ("cuda ", "cuda_vec "):
            assert sum(line.startswith(f"{name:10s} {form}") and "default launch" in line for line in lines) == 1
        for unroll in sweep.UNROLLS:
            mine = [line for line in lines if line.startswith(f"{name:10s} cuda_vec  unroll {unroll} grid")]
            assert len(mine) == len(shapes)
            assert sum("RESULT DIFFERS" in line for line in mine) == (unroll == 2)
    assert {(u, g, b) for u, g, b in launched} >= {(u, g, b) for u in sweep.UNROLLS for g, b in shapes}
    assert sum(line.startswith("gumbel     cuda_vec") for line in lines) == 2 * len(sweep.GUMBEL_THREADS)


def test_a_broken_family_is_reported_and_the_run_goes_on(monkeypatch, tmp_path, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("cases exploded")

    monkeypatch.setattr(gumbel, "cases", broken)
    monkeypatch.setattr(schedule, "cases", lambda backend, quick, full: [])
    code = main(["bench", "gumbel", "schedule", "--quick", "--repeats", "1", "--json", "--out", str(tmp_path)])
    report = json.loads(capsys.readouterr().out)
    assert report["families"] == {"gumbel": "error: RuntimeError: cases exploded", "schedule": "ok"}
    assert code == 1  # an error was reported


def test_bad_out_and_min_time_are_refused_before_measuring(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "run_benchmarks", lambda *a, **k: pytest.fail("measured before checking --out"))
    afile = tmp_path / "afile"
    afile.write_text("")
    assert main(["bench", "schedule", "--quick", "--out", str(afile / "sub")]) == 2
    assert "t2i bench --out" in capsys.readouterr().err
    for bad in ("inf", "nan", "-1"):
        with pytest.raises(SystemExit) as e:
            main(["bench", "--quick", "--min-time", bad, "--out", str(tmp_path)])
        assert e.value.code == 2 and "finite number of seconds" in capsys.readouterr().err


def test_pin_threads_pins_a_blas_loaded_after_the_first_call():
    """SciPy's OpenBLAS (Numba's np.dot) is loaded after the run's first pin_threads: later calls pin it too. In a
    fresh process, so that it is not loaded yet."""
    import subprocess

    pytest.importorskip("threadpoolctl")
    code = ("import threadpoolctl\nimport numpy as np\nfrom bench import harness\nharness.pin_threads(1)\n"
            "import scipy.linalg\nscipy.linalg.blas.dgemm(1.0, np.ones((2, 2)), np.ones((2, 2)))\n"
            "harness.pin_threads(1)\n"
            "print(sorted({p['num_threads'] for p in threadpoolctl.threadpool_info() if p['user_api'] == 'blas'}))")
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}  # the libraries' own defaults
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == "[1]", out


def test_bad_family_is_refused(capsys):
    assert main(["bench", "nonsense"]) == 2
    assert "unknown family" in capsys.readouterr().err


def test_gpu_check_script_parses():
    """bench/gpu_check.sh runs only on a lent GPU machine, where a syntax error would cost a whole device session."""
    import shutil
    import subprocess

    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"
    proc = subprocess.run([bash, "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
