"""Write the generated parts of docs/ from the code: CLI help and JSON Schemas.

    python docs/generate.py          # rewrite them
    python docs/generate.py --check  # exit 1 if any is stale (tests/test_docs.py does the same)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DOCS = Path(__file__).parent


def render_cli() -> str:
    from click.testing import CliRunner

    from exporter.cli import cli

    parts = ["# Command-line reference", "",
             "Generated from `--help` by `python docs/generate.py`; do not edit by hand.", ""]
    runner = CliRunner()
    for args in ([], ["run"], ["finetune"], ["export"], ["verify"], ["infer"], ["generate"], ["inspect"], ["keygen"], ["recipe"],
                 ["recipe", "check"], ["recipe", "schema"]):
        title = " ".join(["export-adapter", *args])
        out = runner.invoke(cli, [*args, "--help"], prog_name="export-adapter", terminal_width=100).output
        parts += [f"## `{title}`", "", "```text", out.rstrip(), "```", ""]
    return "\n".join(parts)


def render_gates() -> str:
    """Every task's default gate per variant, from exporter/tolerances.py (where each number's provenance is)."""
    from exporter.tolerances import THRESHOLDS, gate_for

    parts = ["# Parity gates (defaults)", "",
             "Generated from `exporter/tolerances.py` by `python docs/generate.py`; do not edit by hand. Each",
             "number's provenance (the measurement that set it) is the comment beside it there;",
             "`python benchmarks/bench_gates.py` re-measures the false rejects and false accepts. A bundle's",
             "manifest holds the gate it was judged by (with any `export --tolerance` override), and `verify`",
             "applies that.", "", "| threshold | meaning |", "|---|---|"]
    parts += [f"| `{name}` | {what} |" for name, (_, what) in THRESHOLDS.items()]
    tasks = {"text-classification / token-classification": "text-classification",
             "feature-extraction": "feature-extraction", "text-generation": "text-generation"}
    for title, task in tasks.items():
        variants = ("fp32", "fp16", "int8", "int4") if task == "text-generation" else ("fp32", "fp16", "int8")
        parts += ["", f"## {title}", "", "| variant | gate |", "|---|---|"]
        for v in variants:
            gate = gate_for(task, v)
            parts.append(f"| {v} | " + ", ".join(f"`{k}` {x:g}" for k, x in gate.items()) + " |")
    return "\n".join(parts) + "\n"


def rendered() -> dict[str, str]:
    from exporter.schema import MANIFEST_SCHEMA, REPORT_SCHEMA

    return {
        "cli.md": render_cli(),
        "gates.md": render_gates(),
        "manifest.schema.json": json.dumps(MANIFEST_SCHEMA, indent=2) + "\n",
        "report.schema.json": json.dumps(REPORT_SCHEMA, indent=2) + "\n",
    }


def main() -> int:
    stale = []
    for name, text in rendered().items():
        path = DOCS / name
        if "--check" in sys.argv:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale: {', '.join(stale)}; run python docs/generate.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
