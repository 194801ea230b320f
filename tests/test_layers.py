"""Issue 13: the package's layers follow its install profiles, and imports point one way only.

Every import of every module is read from its syntax tree, those inside functions included (Python itself
would not notice a circle there until the function runs).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from exporter.layers import LAYERS, ORDER, layer_of

PACKAGE = Path(__file__).resolve().parents[1] / "exporter"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py"))
# What a device may import besides the standard library: the device profile's dependencies and the optional
# extras a device may add (sign, plot, and jinja2 for generate --chat).
DEVICE_THIRD_PARTY = {"onnxruntime", "tokenizers", "numpy", "click", "cryptography", "matplotlib", "jinja2"}


def imports(module: str, source: str | None = None) -> list[tuple[int, str, str | None]]:
    """(line, imported package module or "!" + third-party top-level name, imported name or None)."""
    tree = ast.parse(source if source is not None else (PACKAGE / f"{module}.py").read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module is None:  # from . import x
                found += [(node.lineno, "__init__", a.name) for a in node.names]
            elif node.level == 1:
                found += [(node.lineno, node.module.split(".")[0], a.name) for a in node.names]
            elif node.module and node.module.split(".")[0] == "exporter":
                target = node.module.split(".")[1] if "." in node.module else "__init__"
                found += [(node.lineno, target, a.name) for a in node.names]
            elif node.level == 0 and node.module:
                found.append((node.lineno, "!" + node.module.split(".")[0], None))
        elif isinstance(node, ast.Import):
            for a in node.names:
                top = a.name.split(".")[0]
                if top == "exporter":
                    found.append((node.lineno, a.name.split(".")[1] if "." in a.name else "__init__", None))
                else:
                    found.append((node.lineno, "!" + top, None))
    return found


def test_every_module_is_in_exactly_one_layer():
    listed = [m for modules in LAYERS.values() for m in modules]
    assert sorted(listed) == sorted(set(listed)), "a module is listed twice in exporter/layers.py"
    assert sorted(listed) == MODULES, (set(MODULES) - set(listed), set(listed) - set(MODULES))
    assert tuple(LAYERS) == ORDER


@pytest.mark.parametrize("module", MODULES)
def test_imports_point_down_the_layers_and_never_at_private_names(module):
    rank = ORDER.index(layer_of(module))
    for line, target, name in imports(module):
        if target.startswith("!"):
            continue
        where = f"exporter/{module}.py:{line}"
        assert ORDER.index(layer_of(target)) <= rank, (
            f"{where}: {layer_of(module)} module imports exporter.{target} ({layer_of(target)})")
        if name and target != module:
            private = name.startswith("_") and not (name.startswith("__") and name.endswith("__"))
            assert not private, f"{where}: imports {name} from exporter.{target}, a private name"


@pytest.mark.parametrize("module", LAYERS["device"])
def test_device_modules_import_only_what_the_device_profile_has(module):
    stdlib = set(sys.stdlib_module_names)
    for line, target, _ in imports(module):
        if target.startswith("!"):
            top = target[1:]
            assert top in stdlib or top in DEVICE_THIRD_PARTY or top == "__future__", (
                f"exporter/{module}.py:{line}: a device module imports {top}, which the device profile lacks")


def test_the_parser_sees_imports_inside_functions_and_private_names():
    source = "import json\n\ndef f():\n    from .finetune import _helper\n    import torch.nn\n"
    assert imports("x", source) == [(1, "!json", None), (4, "finetune", "_helper"), (5, "!torch", None)]


def test_no_import_cycles_between_modules():
    graph = {m: {t for _, t, _ in imports(m) if not t.startswith("!") and t != m} for m in MODULES}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(t):], t]))
            if t not in state:
                visit(t, [*path, t])
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m, [m])


def test_every_family_has_a_runner_and_a_builder():
    """A family's two halves are joined by its name: the device runner and the build-side builder."""
    from exporter.families import BUILDERS
    from exporter.runners import RUNNERS
    from exporter.tasks import FAMILIES, TASKS

    assert set(FAMILIES) == set(RUNNERS) == set(BUILDERS)
    for name in FAMILIES:
        assert RUNNERS[name].family == BUILDERS[name].family == name
    assert {t.family for t in TASKS.values()} <= set(FAMILIES)
