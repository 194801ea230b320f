"""The human-readable parity report (parity.md), rendered from the same Report that parity.json holds."""

from __future__ import annotations

from typing import Any


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-3 or abs(v) >= 1e4 else f"{v:.6f}".rstrip("0").rstrip(".")
    return "-" if v is None else str(v)


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
        "| variant | output | verdict | max abs diff | mean abs diff | min cosine | argmax agreement | thresholds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["variants"].items():
        th = ", ".join(f"{k}={_fmt(v)}" for k, v in r["thresholds"].items())
        if not r["outputs"]:
            lines.append(f"| {name} | - | {'pass' if r['passed'] else 'FAIL'} | - | - | - | - | {th} |")
        for out, m in r["outputs"].items():
            agree = m.get("argmax_agreement_clear", m.get("argmax_agreement"))
            lines.append(
                f"| {name} | {out} | {'pass' if r['passed'] else 'FAIL'} | {_fmt(m['max_abs_diff'])} | "
                f"{_fmt(m['mean_abs_diff'])} | {_fmt(m['cosine_min'])} | {_fmt(agree)} | {th} |"
            )
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
        lines += ["", f"## Task metric on {tm['n_examples']} eval examples ({tm['metric']}, max drop {tm['max_drop']})",
                  "", "| engine | value | drop | verdict |", "|---|---|---|---|",
                  f"| PyTorch | {_fmt(tm['torch'])} | - | reference |"]
        lines += [f"| {v} | {_fmt(m['value'])} | {_fmt(m['drop'])} | {'pass' if m['passed'] else 'FAIL'} |"
                  for v, m in tm["variants"].items()]
    failures = [f"- {v}: {f}" for v, r in report["variants"].items() for f in r["failures"]]
    if failures:
        lines += ["", "## Failures", ""] + failures
    if report.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report["warnings"]]
    return "\n".join(lines) + "\n"
