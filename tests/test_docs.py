"""The docs are the contract: generated parts must match the code, and real outputs must match the schemas."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jsonschema

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))


def test_generated_docs_are_current():
    import generate

    for name, text in generate.rendered().items():
        assert (ROOT / "docs" / name).read_text() == text, f"docs/{name} is stale: run python docs/generate.py"


def test_manifest_and_reports_match_schemas(factory):
    from exporter.schema import MANIFEST_SCHEMA, REPORT_SCHEMA
    from exporter.verify import verify_bundle

    for arch, task in (("bert", "text-classification"), ("roberta", "token-classification"),
                       ("distilbert", "feature-extraction")):
        out, report = factory.bundle(arch, task)
        jsonschema.validate(json.loads((out / "manifest.json").read_text()), MANIFEST_SCHEMA)
        jsonschema.validate(json.loads((out / "parity.json").read_text()), REPORT_SCHEMA)
        jsonschema.validate(report.data, REPORT_SCHEMA)
        jsonschema.validate(verify_bundle(out), REPORT_SCHEMA)


def test_exit_code_table_matches_cli_constants():
    from exporter import cli

    table = (ROOT / "docs" / "exit-codes.md").read_text()
    codes = {int(c) for c in re.findall(r"^\| (\d+) \|", table, flags=re.M)}
    assert codes == {cli.EXIT_OK, cli.EXIT_ERROR, cli.EXIT_USAGE, cli.EXIT_PARITY, cli.EXIT_SIGINT, cli.EXIT_SIGTERM}


def test_tolerances_in_docs_match_module():
    from exporter import tolerances as t

    doc = (ROOT / "docs" / "bundle.md").read_text()
    assert f"<= max({t.FP32_ATOL:g}, {t.FP32_ATOL_RMS:g} * rms(torch)) + {t.FP32_RTOL:g} * abs(torch)" in doc
    assert f"cosine >= {t.FP16_MIN_COSINE}" in doc and f"`adapter_kept` >= {t.MIN_ADAPTER_KEPT}" in doc
    assert f"margin >= {t.INT8_CLEAR_MARGIN_REL} x rms" in doc and f"fp16: {t.FP16_CLEAR_MARGIN_REL} x rms" in doc
    assert "[gates.md](gates.md)" in doc  # every default, generated from the module


def test_readme_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", readme, flags=re.S).group(1).strip().splitlines()
    assert len(block) == 4, "the README gives: install, the main job, the real decoder job, tests"
    ci = (ROOT / ".ci" / "run").read_text()
    install, *jobs, tests = block
    assert install.replace("pip install -c", "pip install -q -c").replace(
        "pip install --no-deps", "pip install -q --no-deps") in ci
    for job in jobs:
        assert job in ci, job
    assert tests in ci


def test_readme_api_block_uses_only_the_public_api():
    """The README's Python example imports only names exporter.__all__ promises, and calls them by it."""
    import ast

    import exporter

    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    tree = ast.parse(block)
    imported = [(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names]
    assert imported and all(module == "exporter" for module, _ in imported), imported
    assert {name for _, name in imported} <= set(exporter.__all__)
