"""The report's picture: each variant's per-row error distribution against its threshold.

Drawn from the quantiles parity keeps per output (``distribution``), so it needs only the Report: export writes
it into the bundle (report/errors.svg) and ``verify --plot FILE`` draws the device's own. SVG written here, with
no plotting library: matplotlib's import and rendering took 0.75 s of every MiniLM export (issue 15, session 13),
and a device without matplotlib can still plot. ``verify --plot FILE.png`` and ``bench --plot`` use matplotlib
(optional). Every name in the picture comes from a bundle, so all text is XML-escaped.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

PLOT_FILE = "report/errors.svg"
# distribution metric -> (axis label, the threshold key it is judged by, how the threshold maps onto the axis)
AXES = {
    "max_abs_diff": ("max |onnx - torch| per row", "atol"),
    "prob_max_abs_diff": ("max |Δ probability| per row", "max_prob_diff"),
    "kl": ("KL(torch || onnx) per position", "max_mean_kl"),
    "one_minus_cosine": ("1 - cosine per row", "min_cosine"),
}
# matplotlib's default cycle, so the SVG and PNG forms look alike
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
FLOOR = 1e-12  # a zero error has no place on a log axis


def plot_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _panels(report: dict[str, Any]) -> dict[tuple[str, str], list[tuple[str, list[float], float | None]]]:
    """(output, metric) -> [(variant, quantiles, its threshold on that axis)], for every output that kept one.
    A report is a bundle's (untrusted): anything not shaped as parity writes it is left out, not an error."""
    panels: dict[tuple[str, str], list[tuple[str, list[float], float | None]]] = {}
    variants = report.get("variants") if isinstance(report, dict) else None
    for variant, r in (variants.items() if isinstance(variants, dict) else ()):
        outputs = r.get("outputs") if isinstance(r, dict) else None
        thresholds = r.get("thresholds") if isinstance(r, dict) else None
        for out, m in (outputs.items() if isinstance(outputs, dict) else ()):
            d = m.get("distribution") if isinstance(m, dict) else None
            if not isinstance(d, dict) or d.get("metric") not in AXES or not isinstance(d.get("quantiles"), list):
                continue
            key = AXES[d["metric"]][1]
            t = _number(thresholds.get(key)) if isinstance(thresholds, dict) else None
            limit = _number(m.get("atol_effective")) if key == "atol" else (
                1 - t if key == "min_cosine" and t is not None else t)
            panels.setdefault((_text(out), d["metric"]), []).append((_text(variant), d["quantiles"], limit))
    return dict(sorted(panels.items()))


def _number(x: Any) -> float | None:
    """A finite float, or None (strings, booleans, NaN, inf and integers past float range included)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    try:
        f = float(x)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def _text(x: Any) -> str:
    """A name from the bundle as SVG text: no control characters (XML 1.0 forbids them); escaped when written."""
    return re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", "?", str(x))


def _finite_positive(x: Any) -> bool:
    f = _number(x)
    return f is not None and f > 0


def write_error_plot(report: dict[str, Any], path: Path) -> bool:
    """Write the plot (SVG; PNG through matplotlib when ``path`` ends in .png); False (nothing written) when
    nothing has a distribution, or for a PNG without matplotlib."""
    panels = _panels(report)
    if not panels:
        return False
    if path.suffix.lower() == ".png":
        return _error_plot_png(panels, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(error_plot_svg(panels), encoding="utf-8")
    return True


def error_plot_svg(panels: dict[tuple[str, str], list[tuple[str, list[float], float | None]]]) -> str:
    """One panel per (output, metric): x the error on a log axis, y the share of probe rows at most x, a step
    line per variant and its threshold dashed."""
    pw, ph, left, right, top, bottom = 340, 230, 62, 12, 44, 46  # panel size and the plot area's margins
    width, height = pw * len(panels), ph + 24
    variants = list(dict.fromkeys(v for series in panels.values() for v, _, _ in series))
    body = [f'<text x="{width / 2:.1f}" y="16" text-anchor="middle" font-size="12">Error of each variant vs '
            f'PyTorch (dashed: its threshold)</text>']
    for i, ((out, metric), series) in enumerate(panels.items()):
        x0, y0 = i * pw + left, 24 + top
        w, h = pw - left - right, ph - top - bottom
        values = [max(f, FLOOR) for _, q, lim in series for f in map(_number, [*q, lim]) if f is not None]
        lo = math.floor(math.log10(min(values))) if values else -6
        hi = math.ceil(math.log10(max(values))) if values else 0
        hi = hi if hi > lo else lo + 1

        def sx(v: float, lo=lo, hi=hi, x0=x0, w=w) -> float:
            return x0 + (math.log10(max(v, FLOOR)) - lo) / (hi - lo) * w

        def sy(share: float, y0=y0, h=h) -> float:
            return y0 + (1 - share) * h

        body.append(f'<text x="{x0 + w / 2:.1f}" y="{y0 - 8}" text-anchor="middle" font-size="11">'
                    f'{escape(str(out))}</text>')
        body.append(f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#444"/>')
        step = max(1, math.ceil((hi - lo) / 6))
        for e in range(lo, hi + 1, step):
            x = sx(10.0 ** e)
            body.append(f'<line x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y0 + h}" stroke="#ddd"/>')
            body.append(f'<text x="{x:.1f}" y="{y0 + h + 13}" text-anchor="middle" font-size="9">1e{e}</text>')
        for share in (0, 0.25, 0.5, 0.75, 1):
            y = sy(share)
            body.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + w}" y2="{y:.1f}" stroke="#eee"/>')
            body.append(f'<text x="{x0 - 4}" y="{y + 3:.1f}" text-anchor="end" font-size="9">{share:g}</text>')
        body.append(f'<text x="{x0 + w / 2:.1f}" y="{y0 + h + 30}" text-anchor="middle" font-size="10">'
                    f'{escape(AXES[metric][0])}</text>')
        body.append(f'<text transform="translate({x0 - 40},{y0 + h / 2:.1f}) rotate(-90)" text-anchor="middle" '
                    f'font-size="10">share of probe rows ≤ x</text>')
        for j, (variant, q, limit) in enumerate(series):
            color = COLORS[variants.index(variant) % len(COLORS)]  # one colour per variant in every panel
            points, prev = [], None
            for k, raw in enumerate(q):  # a step up at each quantile, as matplotlib's step(where="post")
                v = _number(raw)
                if v is None:  # not a finite number: no point, and the others keep their shares
                    continue
                share = k / max(len(q) - 1, 1)
                if prev is not None:
                    points.append(f"{sx(v):.1f},{sy(prev):.1f}")
                points.append(f"{sx(v):.1f},{sy(share):.1f}")
                prev = share
            if points:
                body.append(f'<polyline points="{" ".join(points)}" fill="none" stroke="{color}" stroke-width="1.5"/>')
            if _finite_positive(limit):
                x = sx(float(limit))
                body.append(f'<line x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y0 + h}" stroke="{color}" '
                            f'stroke-dasharray="4,3"/>')
            ly = y0 + h - 10 - 13 * (len(series) - 1 - j)
            body.append(f'<line x1="{x0 + w - 70}" y1="{ly - 3}" x2="{x0 + w - 56}" y2="{ly - 3}" stroke="{color}" '
                        f'stroke-width="1.5"/><text x="{x0 + w - 52}" y="{ly}" font-size="9">{escape(str(variant))}'
                        f'</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="sans-serif">\n<rect width="100%" height="100%" '
            f'fill="white"/>\n' + "\n".join(body) + "\n</svg>\n")


def _error_plot_png(panels, path: Path) -> bool:
    if not plot_available():
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, ((out, metric), series) in zip(axes[0], panels.items()):
        for variant, q, limit in series:
            share = np.linspace(0, 1, len(q))
            x = np.maximum(np.asarray(q, dtype=float), FLOOR)
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
