"""Write the generated parts of docs/ from the code: CLI help, JSON Schemas, gates, layers (and README Layout).

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


LAYER_PROFILES = {
    "device": "pip install export-adapter (no torch): read, verify and run bundles",
    "build": "the full extra: load, merge, export, quantize, write bundles",
    "train": "the full extra: recipes and fine-tuning",
    "cli": "the click layer over all of them",
}
LAYOUT_BEGIN = "<!-- layout: generated from exporter/layers.py by docs/generate.py -->"
LAYOUT_END = "<!-- layout: end -->"


def _first_line(module: str) -> str:
    import ast

    doc = ast.get_docstring(ast.parse((DOCS.parent / "exporter" / f"{module}.py").read_text())) or ""
    return " ".join(doc.split("\n\n")[0].split())


def render_layers() -> str:
    """docs/layers.md: every module, its layer and what it is for (its docstring's first paragraph)."""
    from exporter.layers import LAYERS

    parts = ["# Layers", "", "Generated from `exporter/layers.py` and the modules' docstrings by `python docs/generate.py`;",
             "do not edit by hand. A module imports only from its own layer or an earlier one in this page",
             "(`tests/test_layers.py` reads every import, those inside functions included).", ""]
    for layer, modules in LAYERS.items():
        parts += [f"## {layer}: {LAYER_PROFILES[layer]}", "", "| module | what it is for |", "|---|---|"]
        parts += [f"| `{m}.py` | {_first_line(m).replace('|', '/')} |" for m in modules]
        parts.append("")
    return "\n".join(parts)


def render_readme_layout() -> str:
    """README.md with its Layout block redrawn from exporter/layers.py."""
    import textwrap

    from exporter.layers import LAYERS

    readme = (DOCS.parent / "README.md").read_text()
    head, rest = readme.split(LAYOUT_BEGIN, 1)
    _, tail = rest.split(LAYOUT_END, 1)
    lines = ["```text"]
    for i, (layer, modules) in enumerate(reversed(list(LAYERS.items()))):
        if i:
            lines.append("   │ imports only ↓")
        lines.append(f"{layer:<7}{LAYER_PROFILES[layer]}")
        lines += textwrap.wrap(" ".join(modules), 100, initial_indent="       ", subsequent_indent="       ")
    lines.append("```")
    block = "\n".join(lines)
    return f"{head}{LAYOUT_BEGIN}\n{block}\n{LAYOUT_END}{tail}"


def rendered() -> dict[str, str]:
    from exporter.schema import MANIFEST_SCHEMA, REPORT_SCHEMA

    return {
        "cli.md": render_cli(),
        "gates.md": render_gates(),
        "manifest.schema.json": json.dumps(MANIFEST_SCHEMA, indent=2) + "\n",
        "report.schema.json": json.dumps(REPORT_SCHEMA, indent=2) + "\n",
        "layers.md": render_layers(),
        "../README.md": render_readme_layout(),
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
