"""JSON Schemas of the bundle manifest and of the Report (parity.json, export --json, verify --json).

docs/manifest.schema.json and docs/report.schema.json are these dicts written out; a test keeps them equal,
and every test bundle's manifest and report are validated against them.
"""

from __future__ import annotations

from typing import Any

from .formats import SCHEMA_VERSION, SESSION_CONFIG_VALUES
from .tasks import TASKS
from .tolerances import THRESHOLDS

_THRESHOLDS = {
    "type": "object",
    "description": "The gate applied to this variant; verify re-applies exactly these numbers (finite, in range).",
    "properties": {name: {"type": "number", "description": f"{what} ({kind})"}
                   for name, (kind, what) in THRESHOLDS.items()},
    "additionalProperties": False,
}

_OUTPUT_METRICS = {
    "type": "object",
    "required": ["finite", "n_values", "max_abs_diff", "mean_abs_diff", "cosine_min", "cosine_mean"],
    "properties": {
        "finite": {"type": "boolean"},
        "n_values": {"type": "integer", "description": "values compared (padded positions excluded)"},
        "max_abs_diff": {"type": ["number", "null"], "description": "null when onnxruntime gave NaN/inf"},
        "mean_abs_diff": {"type": ["number", "null"]},
        "cosine_min": {"type": "number", "description": "lowest per-row cosine (row = example or token)"},
        "cosine_mean": {"type": "number"},
        "n_over_tolerance": {"type": "integer", "description": "fp32: values outside atol + rtol*|torch|"},
        "atol_effective": {"type": "number", "description": "fp32: the absolute tolerance applied"},
        "argmax_agreement": {"type": "number"},
        "min_top2_margin": {"type": "number", "description": "smallest top-2 gap of the PyTorch logits"},
        "clear_margin_abs": {"type": "number", "description": "clear_margin_rel x rms of the reference logits"},
        "n_clear": {"type": "integer", "description": "rows whose top-2 margin is >= clear_margin_abs"},
        "argmax_agreement_clear": {"type": "number"},
        "mean_kl": {"type": "number", "description": "mean KL(softmax torch || softmax onnx) per row"},
        "max_kl": {"type": "number"},
        "prob_max_abs_diff": {"type": "number", "description": "largest change of any class probability"},
        "n_rows": {"type": "integer", "description": "rows compared (examples, or non-padded tokens)"},
        "rms": {"type": "number", "description": "rms of the PyTorch output (scales atol and clear margins)"},
        "n_cosine_rows": {"type": "integer", "description": "rows whose cosine is gated (norm not near zero)"},
        "cosine_min_gated": {"type": "number", "description": "lowest cosine over those rows"},
        "n_texts": {"type": "integer", "description": "embeddings: distinct probe texts compared"},
        "neighbour_agreement": {"type": "number", "description": "share of texts keeping their nearest neighbour"},
        "n_clear_neighbours": {"type": "integer"},
        "neighbour_agreement_clear": {"type": "number", "description": "the same over texts with a clear one"},
        "similarity_max_abs_diff": {"type": "number", "description": "largest change of a pairwise cosine"},
        "rank_correlation": {"type": "number", "description": "Spearman of the pairwise cosine similarities"},
        "distribution": {"type": "object", "required": ["metric", "quantiles"],
                         "description": "quantiles (0 to 100%) of the per-row error, for the report's plot",
                         "properties": {"metric": {"type": "string"},
                                        "quantiles": {"type": "array", "items": {"type": "number"}}}},
        "worst": {"type": "object", "description": "per metric, the probe row with the worst value",
                  "additionalProperties": {
                      "type": "object", "required": ["batch", "example", "token", "value", "torch", "onnx"],
                      "properties": {"batch": {"type": "integer"}, "example": {"type": "integer"},
                                     "token": {"type": "integer", "description": "-1 for per-example outputs"},
                                     "value": {"type": "number"}, "text": {"type": ["string", "null"]},
                                     "torch": {"type": "array", "items": {"type": "number"}},
                                     "onnx": {"type": ["array", "null"], "items": {"type": "number"}},
                                     "torch_top": {"type": "array", "items": {"type": "integer"}},
                                     "onnx_top": {"type": ["array", "null"], "items": {"type": "integer"}}}}},
        "greedy_exact": {"type": "number"},
        "prefix_match_mean": {"type": "number", "description": "departures at PyTorch near-ties count as matched"},
        "tie_divergences": {"type": "integer", "description": "continuations that departed at a PyTorch near-tie"},
    },
}

# A label is printed by infer: no control characters (a "\n" in a label would forge output lines).
_LABEL = {"type": "string", "pattern": "^[^\\x00-\\x1f\\x7f]*$"}

_ADAPTER = {
    "type": "object",
    "required": ["name", "peft_type", "rank", "alpha", "target_modules", "sha256"],
    "properties": {
        "name": {"type": "string"}, "peft_type": {"type": "string"}, "rank": {"type": "integer"},
        "alpha": {"type": "number"}, "use_rslora": {"type": "boolean"}, "use_dora": {"type": "boolean"},
        "target_modules": {"type": "array", "items": {"type": "string"}},
        "modules_to_save": {"type": "array", "items": {"type": "string"}},
        "task_type": {"type": ["string", "null"]}, "recorded_base": {"type": ["string", "null"]},
        "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"}, "num_tensors": {"type": "integer"},
    },
}

_USER_TOLERANCES = {
    "type": "object", "description": "thresholds the user set with export --tolerance: the value used and the default",
    "additionalProperties": {"type": "object", "required": ["value", "default"],
                             "properties": {"value": {"type": "number"}, "default": {"type": "number"}}},
}

_VARIANT_RESULT = {
    "type": "object",
    "required": ["file", "passed", "thresholds", "outputs", "failures"],
    "properties": {
        "file": {"type": "string"},
        "passed": {"type": "boolean"},
        "thresholds": _THRESHOLDS,
        "user_tolerances": _USER_TOLERANCES,
        "outputs": {"type": "object", "additionalProperties": _OUTPUT_METRICS,
                    "description": "per output; with swappable adapters: the base (no adapter active)"},
        "failures": {"type": "array", "items": {"type": "string"},
                     "description": "one line per missed gate, naming the output and the numbers"},
        "ort": {"type": "object", "required": ["file", "passed", "outputs", "failures"],
                "description": "export --ort-format: the variant's .ort file on the same probes and thresholds",
                "properties": {"file": {"type": "string"}, "passed": {"type": "boolean"},
                               "outputs": {"type": "object", "additionalProperties": _OUTPUT_METRICS},
                               "failures": {"type": "array", "items": {"type": "string"}}}},
        "adapters": {"type": "object", "description": "swappable adapters: each one active vs its merged PyTorch model",
                     "additionalProperties": {
                         "type": "object", "required": ["passed", "outputs", "failures"],
                         "properties": {"passed": {"type": "boolean"},
                                        "outputs": {"type": "object", "additionalProperties": _OUTPUT_METRICS},
                                        "failures": {"type": "array", "items": {"type": "string"}}}}},
        "base_not_gated": {"type": "string", "description": "swappable bundles whose base has untrained tensors "
                           "(a random head): why the quantized base missed its gate and was not failed for it"},
        "switching": {"type": "object", "required": ["passed", "max_abs_diff", "configurations", "atol"],
                      "description": "every configuration re-run in one session after the others: outputs unchanged",
                      "properties": {"passed": {"type": "boolean"}, "max_abs_diff": {"type": "number"},
                                     "configurations": {"type": "integer"}, "atol": {"type": "number"}}},
    },
}

_LORA_PARAM = {"type": "object", "required": ["shape", "dtype"],
               "properties": {"shape": {"type": "array", "items": {"type": "integer"}}, "dtype": {"const": "float32"}}}

_ADAPTERS_SECTION = {
    "type": "object",
    "description": "bundles exported with --keep-adapters: the graph's adapter inputs and each adapter's contract",
    "required": ["mode", "graph_sha256", "interface", "items"],
    "properties": {
        "mode": {"const": "swappable"},
        "base_gate": {"enum": ["all", "fp32-only"], "description": "fp32-only when the base has untrained tensors "
                      "(untrained_base_tensors, e.g. a classification head): quantized variants then gate only "
                      "the adapters"},
        "untrained_base_tensors": {"type": "array", "items": {"type": "string"}},
        "switch_atol": {"type": "number", "minimum": 0, "maximum": 1e-3,
                        "description": "switching gate: re-running a configuration after the others may move an "
                        "output by at most this (bundles before it was recorded: the tool's default, 1e-6)"},
        "graph_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$",
                         "description": "sha256 of the fp32 graph; every adapter records the graph it was made for"},
        "interface": {
            "type": "object", "required": ["lora_modules", "full_parameters"],
            "properties": {
                "lora_modules": {"type": "object", "description": "module -> in/out features and its two inputs "
                                 "{module}.lora_A (in x rank) and {module}.lora_B (rank x out, scaling folded in)",
                                 "additionalProperties": {
                                     "type": "object", "required": ["in_features", "out_features", "inputs"],
                                     "properties": {"in_features": {"type": "integer"},
                                                    "out_features": {"type": "integer"},
                                                    "inputs": {"type": "array", "items": {"type": "string"}}}}},
                "full_parameters": {"type": "object", "additionalProperties": _LORA_PARAM,
                                    "description": "whole tensors an adapter may replace (modules_to_save)"},
            },
        },
        "items": {"type": "object", "additionalProperties": {
            "type": "object",
            "required": ["file", "source", "rank", "ranks", "scaling", "target_modules", "parameters",
                         "base_graph_sha256", "labels", "reference"],
            "properties": {
                "file": {"type": "string"}, "source": _ADAPTER,
                "rank": {"type": ["integer", "null"], "description": "null when modules have different ranks"},
                "ranks": {"type": "object", "additionalProperties": {"type": "integer"}},
                "scaling": {"type": "object", "additionalProperties": {"type": "number"},
                            "description": "alpha/r (alpha/sqrt(r) for rsLoRA) folded into lora_B, per module"},
                "target_modules": {"type": "array", "items": {"type": "string"}},
                "full_parameters": {"type": "array", "items": {"type": "string"}},
                "parameters": {"type": "object", "additionalProperties": _LORA_PARAM},
                "base_graph_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                "labels": {"type": ["array", "null"], "items": {"type": "string"}},
                "reference": {"type": "string"},
                "effect": {"type": "object"},
            },
        }},
    },
}

_ADAPTERS_SUMMARY = {"type": "object", "description": "swappable adapters: a summary per adapter (the manifest "
                     "holds the contract)", "additionalProperties": {"type": "object"}}

_BASE = {
    "type": "object",
    "required": ["name", "model_type"],
    "properties": {"name": {"type": "string"}, "revision": {"type": ["string", "null"]},
                   "model_type": {"type": "string"}},
}

_EFFECT = {
    "type": ["object", "null"],
    "required": ["max_abs_diff", "required_min", "meaningful"],
    "properties": {
        "max_abs_diff": {"type": "object", "additionalProperties": {"type": "number"}},
        "required_min": {"type": "number"},
        "meaningful": {"type": "boolean"},
    },
}

_TASK_METRICS = {
    "type": ["object", "null"],
    "description": "run only: the task metric of PyTorch and of each variant on the user's eval data",
    "required": ["metric", "n_examples", "max_drop", "torch", "variants"],
    "properties": {
        "metric": {"enum": ["accuracy", "entity_f1", "token_accuracy"]},
        "n_examples": {"type": "integer"},
        "units": {"type": "string", "description": "what is paired: sentences, words or response tokens"},
        "n_units": {"type": "integer"},
        "max_drop": {"type": "number"},
        "significance": {"type": "number", "description": "a drop over max_drop fails only when McNemar's p is "
                                                           "below this (the drop is real, not noise)"},
        "torch": {"type": "number"},
        "torch_all": {"type": "object"},
        "variants": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["value", "drop", "passed"],
            "properties": {"value": {"type": "number"}, "drop": {"type": "number"}, "passed": {"type": "boolean"},
                           "worse": {"type": "integer", "description": "units PyTorch got right, this variant wrong"},
                           "better": {"type": "integer", "description": "units this variant got right, PyTorch wrong"},
                           "p_value": {"type": "number", "description": "exact one-sided McNemar test"},
                           "all": {"type": "object"}}}},
    },
}

TASK_NAMES = list(TASKS)
VARIANT_NAMES = ["fp32", "int8", "fp16", "int4"]

_CPU = {
    "type": "object", "required": ["machine", "features", "isa"],
    "properties": {"machine": {"type": "string"}, "model": {"type": "string"},
                   "features": {"type": "array", "items": {"type": "string"},
                                "description": "ISA features that select onnxruntime's kernels"},
                   "isa": {"type": "string", "description": "e.g. x86_64 AVX2 (no AVX-512, no VNNI)"}},
}

_PROBES = {
    "type": "object", "required": ["source", "count"],
    "properties": {
        "source": {"enum": ["builtin", "user", "vocabulary", "synthetic"],
                   "description": "built-in English probes, export --probe-texts, texts made from the tokenizer's "
                                  "vocabulary (it maps the built-in ones to <unk>), or token ids (--no-tokenizer)"},
        "count": {"type": "integer"},
        "builtin_unk_share": {"type": "number", "description": "share of <unk> in the built-in probes' tokens"},
    },
}

MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "export-adapter bundle manifest",
    "type": "object",
    "required": ["schema_version", "created_by", "task", "labels", "base", "adapter", "opset", "min_onnxruntime",
                 "inputs", "outputs", "tokenizer", "reference", "variants", "default_variant", "files",
                 "versions", "spec"],
    "properties": {
        "schema_version": {"type": "integer", "minimum": 1, "maximum": SCHEMA_VERSION,
                           "description": f"{SCHEMA_VERSION} for bundles this version writes; older ones still verify"},
        "created_by": {"type": "string"},
        "task": {"enum": TASK_NAMES},
        "labels": {"type": ["array", "null"], "items": _LABEL},
        "base": _BASE,
        "adapter": {"oneOf": [_ADAPTER, {"type": "null"}], "description": "null with --keep-adapters (see adapters)"},
        "adapters": _ADAPTERS_SECTION,
        "num_parameters": {"type": "integer"},
        "opset": {"type": "integer"},
        "min_onnxruntime": {"type": "string"},
        "session": {
            "type": "object", "additionalProperties": False,
            "description": "onnxruntime session options the variants were verified with; infer, generate, verify "
                           "and bench use them (bench --session-config overrides). Only the listed entries.",
            "properties": {"config": {
                "type": "object", "propertyNames": {"enum": list(SESSION_CONFIG_VALUES)},
                "properties": {k: {"enum": list(v)} for k, v in SESSION_CONFIG_VALUES.items()}}}},
        "onnxruntime_fusions": {"type": "boolean",
                                "description": "true when the fp32 graph (and so every variant) uses onnxruntime's fused contrib ops "
                                "(com.microsoft: BiasGelu...): they need onnxruntime"},
        "inputs": {"type": "array", "items": {
            "type": "object", "required": ["name", "dtype", "axes"],
            "properties": {"name": {"type": "string"}, "dtype": {"type": "string"},
                           "axes": {"type": "array", "items": {"type": "string"}}}}},
        "outputs": {"type": "array", "items": {
            "type": "object", "required": ["name", "dtype", "axes", "is_logits"],
            "properties": {"name": {"type": "string"}, "dtype": {"type": "string"},
                           "axes": {"type": "array", "items": {"type": "string"}},
                           "is_logits": {"type": "boolean"}}}},
        "pooling": {"type": ["object", "null"]},
        "family": {"enum": ["decoder"], "description": "present for decoder (text-generation) bundles"},
        "decoder": {"type": "object", "required": ["num_layers", "num_kv_heads", "head_dim", "uses_position_ids"],
                    "properties": {"in_place_cache": {
                        "type": "boolean",
                        "description": "true: the graph's GroupQueryAttention, given the same buffer as "
                                       "past_key_values.{i}.* and present.{i}.*, writes each step into it "
                                       "(past_present_share_buffer; buffers may be longer than attention_mask, "
                                       "which sets the length); fp16 variants excepted"}},
                    "description": "KV-cache layout: past_key_values.{i}.key/value are (batch, num_kv_heads, "
                                   "past_sequence, head_dim)"},
        "generation": {"type": "object", "required": ["eos_token_ids", "context_length"],
                       "description": "what generate needs: EOS ids, context length, the chat template"},
        "tokenizer": {"type": ["object", "null"], "required": ["file", "max_length", "pad_id", "pad_token"],
                      "properties": {"file": {"type": "string"},
                                     "max_length": {"type": "integer", "minimum": 1, "maximum": 1 << 20},
                                     "pad_id": {"type": ["integer", "null"], "minimum": 0, "maximum": 1 << 31},
                                     "pad_token": {"type": ["string", "null"]},
                                     "pad_source": {"enum": ["tokenizer", "eos"],
                                                    "description": "eos: the tokenizer had no pad token, so batches "
                                                                   "are padded with EOS (masked out)"},
                                     "padding_side": {"enum": ["left", "right"]}},
                      "description": "null when exported with --no-tokenizer"},
        "reference": {"type": "object", "required": ["probes", "inputs", "outputs"]},
        "variants": {
            "type": "object",
            "propertyNames": {"enum": VARIANT_NAMES},
            "required": ["fp32"],
            "additionalProperties": {
                "type": "object", "required": ["file", "data_files", "dtype", "thresholds", "passed"],
                "properties": {"file": {"type": "string"}, "data_files": {"type": "array", "items": {"type": "string"}},
                               "ort_file": {"type": "string", "description": "export --ort-format: the variant in "
                                            "ORT format, verified like the .onnx"},
                               "dtype": {"type": "string"}, "thresholds": _THRESHOLDS, "passed": {"type": "boolean"},
                               "user_tolerances": _USER_TOLERANCES,
                               "modules_8bit": {"type": "array", "items": {"type": "string"},
                                                "description": "int4: modules a merged adapter changed, kept at "
                                                               "8 bits"}},
            },
        },
        "default_variant": {"enum": VARIANT_NAMES},
        "ort_format": {"type": "object", "required": ["optimization_style", "operators_config"],
                       "description": "export --ort-format: how the .ort files were made, and the operator config "
                                      "of an onnxruntime minimal build that runs them",
                       "properties": {"optimization_style": {"enum": ["runtime"]},
                                      "operators_config": {"type": "string"}}},
        "adapter_effect": _EFFECT,
        "task_metrics": _TASK_METRICS,
        "spec": {"type": "object", "description": "the effective export settings (no machine paths)"},
        "versions": {"type": "object", "required": ["export_adapter", "torch", "transformers", "peft", "onnx",
                                                    "onnxruntime"],
                     "additionalProperties": {"type": "string"}},
        "files": {"type": "object", "description": "sha256 of every file except manifest.json and its checksum",
                  "additionalProperties": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
        "probes": _PROBES,
        "verified_on": {"type": "object", "properties": {"cpu": _CPU},
                        "description": "the CPU the export's parity ran on"},
    },
}

REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "export-adapter report (parity.json, export --json, verify --json)",
    "type": "object",
    "required": ["schema_version", "command", "passed", "task", "base", "adapter", "integrity", "variants",
                 "warnings"],
    "properties": {
        "schema_version": {"type": "integer", "minimum": 1, "maximum": SCHEMA_VERSION,
                           "description": "the bundle's schema_version"},
        "command": {"enum": ["export", "verify", "add-adapter"]},
        "tool_version": {"type": "string"},
        "passed": {"type": "boolean", "description": "true when integrity and every variant passed"},
        "bundle": {"type": ["string", "null"]},
        "task": {"enum": TASK_NAMES},
        "base": _BASE,
        "adapter": {"oneOf": [_ADAPTER, {"type": "null"}]},
        "adapters": _ADAPTERS_SUMMARY,
        "labels": {"type": ["array", "null"], "items": {"type": "string"}},
        "integrity": {"type": "object", "required": ["passed", "problems"],
                      "properties": {"passed": {"type": "boolean"},
                                     "problems": {"type": "array", "items": {"type": "string"}}}},
        "variants": {"type": "object", "propertyNames": {"enum": VARIANT_NAMES},
                     "additionalProperties": _VARIANT_RESULT},
        "adapter_effect": _EFFECT,
        "warnings": {"type": "array", "items": {"type": "string"}},
        "timings": {"type": "object", "additionalProperties": {"type": "number"},
                    "description": "export only: seconds per stage"},
        "sizes": {"type": "object", "additionalProperties": {"type": "integer"},
                  "description": "export only: bytes per variant (graph + external data)"},
        "task_metrics": _TASK_METRICS,
        "plot": {"type": "string", "description": "the error-distribution plot in the bundle (SVG)"},
        "signature": {"type": "object", "required": ["signed", "checked"],
                      "description": "verify: manifest.json.sig present; checked (and its key id) with --trusted-key",
                      "properties": {"signed": {"type": "boolean"}, "checked": {"type": "boolean"},
                                     "key_id": {"type": "string"}}},
        "signed_by": {"type": "string", "description": "export/add-adapter --sign: the signing key's id"},
        "user_probes": {"type": "object", "required": ["count", "reference", "variants", "file"],
                        "description": "verify --probe-texts: each quantized variant vs the fp32 graph on the "
                                       "user's texts (no PyTorch on the device)",
                        "properties": {"count": {"type": "integer"}, "texts_in_file": {"type": "integer"},
                                       "reference": {"const": "fp32"}, "file": {"type": "string"},
                                       "problems": {"type": "array", "items": {"type": "string"}},
                                       "variants": {"type": "object", "additionalProperties": {
                                           "type": "object", "required": ["passed", "outputs", "failures"],
                                           "properties": {"passed": {"type": "boolean"},
                                                          "outputs": {"type": "object",
                                                                      "additionalProperties": _OUTPUT_METRICS},
                                                          "failures": {"type": "array",
                                                                       "items": {"type": "string"}}}}}}},
        "training": {"type": ["object", "null"], "description": "run only: the fine-tuning summary"},
        "cpu": {**_CPU, "description": "verify only: the CPU this verification ran on"},
        "exported_on": {"oneOf": [_CPU, {"type": "null"}],
                        "description": "verify only: the CPU the export was verified on (from the manifest)"},
    },
}
