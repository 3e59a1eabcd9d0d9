"""PNG figures of a benchmark report: one figure per family, one panel per sweep (time or memory against size).

Each case names its panel, series and x value (`Case.plot`); a line is one (series, implementation) pair.
Our kernels are solid lines, PyTorch dashed, the NumPy reference dotted and the engine op dash-dotted; grey
lines are guides (e.g. the size of the N×N matrix the attention kernel never stores). Both axes are
logarithmic, so a kernel's scaling reads as a slope (time ∝ N² is slope 2 against N).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

STYLE = {"torch": "--", "reference": ":", "core": "-."}
METRIC_LABEL = {"median_ms": "time (ms, median)", "peak_mib": "peak memory (MiB)"}


def _panels(rows):
    """{family: {panel: {"xlabel", "metric", "lines": {label: [(x, y), ...]}}}} from the report's result rows."""
    figs = defaultdict(dict)
    for row in rows:
        if row.get("status") != "ok":
            continue
        plots = row.get("plot") or []
        for spec in [plots] if isinstance(plots, dict) else plots:
            metric = spec.get("metric", "median_ms")
            y = row.get(metric)
            if y is None or not y > 0:
                continue
            panel = figs[row["family"]].setdefault(
                spec["panel"], {"xlabel": spec["xlabel"], "metric": metric, "lines": defaultdict(list),
                                "guides": defaultdict(set)})
            if spec.get("guide"):  # a reference curve, e.g. the size of the matrix a kernel avoids storing
                label, value = spec["guide"]
                panel["guides"][label].add((spec["x"], value))
            label = f"{spec['series']} {row['impl']}".strip()
            panel["lines"][(label, row["impl"])].append((spec["x"], y))
    return figs


def plot_report(report: dict, out_dir, stem: str) -> list[Path]:
    """Write <out_dir>/<stem>-<family>.png for every family with plottable results; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    machine = report.get("machine", {})
    settings = report.get("settings", {})
    subtitle = (f"{machine.get('cpu_model', '?')}, {settings.get('threads', '?')} threads, "
                f"{machine.get('date', '')[:10]}, device {settings.get('device', '?')}")
    paths = []
    for family, panels in _panels(report["results"]).items():
        n = len(panels)
        cols = min(n, 3)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), squeeze=False)
        # one colour per implementation in the whole figure
        impls = sorted({impl for panel in panels.values() for _, impl in panel["lines"]})
        for ax, (title, panel) in zip(axes.flat, panels.items()):
            series = sorted({label[: -len(impl)].strip() for label, impl in panel["lines"]})
            for (label, impl), points in sorted(panel["lines"].items()):
                points.sort()
                xs, ys = zip(*points)
                # one colour per series (the patterns), or per implementation when a panel has one series
                key = series.index(label[: -len(impl)].strip()) if len(series) > 1 else impls.index(impl)
                ax.plot(xs, ys, STYLE.get(impl, "-"), color=f"C{key % 10}", marker="o", markersize=3, label=label)
            for label, points in panel["guides"].items():
                xs, ys = zip(*sorted(points))
                ax.plot(xs, ys, color="0.6", linewidth=1, label=label)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel(panel["xlabel"])
            ax.set_ylabel(METRIC_LABEL.get(panel["metric"], panel["metric"]))
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[n:]:
            ax.set_visible(False)
        fig.suptitle(f"{family} — {subtitle}", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"{stem}-{family}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
