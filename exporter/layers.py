"""Which layer each module of the package belongs to; the layers follow the install profiles.

- ``device``: what ``pip install export-adapter`` runs on a device (no torch): reading, verifying and running
  bundles, parity, generation, swappable adapters, the schema and the report.
- ``build``: what ``export`` adds with the full extra: loading bases and adapters, merging, ONNX export,
  quantization, probes, manifest writing, staged publishing, the pipeline.
- ``train``: what ``run`` and ``finetune`` add: recipes, fine-tuning, the recipe runner.
- ``cli``: the click layer over all of them.

A module imports only from its own layer or a layer before it in ``ORDER`` (tests/test_layers.py parses every
import, those inside functions included, and also refuses any import of another module's private name). The
README's Layout section and docs/layers.md are generated from this table.
"""

from __future__ import annotations

ORDER = ("device", "build", "train", "cli")

LAYERS: dict[str, tuple[str, ...]] = {
    "device": (
        "__init__", "errors", "formats", "validate", "tolerances", "tasks", "cpu", "interrupts", "probes",
        "parity", "generation", "bundle", "schema", "signing", "swappable", "runtime", "plot", "report",
        "reference", "runners", "verify", "inspection", "bench", "layers",
    ),
    "build": (
        "loading", "embedded", "graph_cache", "merge", "onnx_export", "fusions", "encoder_graph", "decoder",
        "decoder_graph",
        "swap_export", "int8",
        "quantize", "ort_format", "weightonly",
        "datasets", "taskeval", "spec", "stages", "staging", "tokenizer_files", "family_base",
        "family_encoder", "family_decoder", "families", "consumers", "manifest", "pipeline",
        "swap_build", "swap_add",
    ),
    "train": ("recipes", "finetune", "run"),
    "cli": ("cli_device", "cli"),
}


def layer_of(module: str) -> str:
    """The layer of a module of this package (its name without ``exporter.``)."""
    for layer, modules in LAYERS.items():
        if module in modules:
            return layer
    raise KeyError(f"exporter.{module} is in no layer; add it to exporter/layers.py")
