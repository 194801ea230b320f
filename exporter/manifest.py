"""Writing a bundle's manifest (build side): the fields every family shares (each family's own are its
builder's, in families.py), the variants' entries, and the last step that hashes the staging folder, writes the
report and signs it.

Reading a manifest is the device side's job (bundle.read_manifest, against schema.py).
"""

from __future__ import annotations

import platform
import shutil
from pathlib import Path
from typing import Any

from . import __version__
from .bundle import (
    BASE_OUTPUTS_NPZ,
    INPUTS_NPZ,
    OUTPUTS_NPZ,
    PROBES_JSON,
    SCHEMA_VERSION,
    file_hashes,
    write_manifest,
)
from .consumers import write_consumer_files
from .cpu import cpu_features
from .family_base import BuildContext
from .fusions import uses_contrib_ops
from .onnx_export import MIN_ORT_FOR_OPSET
from .report import Report, new_report, write_report
from .spec import ExportSpec
from .tasks import TaskSpec


def versions() -> dict[str, str]:
    import numpy
    import onnx
    import onnxruntime
    import peft
    import tokenizers
    import torch
    import transformers

    return {
        "export_adapter": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__, "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__, "tokenizers": tokenizers.__version__, "numpy": numpy.__version__,
    }


def manifest_head(spec: ExportSpec, task, base, adapter, num_parameters: int) -> dict[str, Any]:
    """The manifest fields every family shares, first."""
    return {
        "schema_version": SCHEMA_VERSION,
        "created_by": f"export-adapter {__version__}",
        "task": task.name,
        "base": {"name": base.name, "revision": base.revision, "model_type": base.model_type},
        "adapter": adapter.summary(),
        "num_parameters": num_parameters,
        "opset": spec.opset,
        "min_onnxruntime": MIN_ORT_FOR_OPSET[spec.opset],
        "session": {"config": dict(spec.session_config)},
    }


def manifest_tail(ctx: BuildContext, artifacts: dict, effect: dict, required: float, meaningful: bool,
                  base_reference: bool = False) -> dict[str, Any]:
    """The manifest fields every family shares, last: reference files (``base_reference``: the base model's
    outputs too), variants and their gates."""
    return {
        "reference": {"probes": PROBES_JSON, "inputs": INPUTS_NPZ, "outputs": OUTPUTS_NPZ,
                      **({"base_outputs": BASE_OUTPUTS_NPZ} if base_reference else {})},
        "variants": variant_entries(artifacts, ctx.task, ctx.spec, ctx.staging),
        "onnxruntime_fusions": uses_contrib_ops(artifacts["fp32"].path),
        "adapter_effect": {"max_abs_diff": effect, "required_min": required, "meaningful": meaningful},
        "spec": ctx.spec.recorded(),
        "versions": versions(),
        # The CPU the export's parity ran on (verify reports the device's beside it).
        "verified_on": {"cpu": cpu_features()},
    }


def variant_entries(artifacts: dict, task: TaskSpec, spec: ExportSpec, staging: Path) -> dict[str, Any]:
    """The manifest's variants: files, what each holds, and the gate verify must re-apply (the defaults with
    the user's --tolerance overrides, which are recorded beside them)."""
    from .quantize import variant_dtype
    from .tolerances import effective_gate

    def rel(path: Path) -> str:
        return path.relative_to(staging).as_posix()

    entries = {}
    for name, a in artifacts.items():
        thresholds, overridden = effective_gate(task.name, name, spec.tolerances)
        entries[name] = {"file": rel(a.path), "data_files": [rel(d) for d in a.data_files],
                         "dtype": variant_dtype(name, decoder=task.is_decoder, block_size=spec.int4_block_size,
                                                int4_embedding=spec.int4_embedding, int8_weights=spec.int8_weights),
                         "thresholds": thresholds, **({"user_tolerances": overridden} if overridden else {})}
    return entries


def add_ort_format(ctx: BuildContext, artifacts: dict, manifest: dict[str, Any]) -> None:
    """--ort-format: the .ort file of every variant into its manifest entry, and the operator config."""
    if not ctx.spec.ort_format:
        return
    from .ort_format import to_ort_format

    files, config = ctx.stages.run("ort_format", "converting every variant to ORT format", to_ort_format, artifacts,
                                   ctx.staging)
    for name, path in files.items():
        manifest["variants"][name]["ort_file"] = path.relative_to(ctx.staging).as_posix()
    manifest["ort_format"] = {"optimization_style": "runtime",
                              "operators_config": config.relative_to(ctx.staging).as_posix()}


def copy_base_docs(base, staging: Path) -> None:
    """The base's LICENSE/README travel with the bundle (its terms apply to the weights)."""
    if not base.is_local:
        return
    root = Path(base.location)
    for f in [p for p in (root / n for n in ("LICENSE", "LICENSE.txt", "LICENSE.md", "README.md")) if p.is_file()]:
        (staging / "base_model").mkdir(exist_ok=True)
        shutil.copyfile(f, staging / "base_model" / f.name)


def finish(ctx: BuildContext, manifest: dict[str, Any], results: dict, warnings: list[str], artifacts: dict,
           task_metrics: dict | None, extra: dict[str, Any] | None = None) -> Report:
    """Verdicts into the manifest, the Report into parity.json/parity.md, hashes last."""
    spec, staging = ctx.spec, ctx.staging
    for name, r in results.items():
        manifest["variants"][name]["passed"] = r["passed"]
    passing_quantized = [m for m in ctx.modes if results[m]["passed"]]
    manifest["default_variant"] = passing_quantized[0] if passing_quantized else "fp32"
    report = new_report("export", manifest, results, Path(spec.out).name,  # the folder name: no machine path
                        warnings=warnings, timings=ctx.stages.timings, task_metrics=task_metrics,
                        training=spec.training,
                        sizes={name: sum(f.stat().st_size for f in [a.path, *a.data_files])
                               for name, a in artifacts.items()},
                        **(extra or {}))
    manifest["task_metrics"] = task_metrics
    if spec.recipe_yaml:
        (staging / "recipe.yaml").write_text(spec.recipe_yaml, encoding="utf-8")
    if spec.include_adapter:
        shutil.copytree(ctx.adapter.path, staging / "adapter")
    write_consumer_files(staging, manifest)
    write_report(staging, report)
    manifest["files"] = file_hashes(staging)
    write_manifest(staging, manifest)
    if spec.sign is not None:
        from .signing import sign_bundle

        report["signed_by"] = sign_bundle(staging, spec.sign)
    return report
