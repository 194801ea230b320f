"""``run_pipeline(spec) -> Report``: the stage order, and nothing else.

load → merge → export → quantize → verify → bundle. Everything is written in a staging folder beside OUT;
only a fully verified bundle is renamed into place.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .bundle import check_out
from .errors import (
    MismatchError,
    UserInputError,
    require_full,
)
from .family_base import BuildContext
from .formats import check_session_config
from .manifest import add_ort_format, copy_base_docs, finish, manifest_head, manifest_tail
from .onnx_export import MIN_ORT_FOR_OPSET, graph_path
from .quantize import INT8_WEIGHTS, quantize_all, retry_unsigned_int8
from .report import Report
from .spec import ExportSpec, normalize_modes
from .stages import Progress, Stages
from .staging import check_free_space, staged
from .taskeval import TaskEvalSpec, judge, run_engine
from .tokenizer_files import save_tokenizer
from .tolerances import weak_adapter_warning

log = logging.getLogger(__name__)


def export(adapter: Path | str, out: Path | str, *, progress: Progress | None = None, **options: Any) -> Report:
    """``export-adapter export`` as a call: ``export("adapter/", "bundle/", quantize=("int8",))``. The options
    are ExportSpec's fields; the Report says whether every variant passed (a failed gate raises ParityError)."""
    return run_pipeline(ExportSpec(adapter=Path(adapter), out=Path(out), **options), progress)


def run_pipeline(spec: ExportSpec, progress: Progress | None = None) -> Report:
    require_full("export")
    from .loading import check_architecture, inspect_adapter, resolve_base
    from .tasks import get_arch, get_task

    modes = normalize_modes(spec.quantize)
    if spec.opset not in MIN_ORT_FOR_OPSET:
        raise UserInputError(f"--opset {spec.opset}: not supported; use one of {sorted(MIN_ORT_FOR_OPSET)}")
    out = Path(spec.out)
    check_out(out, spec.overwrite, export_inputs(spec))
    if spec.sign is not None:  # a wrong key fails now, not after the export
        from .signing import load_private_key

        load_private_key(spec.sign)
    stages = Stages(progress)
    if spec.keep_adapters:
        return _run_swappable(spec, modes, stages, out)
    if spec.adapters and len(spec.adapters) > 1:
        raise UserInputError("several --adapter options need --keep-adapters (one graph, swappable adapters); "
                             "a merged export takes one adapter")
    adapter = stages.run("inspect", "inspecting adapter", lambda: inspect_adapter(Path(spec.adapter), spec.allow_pickle))
    base = resolve_base(spec.base, adapter, spec.revision)
    check_architecture(base, spec.trust_remote_code)
    arch = get_arch(base.model_type)
    task = get_task(_choose_task(spec, adapter, base))
    if spec.no_tokenizer and not task.family_spec.tokenizer_optional:
        raise UserInputError("--no-tokenizer is for encoder tasks; a text-generation bundle needs its tokenizer")
    if "int4" in modes and "int4" not in task.quantize_modes:
        raise UserInputError("--quantize int4 is for text-generation models; use int8 or fp16 for encoders")
    check_int8_weights(spec.int8_weights, task.is_decoder)
    check_session_config(dict(spec.session_config))
    check_tolerances(task.name, modes, spec.tolerances)
    check_free_space(base, modes, out)

    def hint(report: dict[str, Any]) -> str:
        failed = [v for v, r in report["variants"].items() if not r["passed"]]
        others = [m for m in ("int8", "fp16") if m not in failed]
        return (f"; fp32 passed: export without {', '.join(failed)} (--quantize {others[0] if others else 'none'})"
                if "fp32" not in failed else "")

    return staged(out, spec.overwrite,
                   lambda staging: _build(BuildContext(spec, modes, stages, base, arch, task, staging, adapter),
                                          staging), hint)


def export_inputs(spec: ExportSpec) -> tuple[Path, ...]:
    """The files and folders an export reads, which OUT must not contain (--overwrite would delete them)."""
    items = [Path(spec.adapter), *(Path(p) for _, p in spec.adapters)]
    if spec.base and not spec.base.startswith("embedded:") and Path(spec.base).exists():
        items.append(Path(spec.base))
    if spec.probe_texts:
        items.append(Path(spec.probe_texts))
    return tuple(items)


def check_int8_weights(int8_weights: str, decoder: bool) -> None:
    if int8_weights not in INT8_WEIGHTS:
        raise UserInputError(f"--int8-weights {int8_weights}: unknown; use one of {', '.join(INT8_WEIGHTS)}")
    if decoder and int8_weights != "auto":
        raise UserInputError("--int8-weights is for encoders: a decoder's int8 is weight-only 8-bit (MatMulNBits); "
                             "drop --int8-weights")


def check_tolerances(task: str, modes: tuple[str, ...], overrides: tuple[tuple[str, float], ...]) -> None:
    from .tolerances import check_overrides

    problem = check_overrides(task, ("fp32", *modes), overrides)
    if problem:
        raise UserInputError(problem)


def _run_swappable(spec: ExportSpec, modes: tuple[str, ...], stages: Stages, out: Path) -> Report:
    """export --keep-adapters: check every adapter fits one base and one task, then build and publish."""
    from .loading import check_architecture, inspect_adapter, public_base_name, resolve_base
    from .swap_build import build_swappable, check_adapter_name
    from .tasks import get_arch, get_task

    if spec.task_eval is not None or spec.include_adapter:
        raise UserInputError("--keep-adapters is an export option: task-level parity and shipping the adapter "
                             "folder (run) apply to merged bundles only")
    if spec.ort_format:
        raise UserInputError("--ort-format is for merged bundles: swappable adapters run through onnxruntime's "
                             "LoRA run options, which its ORT-format builds are not verified with; drop one of them")
    pairs = [(n, Path(p)) for n, p in spec.adapters] or [(Path(spec.adapter).resolve().name, Path(spec.adapter))]
    seen: set[str] = set()
    for name, _ in pairs:
        check_adapter_name(name)
        if name in seen:
            raise UserInputError(f"two adapters are named {name}; name them with --adapter NAME=PATH")
        seen.add(name)
    adapters = [(name, stages.run(f"inspect_{name}", f"inspecting adapter {name}", inspect_adapter, Path(path),
                                  spec.allow_pickle)) for name, path in pairs]
    base = resolve_base(spec.base, adapters[0][1], spec.revision)
    for name, ref in adapters:
        recorded = public_base_name(ref.recorded_base)
        if spec.base is None and recorded and recorded != base.name:
            raise MismatchError(f"adapter {name} was trained for {recorded}, adapter {adapters[0][0]} for {base.name}; "
                                "swappable adapters share one base")
    check_architecture(base, spec.trust_remote_code)
    arch = get_arch(base.model_type)
    tasks = {name: _choose_task(spec, ref, base) for name, ref in adapters}
    if len(set(tasks.values())) > 1:
        raise MismatchError("the adapters are for different tasks (" + ", ".join(f"{n}: {t}" for n, t in tasks.items())
                            + "); one bundle serves one task")
    task = get_task(next(iter(tasks.values())))
    if "int4" in modes and "int4" not in task.quantize_modes:
        raise UserInputError("--quantize int4 is for text-generation models; use int8 or fp16 for encoders")
    check_int8_weights(spec.int8_weights, task.is_decoder)
    check_session_config(dict(spec.session_config))
    check_tolerances(task.name, modes, spec.tolerances)
    check_free_space(base, modes, out)
    return staged(out, spec.overwrite,
                   lambda staging: build_swappable(BuildContext(spec, modes, stages, base, arch, task, staging,
                                                                adapters[0][1]), adapters))


def _score_variants(staging: Path, artifacts: dict, eval_set, torch_metrics: dict, spec: TaskEvalSpec,
                    results: dict, logits: Callable, session_config: dict[str, str]) -> dict[str, Any]:
    """Each variant's task metric next to PyTorch's; a drop over the recipe's tolerance fails the variant.
    ``logits(session, feeds)`` runs one eval batch (the family builder's ``onnx_logits``)."""
    from .runtime import make_session

    variant_metrics = {}
    for name, art in artifacts.items():
        session = make_session(art.path, config=session_config)
        variant_metrics[name] = run_engine(eval_set, lambda f, s=session: logits(s, f))
    judged = judge(eval_set.task, torch_metrics, variant_metrics, spec.max_metric_drop, len(spec.rows))
    for name, v in judged["variants"].items():
        if not v["passed"]:
            results[name]["passed"] = False
            results[name]["failures"].append(
                f"task metric {judged['metric']} {v['value']:.4f} vs PyTorch {judged['torch']:.4f}: drop "
                f"{v['drop']:.4f} > {spec.max_metric_drop}, and it is real: {v['worse']} {judged['units']} got "
                f"worse, {v['better']} better (McNemar p = {v['p_value']:.3g} < {judged['significance']})"
            )
    return judged


def _choose_task(spec: ExportSpec, adapter, base) -> str:
    from .tasks import TASKS, task_from_architectures, task_from_peft

    if spec.task:
        return spec.task
    from_adapter = task_from_peft(adapter.task_type)
    if from_adapter:
        return from_adapter
    from_base = task_from_architectures(list(base.config.get("architectures") or []))
    if from_base:
        return from_base
    raise UserInputError(
        f"cannot tell the task from the adapter (task_type {adapter.task_type}) or the base; pass --task "
        f"({', '.join(sorted(TASKS))})"
    )


def _build(ctx: BuildContext, staging: Path) -> dict[str, Any]:
    """The merged export, for every family: the family's builder says what each step means for its graphs."""
    from .families import builder_for
    from .merge import apply_adapter, load_base_model, merge, resolve_labels
    from .verify import evaluate_variants

    spec, stages, base, task, adapter = ctx.spec, ctx.stages, ctx.base, ctx.task, ctx.adapter
    fam = builder_for(ctx)
    warnings: list[str] = []
    tok = pad_source = None
    if not spec.no_tokenizer:
        tok, pad_source = stages.run("tokenizer", "saving tokenizer", save_tokenizer, base, adapter, staging,
                                     spec.trust_remote_code)
    fam.prepare_probes(ctx, tok, warnings)
    labels = resolve_labels(task, ctx.arch, base, adapter, spec.labels)

    def build_torch():
        model, info = load_base_model(task, base, labels, spec.trust_remote_code)
        peft_model, w = apply_adapter(model, adapter, base, list(info.get("missing_keys", [])), spec.allow_pickle)
        warnings.extend(w)
        base_out = fam.base_outputs(peft_model)
        merged = merge(peft_model, base.name)
        fam.prepare_model(merged)
        return merged, base_out

    merged, base_out = stages.run("merge", "loading base and merging adapter", build_torch)
    eval_set = torch_metrics = None
    if spec.task_eval is not None:
        eval_set = fam.eval_set(ctx, tok, labels)
    if eval_set is not None:
        torch_metrics = stages.run("task_eval_torch", f"scoring PyTorch on {len(spec.task_eval.rows)} eval rows",
                                   run_engine, eval_set, fam.torch_logits(merged))
    reference, base_out = stages.run("reference", "computing PyTorch reference", fam.select, merged, base_out)
    effect = fam.effect(reference, base_out)
    required = fam.required(reference)
    weak = weak_adapter_warning(max(effect.values()), required)
    warnings += [weak] if weak else []
    fp32 = stages.run("export", "exporting to ONNX (fp32)", fam.export, merged, graph_path(staging), spec.opset)
    merged.config.to_json_file(str(staging / "config.json"))
    num_parameters = sum(p.numel() for p in merged.parameters())
    fam.describe(merged, tok)
    # Free the torch model before onnxruntime sessions and quantizers load: peak memory is the max, not the sum.
    del merged
    gc.collect()
    # int4 (decoders only) keeps the modules the adapter changed at 8 bits.
    artifacts = quantize_all(stages, fp32, ctx.modes, staging, decoder=task.is_decoder,
                             block_size=spec.int4_block_size, int4_embedding=spec.int4_embedding,
                             adapter_modules=adapter.changed_modules, int8_weights=spec.int8_weights)
    fam.write_reference(staging, reference, base_out)
    copy_base_docs(base, staging)
    manifest: dict[str, Any] = {
        **manifest_head(spec, task, base, adapter, num_parameters),
        **fam.manifest_fields(labels, tok, pad_source),
        "probes": fam.probes_manifest(),
        **manifest_tail(ctx, artifacts, effect, required, weak is None, base_reference=True),
    }
    if "int4" in manifest["variants"]:
        manifest["variants"]["int4"]["modules_8bit"] = list(adapter.changed_modules)
    add_ort_format(ctx, artifacts, manifest)
    results = stages.run("verify", "checking parity with onnxruntime",
                         lambda: evaluate_variants(staging, manifest, list(artifacts)))
    task_metrics = None
    if eval_set is not None:
        task_metrics = stages.run("task_eval_onnx", "scoring ONNX variants on the eval rows", _score_variants,
                                  staging, artifacts, eval_set, torch_metrics, spec.task_eval, results,
                                  fam.onnx_logits, dict(spec.session_config))

    def rejudge_int8() -> dict[str, Any]:
        add_ort_format(ctx, artifacts, manifest)
        again = evaluate_variants(staging, manifest, ["int8"])
        if eval_set is not None:
            judged = _score_variants(staging, {"int8": artifacts["int8"]}, eval_set, torch_metrics, spec.task_eval,
                                     again, fam.onnx_logits, dict(spec.session_config))
            task_metrics["variants"]["int8"] = judged["variants"]["int8"]
        return again["int8"]

    retried = retry_unsigned_int8(stages, fp32, artifacts, manifest, results, staging, decoder=task.is_decoder,
                                  int8_weights=spec.int8_weights, rejudge=rejudge_int8)
    warnings += [retried] if retried else []
    return finish(ctx, manifest, results, warnings, artifacts, task_metrics)
