"""The human-readable parity report (parity.md), rendered from the same Report that parity.json holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-3 or abs(v) >= 1e4 else f"{v:.6f}".rstrip("0").rstrip(".")
    return "-" if v is None else str(v)


def new_report(command: str, manifest: dict[str, Any], variants: dict[str, Any], bundle: str, *,
               passed: bool | None = None, problems: list[str] | None = None, warnings: list[str] | None = None,
               **fields: Any) -> Report:
    """The one report shape export, run, add-adapter and verify return (REPORT_SCHEMA): what the manifest says
    of the bundle, each variant's result, and the command's own ``fields``."""
    from . import __version__

    problems = list(problems or [])
    return Report({
        "schema_version": manifest["schema_version"],
        "command": command,
        "tool_version": __version__,
        "passed": (not problems and all(r["passed"] for r in variants.values())) if passed is None else passed,
        "bundle": bundle,
        "task": manifest["task"],
        "base": manifest["base"],
        "adapter": manifest["adapter"],
        "labels": manifest.get("labels"),
        "integrity": {"passed": not problems, "problems": problems},
        "variants": variants,
        "adapter_effect": manifest.get("adapter_effect"),
        "warnings": list(warnings or []),
        **fields,
    })


def write_report(root: Path, report: dict[str, Any]) -> None:
    """parity.json, parity.md and the error plot (SVG) beside them."""
    from .bundle import PARITY_JSON, PARITY_MD, write_json
    from .plot import PLOT_FILE, write_error_plot

    report.pop("plot", None)
    # A bundle from before the SVG plot (add-adapter rewrites its report): its PNG would otherwise stay, hashed.
    (root / "report" / "errors.png").unlink(missing_ok=True)
    if write_error_plot(report, root / PLOT_FILE):
        report["plot"] = PLOT_FILE
    write_json(root / PARITY_JSON, report)
    (root / PARITY_MD).write_text(render_markdown(report), encoding="utf-8")


def render_markdown(report: dict[str, Any]) -> str:
    verdict = "PASSED" if report["passed"] else "FAILED"
    a = report.get("adapter") or {}
    lines = [
        f"# Parity report: {verdict}",
        "",
        f"- task: {report['task']}",
        f"- base: {report['base']['name']}",
    ]
    if a:
        lines.append(f"- adapter: {a.get('name')} ({a.get('peft_type')}, r={a.get('rank')}, alpha={a.get('alpha')}, "
                     f"targets {', '.join(a.get('target_modules') or [])})")
    for name, s in (report.get("adapters") or {}).items():
        rank = s["rank"] if s["rank"] is not None else "/".join(map(str, s["ranks"]))
        lines.append(f"- swappable adapter {name}: rank {rank}, {s['target_modules']} LoRA modules"
                     + (f", replaces {', '.join(s['full_parameters'])}" if s["full_parameters"] else ""))
    if report.get("labels"):
        lines.append(f"- labels: {', '.join(report['labels'])}")
    effect = report.get("adapter_effect")
    if effect:
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in effect["max_abs_diff"].items())
        lines.append(f"- adapter effect (max |merged - base|): {shown} (needs >= {_fmt(effect['required_min'])})")
    integrity = report.get("integrity") or {}
    if integrity.get("problems"):
        lines += ["", "## Integrity problems", ""] + [f"- {p}" for p in integrity["problems"]]
    lines += [
        "",
        "## Variants" + (" (the base, no adapter active)" if report.get("adapters") else ""),
        "",
        "Each gated metric with its threshold in brackets; ✗ marks a miss. Thresholds you set with `--tolerance` "
        "are marked *(yours; default D)*.",
        "",
        "| variant | output | verdict | gated metrics | also measured |",
        "|---|---|---|---|---|",
    ]
    for name, r in report["variants"].items():
        verdict = "pass" if r["passed"] else "FAIL"
        if not r["outputs"]:
            lines.append(f"| {name} | - | {verdict} | - | - |")
        for out, m in r["outputs"].items():
            gated, other = gate_cells(m, r["thresholds"], r.get("user_tolerances") or {})
            cells = [_cell("; ".join(gated) or "-"), _cell("; ".join(other))]
            lines.append(f"| {name} | {out} | {verdict} | {cells[0]} | {cells[1]} |")
    chosen = {v: r["user_tolerances"] for v, r in report["variants"].items() if r.get("user_tolerances")}
    if chosen:
        lines += ["", "## Thresholds set by the user (export --tolerance)", ""]
        lines += [f"- {v}: {k} = {_fmt(t['value'])} (default {_fmt(t['default'])})"
                  for v, items in chosen.items() for k, t in items.items()]
    if report.get("plot"):
        lines += ["", "## Error distribution", "", f"![per-row error of each variant]({report['plot']})"]
    worst = worst_lines(report)
    if worst:
        lines += ["", "## Worst probes", "", "Per variant and metric, the probe where the variant is furthest from "
                  "PyTorch (class probabilities, or the first values of the output).", ""] + worst
    swap = [(v, r) for v, r in report["variants"].items() if r.get("adapters")]
    if swap:
        lines += ["", "## Swappable adapters (each active vs its merged PyTorch model)", "",
                  "| variant | adapter | output | verdict | max abs diff | min cosine | argmax agreement |",
                  "|---|---|---|---|---|---|---|"]
        for v, r in swap:
            for name, ar in r["adapters"].items():
                for out, m in ar["outputs"].items() or [("-", {})]:
                    agree = m.get("argmax_agreement_clear", m.get("argmax_agreement"))
                    lines.append(f"| {v} | {name} | {out} | {'pass' if ar['passed'] else 'FAIL'} | "
                                 f"{_fmt(m.get('max_abs_diff'))} | {_fmt(m.get('cosine_min'))} | {_fmt(agree)} |")
            sw = r.get("switching")
            if sw:
                lines.append(f"| {v} | switching ({sw['configurations']} configurations, re-run) | all | "
                             f"{'pass' if sw['passed'] else 'FAIL'} | {_fmt(sw['max_abs_diff'])} | - | - |")
    tm = report.get("task_metrics")
    if tm:
        units = tm.get("units", "examples")
        lines += ["", f"## Task metric on {tm['n_examples']} eval examples ({tm['metric']}, max drop {tm['max_drop']})",
                  "", f"A variant fails only when the drop is over the maximum *and* real: more {units} got worse "
                  f"than better, exact one-sided McNemar p < {tm.get('significance', 0.05)}.", "",
                  f"| engine | value | drop | {units} worse | {units} better | p | verdict |",
                  "|---|---|---|---|---|---|---|",
                  f"| PyTorch | {_fmt(tm['torch'])} | - | - | - | - | reference |"]
        lines += [f"| {v} | {_fmt(m['value'])} | {_fmt(m['drop'])} | {_fmt(m.get('worse'))} | "
                  f"{_fmt(m.get('better'))} | {_fmt(m.get('p_value'))} | {'pass' if m['passed'] else 'FAIL'} |"
                  for v, m in tm["variants"].items()]
    failures = [f"- {v}: {f}" for v, r in report["variants"].items() for f in r["failures"]]
    if failures:
        lines += ["", "## Failures", ""] + failures
    if report.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report["warnings"]]
    return "\n".join(lines) + "\n"


# metric in parity's output, the threshold that gates it, the words shown, and whether lower is better.
GATED = (
    ("n_over_tolerance", "atol", "values over atol + rtol*|torch|", True),
    ("prob_max_abs_diff", "max_prob_diff", "max |Δp|", True),
    ("mean_kl", "max_mean_kl", "mean KL", True),
    ("argmax_agreement_clear", "argmax_agreement", "argmax agreement (clear margin)", False),
    ("cosine_min_gated", "min_cosine", "min cosine (rows not near zero)", False),
    ("cosine_min", "min_cosine", "min cosine", False),
    ("neighbour_agreement_clear", "min_neighbour_agreement", "nearest-neighbour agreement", False),
    ("rank_correlation", "min_rank_correlation", "similarity rank correlation", False),
    ("greedy_exact", "greedy_exact", "greedy identical", False),
    ("prefix_match_mean", "min_prefix_match", "greedy matching prefix", False),
    ("adapter_kept", "min_adapter_kept", "adapter kept", False),
)
# worst-probe metric -> the threshold that makes it worth showing (max_abs_diff is always shown)
WORST_GATE = {"prob_max_abs_diff": "max_prob_diff", "max_kl": "max_mean_kl", "cosine_min": "min_cosine",
              "cosine_min_gated": "min_cosine", "argmax_agreement_clear": "argmax_agreement"}
REPORTED = (("max_abs_diff", "max abs diff"), ("mean_abs_diff", "mean abs diff"), ("cosine_min", "min cosine"),
            ("argmax_agreement", "argmax agreement (all rows)"), ("prob_max_abs_diff", "max |Δp|"),
            ("mean_kl", "mean KL"), ("neighbour_agreement", "nearest-neighbour agreement (all)"))


def gate_cells(m: dict[str, Any], thresholds: dict[str, Any], user: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The gated metrics with their thresholds, and the other measured ones, as short cells."""
    gated, used = [], set()
    for metric, key, words, lower in GATED:
        if metric not in m or key not in thresholds or key in used:
            continue
        if metric == "cosine_min" and "cosine_min_gated" in m:
            continue
        used.add(key)
        limit = m["atol_effective"] if key == "atol" else thresholds[key]
        value = m[metric]
        ok = value <= (0 if key == "atol" else limit) if lower else value >= limit
        bound = (f"≤ {_fmt(limit)}" if lower else f"≥ {_fmt(limit)}") if key != "atol" else f"0 at atol {_fmt(limit)}"
        mine = f" *(yours; default {_fmt(user[key]['default'])})*" if key in user else ""
        gated.append(f"{words} {_fmt(value)} [{bound}{mine}]{'' if ok else ' ✗'}")
    shown = {metric for metric, key, *_ in GATED if key in used}
    other = [f"{words} {_fmt(m[k])}" for k, words in REPORTED if k in m and k not in shown]
    return gated, other


def _cell(text: str) -> str:
    """A table cell: a literal | would end it."""
    return text.replace("|", "\\|")


def _values(xs: list[float] | None) -> str:
    return "[" + ", ".join(f"{x:.3f}" for x in xs) + "]" if xs else "-"


def worst_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for v, r in report["variants"].items():
        for out, m in r["outputs"].items():
            for metric, w in (m.get("worst") or {}).items():
                if metric != "max_abs_diff" and WORST_GATE.get(metric) not in r["thresholds"]:
                    continue  # only what a gate reads (fp32: elementwise, so its largest difference)
                if metric == "cosine_min" and "cosine_min_gated" in m.get("worst", {}):
                    continue
                text = w.get("text")
                where = f"batch {w['batch']}, example {w['example']}" + (f", token {w['token']}" if w["token"] >= 0 else "")
                text = None if text is None else " ".join(str(text).split())  # one line in the list
                quoted = "" if text is None else ' "' + (text if len(text) <= 90 else text[:87] + "...") + '"'
                line = f"- {v} / {out} / {metric} = {_fmt(w['value'])}: {where}{quoted}: torch {_values(w['torch'])}, " \
                       f"onnx {_values(w['onnx'])}"
                if "torch_top" in w:
                    line += f"; top-3 token ids torch {w['torch_top']}, onnx {w['onnx_top']}"
                lines.append(line)
    return lines


class Report(dict):
    """What export, run, add-adapter and verify return: the report JSON (parity.json, ``--json``) as a dict,
    valid against REPORT_SCHEMA (exporter/schema.py), with ``passed`` as an attribute."""

    @property
    def data(self) -> dict[str, Any]:
        return self

    @property
    def passed(self) -> bool:
        return bool(self["passed"])

    def __repr__(self) -> str:  # the whole report is pages of numbers
        return f"Report(command={self.get('command')!r}, passed={self.get('passed')!r})"
