"""The report's picture: each variant's per-row error distribution against its threshold (matplotlib, optional).

Drawn from the quantiles parity keeps per output (``distribution``), so it needs only the Report: export writes
it into the bundle (report/errors.png) and ``verify --plot FILE`` draws the device's own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PLOT_FILE = "report/errors.png"
# distribution metric -> (axis label, the threshold key it is judged by, how the threshold maps onto the axis)
AXES = {
    "max_abs_diff": ("max |onnx - torch| per row", "atol"),
    "prob_max_abs_diff": ("max |Δ probability| per row", "max_prob_diff"),
    "kl": ("KL(torch || onnx) per position", "max_mean_kl"),
    "one_minus_cosine": ("1 - cosine per row", "min_cosine"),
}


def plot_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_error_plot(report: dict[str, Any], path: Path) -> bool:
    """Write the plot; False (nothing written) when matplotlib is not installed or nothing has a distribution."""
    if not plot_available():
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels: dict[tuple[str, str], list[tuple[str, list[float], float | None]]] = {}
    for variant, r in report["variants"].items():
        for out, m in (r.get("outputs") or {}).items():
            d = m.get("distribution")
            if not d or d["metric"] not in AXES:
                continue
            key = AXES[d["metric"]][1]
            t = r["thresholds"].get(key)
            limit = m.get("atol_effective") if key == "atol" else (1 - t if key == "min_cosine" and t is not None else t)
            panels.setdefault((out, d["metric"]), []).append((variant, d["quantiles"], limit))
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, ((out, metric), series) in zip(axes[0], sorted(panels.items())):
        for variant, q, limit in series:
            share = np.linspace(0, 1, len(q))
            x = np.maximum(np.asarray(q, dtype=float), 1e-12)
            (line,) = ax.step(x, share, where="post", label=variant)
            if limit is not None and np.isfinite(limit) and limit > 0:
                ax.axvline(limit, color=line.get_color(), linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel(AXES[metric][0])
        ax.set_ylabel("share of probe rows ≤ x")
        ax.set_title(out, fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)
    fig.suptitle("Error of each variant vs PyTorch (dashed: its threshold)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    # No timestamps in the file: the same report gives the same bytes (the manifest hashes it).
    fig.savefig(path, dpi=80, metadata={"Software": None})
    plt.close(fig)
    return True


def write_bench_plot(result: dict[str, Any], path: Path) -> bool:
    """``bench --plot``: per case, each variant's median latency (bar) and p90 (whisker). False without
    matplotlib."""
    if not plot_available():
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in result["cases"]))
    variants = list(result["variants"])
    fig, axes = plt.subplots(1, len(cases), figsize=(2.2 + 1.0 * len(variants) * len(cases), 3.4), squeeze=False)
    for ax, case in zip(axes[0], cases):
        rows = {r["variant"]: r for r in result["cases"] if r["case"] == case}
        p50 = [rows[v]["p50_ms"] for v in variants]
        p90 = [rows[v]["p90_ms"] for v in variants]
        bars = ax.bar(variants, p50, yerr=[[0] * len(p50), [b - a for a, b in zip(p50, p90)]], capsize=3,
                      color=[f"C{i}" for i in range(len(variants))])
        ax.bar_label(bars, labels=[f"{x:.3g}" for x in p50], fontsize=7)
        ax.set_title(case, fontsize=10)
        ax.set_ylabel("ms per call (p50, whisker p90)")
        ax.grid(axis="y", alpha=0.3)
    threads = result["threads"] or "default"
    fig.suptitle(f"{Path(result['bundle']).name}: {result['cpu']['isa']}, onnxruntime {result['onnxruntime']}, "
                 f"threads {threads}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, metadata={"Software": None})
    plt.close(fig)
    return True
