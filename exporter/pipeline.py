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

from .bundle import (
    BASE_OUTPUTS_NPZ,
    INPUTS_NPZ,
    OUTPUTS_NPZ,
    PROBES_JSON,
    REFERENCE_DIR,
    check_out,
    write_json,
)
from .errors import (
    MismatchError,
    UserInputError,
    require_full,
)
from .manifest import (
    copy_base_docs,
    decoder_fields,
    encoder_fields,
    finish,
    manifest_head,
    manifest_tail,
)
from .onnx_export import MIN_ORT_FOR_OPSET
from .quantize import quantize_all
from .report import Report
from .spec import ExportSpec, normalize_modes
from .stages import Progress, Stages
from .staging import check_free_space, staged
from .taskeval import PRIMARY_METRIC, TaskEvalSpec, judge, run_engine
from .taskeval import prepare as prepare_eval
from .tokenizer_files import (
    choose_prompts,
    decoder_prompts,
    encoder_probes,
    eos_token_ids,
    save_tokenizer,
)
from .tolerances import required_effect, weak_adapter_warning

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
    if spec.no_tokenizer and task.is_decoder:
        raise UserInputError("--no-tokenizer is for encoder tasks; a text-generation bundle needs its tokenizer")
    if "int4" in modes and "int4" not in task.quantize_modes:
        raise UserInputError("--quantize int4 is for text-generation models; use int8 or fp16 for encoders")
    check_tolerances(task.name, modes, spec.tolerances)
    check_free_space(base, modes, out)
    build = _build_decoder if task.is_decoder else _build

    def hint(report: dict[str, Any]) -> str:
        failed = [v for v, r in report["variants"].items() if not r["passed"]]
        others = [m for m in ("int8", "fp16") if m not in failed]
        return (f"; fp32 passed: export without {', '.join(failed)} (--quantize {others[0] if others else 'none'})"
                if "fp32" not in failed else "")

    return staged(out, spec.overwrite,
                   lambda staging: build(spec, modes, stages, adapter, base, arch, task, staging), hint)


def export_inputs(spec: ExportSpec) -> tuple[Path, ...]:
    """The files and folders an export reads, which OUT must not contain (--overwrite would delete them)."""
    items = [Path(spec.adapter), *(Path(p) for _, p in spec.adapters)]
    if spec.base and not spec.base.startswith("embedded:") and Path(spec.base).exists():
        items.append(Path(spec.base))
    if spec.probe_texts:
        items.append(Path(spec.probe_texts))
    return tuple(items)


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
    check_tolerances(task.name, modes, spec.tolerances)
    check_free_space(base, modes, out)
    return staged(out, spec.overwrite,
                   lambda staging: build_swappable(spec, modes, stages, adapters, base, arch, task, staging))


def _score_variants(staging: Path, artifacts: dict, eval_set, torch_metrics: dict, spec: TaskEvalSpec,
                    results: dict, logits: Callable | None = None) -> dict[str, Any]:
    """Each variant's task metric next to PyTorch's; a drop over the recipe's tolerance fails the variant.

    ``logits(session, feeds)`` runs one eval batch (default: the graph's inputs are the feeds).
    """
    from .runtime import make_session

    logits = logits or (lambda session, feeds: session.run(["logits"], feeds)[0])
    variant_metrics = {}
    for name, art in artifacts.items():
        session = make_session(art.path)
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


def _build(spec, modes, stages: Stages, adapter, base, arch, task, staging: Path) -> dict[str, Any]:
    from .loading import pooling_config
    from .merge import apply_adapter, load_base_model, merge, resolve_labels
    from .onnx_export import example_feeds, export_onnx, make_wrapper, run_torch
    from .parity import OutputInfo, adapter_effect
    from .probes import load_tokenizer, save_arrays, synthetic_probes
    from .tasks import input_names as task_inputs
    from .verify import evaluate_variants

    warnings: list[str] = []
    limits = [spec.max_length, base.config.get("max_position_embeddings", spec.max_length)
              - (2 if base.model_type in ("roberta", "xlm-roberta") else 0)]
    names = task_inputs(arch, base.config.get("type_vocab_size"))
    if spec.no_tokenizer:
        tok = fast_tok = None
        pad_source = texts = None
        max_length = min(limits)
        probes = synthetic_probes(names, max_length, int(base.config.get("vocab_size", 1000)),
                                  int(base.config.get("pad_token_id") or 0))
        warnings.append("exported without a tokenizer (--no-tokenizer): the probes are synthetic token ids and "
                        "`infer` needs token ids from your own tokenizer")
    else:
        tok, pad_source = stages.run("tokenizer", "saving tokenizer", save_tokenizer, base, adapter, staging,
                                     spec.trust_remote_code)
        if 0 < tok.model_max_length < 1_000_000:
            limits.append(tok.model_max_length)
        max_length = min(limits)
        fast_tok = load_tokenizer(staging / "tokenizer.json", max_length, tok.pad_token_id, tok.pad_token)
        probes, texts = encoder_probes(spec, fast_tok, names, max_length, warnings)
    infos = [OutputInfo(o.name, "sequence" in o.axes, o.is_logits) for o in task.outputs]
    output_names = tuple(i.name for i in infos)
    labels = resolve_labels(task, arch, base, adapter, spec.labels)
    pooling = pooling_config(base) if task.name == "feature-extraction" else None

    def build_torch():
        model, info = load_base_model(task, base, labels, spec.trust_remote_code)
        peft_model, w = apply_adapter(model, adapter, base, list(info.get("missing_keys", [])), spec.allow_pickle)
        warnings.extend(w)
        unmerged = make_wrapper(peft_model, task, names, pooling)
        with peft_model.disable_adapter():
            base_out = [run_torch(unmerged, f, output_names) for f in probes.feeds]
        merged = merge(peft_model, base.name)
        return merged, base_out

    merged, base_out = stages.run("merge", "loading base and merging adapter", build_torch)
    wrapper = make_wrapper(merged, task, names, pooling)
    reference = stages.run("reference", "computing PyTorch reference",
                           lambda w: [run_torch(w, f, output_names) for f in probes.feeds], wrapper)
    eval_set = torch_metrics = None
    if spec.task_eval is not None and task.name in PRIMARY_METRIC and fast_tok is not None:
        eval_set = prepare_eval(task.name, spec.task_eval, labels, fast_tok, names)
        torch_metrics = stages.run(
            "task_eval_torch", f"scoring PyTorch on {len(spec.task_eval.rows)} eval rows", run_engine, eval_set,
            lambda f, w=wrapper: run_torch(w, f, output_names)["logits"])
    masks = [f["attention_mask"] for f in probes.feeds]
    effect = adapter_effect(reference, base_out, masks, infos)
    required = required_effect([a for r in reference for a in r.values()])
    weak = weak_adapter_warning(max(effect.values()), required)
    meaningful = weak is None
    warnings += [weak] if weak else []
    fp32 = stages.run("export", "exporting to ONNX (fp32)", export_onnx, wrapper,
                      example_feeds(probes.feeds[-1]), staging / "model.onnx", task, spec.opset)
    merged.config.to_json_file(str(staging / "config.json"))
    num_parameters = sum(p.numel() for p in merged.parameters())
    # Free the torch model before onnxruntime sessions and quantizers load: peak memory is the max, not the sum.
    del merged, wrapper
    gc.collect()
    artifacts = quantize_all(stages, fp32, modes, staging, decoder=False, block_size=spec.int4_block_size,
                             int4_embedding=spec.int4_embedding)

    (staging / REFERENCE_DIR).mkdir()
    write_json(staging / PROBES_JSON, probes.to_json())
    save_arrays(staging / INPUTS_NPZ, list(probes.feeds))
    save_arrays(staging / OUTPUTS_NPZ, reference)
    save_arrays(staging / BASE_OUTPUTS_NPZ, base_out)
    copy_base_docs(base, staging)

    manifest: dict[str, Any] = {
        **manifest_head(spec, task, base, adapter, num_parameters),
        **encoder_fields(task, names, labels, pooling, tok, max_length, pad_source),
        "probes": texts.manifest() if texts else {"source": "synthetic", "count": len(probes.feeds)},
        **manifest_tail(spec, artifacts, task.name, effect, required, meaningful, decoder=False,
                         base_reference=True),
    }
    results = stages.run("verify", "checking parity with onnxruntime",
                         lambda: evaluate_variants(staging, manifest, list(artifacts)))
    task_metrics = None
    if eval_set is not None:
        task_metrics = stages.run("task_eval_onnx", "scoring ONNX variants on the eval rows", _score_variants,
                                  staging, artifacts, eval_set, torch_metrics, spec.task_eval, results)
    return finish(staging, spec, modes, manifest, results, warnings, stages, task, artifacts, task_metrics,
                   adapter)


def _build_decoder(spec, modes, stages: Stages, adapter, base, arch, task, staging: Path) -> dict[str, Any]:
    """The decoder path: KV-cache export, prompt logits and greedy continuations as the reference."""
    import numpy as np

    from .decoder import conv1d_to_linear, decoder_io, export_decoder, make_decoder_wrapper, torch_step
    from .generation import prefill_feeds, run_arrays
    from .merge import apply_adapter, load_base_model, merge
    from .probes import GREEDY_TOKENS, save_arrays
    from .verify import evaluate_variants

    warnings: list[str] = []
    tok, pad_source = stages.run("tokenizer", "saving tokenizer", save_tokenizer, base, adapter, staging,
                                 spec.trust_remote_code)
    positions, max_length, fast_tok, names, prompts, singles = decoder_prompts(spec, base, tok, staging, warnings)

    def build_torch():
        import torch

        model, info = load_base_model(task, base, None, spec.trust_remote_code)
        peft_model, w = apply_adapter(model, adapter, base, list(info.get("missing_keys", [])), spec.allow_pickle)
        warnings.extend(w)
        inner = peft_model.get_base_model()
        with peft_model.disable_adapter(), torch.inference_mode():
            base_logits = [inner(input_ids=torch.from_numpy(f["input_ids"]),
                                 attention_mask=torch.from_numpy(f["attention_mask"])).logits.float().numpy()
                           for f in singles]
        merged = merge(peft_model, base.name)
        conv1d_to_linear(merged)  # GPT-2: Gemm would escape int4; Linear exports as MatMul
        return merged, base_logits

    merged, base_logits = stages.run("merge", "loading base and merging adapter", build_torch)
    dio = decoder_io(merged)
    wrapper = make_decoder_wrapper(merged, dio)
    eval_set = torch_metrics = None
    if spec.task_eval is not None:
        eval_set = prepare_decoder_eval(spec.task_eval, staging / "tokenizer.json", tok)
        step = torch_step(wrapper, dio)
        torch_metrics = stages.run(
            "task_eval_torch", f"scoring PyTorch on {len(spec.task_eval.rows)} eval responses", run_engine, eval_set,
            lambda f: step(prefill_feeds(dio, f["input_ids"], f["attention_mask"]))["logits"])

    chosen, batches, feeds, runs = stages.run("reference", "computing PyTorch reference (greedy generation)",
                                              choose_prompts, torch_step(wrapper, dio), dio, fast_tok, names, prompts,
                                              singles)
    merged_singles = [runs[k].prefill_logits for k in range(len(chosen))]
    effect = {"logits": float(max(np.abs(m - base_logits[i]).max() for m, i in zip(merged_singles, chosen)))}
    required = required_effect(merged_singles)
    weak = weak_adapter_warning(effect["logits"], required)
    meaningful = weak is None
    warnings += [weak] if weak else []
    min_margin = float(min(r.margins.min() for r in runs))
    fp32 = stages.run("export", "exporting to ONNX with KV cache (fp32)", export_decoder, wrapper, dio,
                      staging / "model.onnx", spec.opset)
    merged.config.to_json_file(str(staging / "config.json"))
    num_parameters = sum(p.numel() for p in merged.parameters())
    eos_ids = eos_token_ids(merged.config, tok)
    # Free the torch model before onnxruntime sessions and quantizers load: peak memory is the max, not the sum.
    del merged, wrapper
    gc.collect()
    merged_modules = adapter.changed_modules
    artifacts = quantize_all(stages, fp32, modes, staging, decoder=True, block_size=spec.int4_block_size,
                             int4_embedding=spec.int4_embedding, adapter_modules=merged_modules)

    (staging / REFERENCE_DIR).mkdir()
    write_json(staging / PROBES_JSON, {"texts": list(prompts.texts), "batches": [list(b) for b in batches],
                                       "max_length": max_length, "max_new_tokens": GREEDY_TOKENS,
                                       "min_top2_margin": min_margin, "source": prompts.source})
    save_arrays(staging / INPUTS_NPZ, list(feeds))
    save_arrays(staging / OUTPUTS_NPZ, run_arrays(runs))
    # The base's prompt logits exist for the single-prompt batches (the padded batch has none).
    save_arrays(staging / BASE_OUTPUTS_NPZ, [{"logits": base_logits[i].astype(np.float32)} for i in chosen] + [{}])
    copy_base_docs(base, staging)
    manifest: dict[str, Any] = {
        **manifest_head(spec, task, base, adapter, num_parameters),
        **decoder_fields(dio, tok, max_length, positions, eos_ids, pad_source),
        "probes": prompts.manifest(),
        **manifest_tail(spec, artifacts, task.name, effect, required, meaningful, decoder=True,
                         base_reference=True),
    }
    if "int4" in manifest["variants"]:
        manifest["variants"]["int4"]["modules_8bit"] = list(merged_modules)
    results = stages.run("verify", "checking parity with onnxruntime (logits and greedy tokens)",
                         lambda: evaluate_variants(staging, manifest, list(artifacts)))
    task_metrics = None
    if eval_set is not None:
        def onnx_logits(session, f):
            return session.run(["logits"], prefill_feeds(dio, f["input_ids"], f["attention_mask"]))[0]

        task_metrics = stages.run("task_eval_onnx", "scoring ONNX variants on the eval responses", _score_variants,
                                  staging, artifacts, eval_set, torch_metrics, spec.task_eval, results, onnx_logits)
    return finish(staging, spec, modes, manifest, results, warnings, stages, task, artifacts, task_metrics,
                   adapter)


def prepare_decoder_eval(spec: TaskEvalSpec, tokenizer_file: Path, tok):
    """The recipe's eval rows as fine-tuning saw them (``runtime.chat_prompt``, then the response and EOS),
    tokenized with the bundle's own tokenizer."""
    from tokenizers import Tokenizer

    from .runtime import chat_prompt
    from .taskeval import prepare_decoder

    template = getattr(tok, "chat_template", None)
    return prepare_decoder(spec, Tokenizer.from_file(str(tokenizer_file)),
                           lambda p: chat_prompt(template, p, tok.bos_token or "", tok.eos_token or ""),
                           tok.eos_token or "", spec.max_length)
