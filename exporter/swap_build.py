"""``export --keep-adapters``: bundles whose LoRA adapters stay swappable at run time (``swap_add.py`` adds one
to a published bundle with the pieces defined here).

Export builds one base graph with LoRA inputs (``swap_export``), converts every adapter into an
``adapters/NAME.onnx_adapter`` file, and stores, beside the base's PyTorch reference, each adapter's own
reference: the PyTorch model with that adapter *merged* (computed independently of the conversion, so parity
proves the conversion too).
"""

from __future__ import annotations

import gc
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import file_hashes
from .errors import (
    MismatchError,
    UnsupportedError,
    UserInputError,
)
from .families import Builder
from .family_base import BuildContext
from .report import Report
from .swappable import (
    ADAPTER_REFERENCE_DIR,
    ADAPTER_SUFFIX,
    ADAPTERS_DIR,
    Interface,
    adapters_summary,
    contract_entry,
    write_adapter_file,
)
from .tolerances import SWITCH_ATOL, weak_adapter_warning

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_adapter_name(name: str) -> str:
    if not _NAME.fullmatch(name) or name.endswith(ADAPTER_SUFFIX):
        raise UserInputError(f"adapter name {name!r}: use letters, digits, '.', '_' or '-' (up to 64, starting with a "
                             "letter or digit); name it with --adapter NAME=PATH")
    return name


def parse_adapter_arg(value: str) -> tuple[str, Path]:
    """``NAME=PATH`` or ``PATH`` (the name is then the folder's name)."""
    name, sep, path = value.partition("=")
    if sep and name and not Path(value).exists():
        return check_adapter_name(name), Path(path)
    p = Path(value)
    return check_adapter_name(p.resolve().name), p


def set_parameters(model, values: dict[str, np.ndarray]) -> None:
    """Copy the given values into the model's parameters of the same name and shape (others are skipped)."""
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in values.items():
            if name in params and tuple(params[name].shape) == tuple(value.shape):
                params[name].copy_(torch.from_numpy(np.array(value)))


@dataclass
class Prepared:
    name: str
    ref: Any  # AdapterRef
    tensors: dict[str, np.ndarray]
    scaling: dict[str, float]
    lora_modules: dict[str, tuple[int, int]]
    full_shapes: dict[str, tuple[int, ...]]
    labels: tuple[str, ...] | None
    reference: list[dict[str, np.ndarray]]
    effect: dict[str, float]


def prepare_adapter(name: str, ref, fam: Builder, base, labels, base_reference: list[dict],
                    full_defaults: dict[str, Any], warnings: list[str], *, allow_pickle: bool,
                    trust_remote_code: bool) -> Prepared:
    """One adapter: its graph tensors (from peft) and its reference (the PyTorch model with it merged)."""

    from .loading import load_adapter_tensors
    from .merge import adapter_vocab_size, apply_adapter, full_tensor_names, load_base_model, merge
    from .swap_export import convert_peft

    vocab = adapter_vocab_size(ref)
    if vocab is not None and vocab != base.config.get("vocab_size"):
        raise UnsupportedError(f"adapter {name} grows the vocabulary to {vocab} tokens: swappable adapters share the "
                               "base's tokenizer and embeddings; export it merged (without --keep-adapters)")
    model, info = load_base_model(fam.task, base, labels, trust_remote_code)
    refuse_conv1d_tensors(name, model, full_tensor_names(ref.shapes))
    # Tensors no adapter trained (a randomly initialised head, say) must be the graph's own defaults, or the
    # merged reference and the graph would disagree for reasons that have nothing to do with the adapter.
    set_parameters(model, full_defaults)
    peft_model, w = apply_adapter(model, ref, base, list(info.get("missing_keys", [])), allow_pickle)
    warnings.extend(f"adapter {name}: {x}" for x in w)
    tensors = load_adapter_tensors(ref.path, allow_pickle, ref.peft_type)
    full = {pname: tensors[key] for pname, key in full_tensor_names(tensors).items()}
    graph = convert_peft(peft_model, ref, full)
    merged = merge(peft_model, base.name)
    fam.prepare_model(merged)
    reference = fam.reference(merged)
    del merged, peft_model, model
    gc.collect()
    return Prepared(name, ref, graph.tensors, graph.scaling, graph.lora_modules, graph.full_shapes, labels,
                    reference, fam.effect(reference, base_reference))


def refuse_conv1d_tensors(name: str, model, full: dict[str, str]) -> None:
    """GPT-2's Conv1D layers become Linear in the graph (transposed weights); their whole tensors are refused."""
    from transformers.pytorch_utils import Conv1D

    for pname in full:
        try:
            module = model.get_submodule(pname.rpartition(".")[0])
        except AttributeError:
            continue  # not a base module: the fit check names it
        if isinstance(module, Conv1D):
            raise UnsupportedError(f"adapter {name} saves the whole Conv1D layer {pname.rpartition('.')[0]} "
                                   "(modules_to_save): that cannot stay swappable; drop --keep-adapters to merge it")


def make_interface(prepared: list[Prepared], model) -> Interface:
    """The union of what the adapters replace; every module and tensor must fit the base."""
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    lora: dict[str, tuple[int, int]] = {}
    full: dict[str, tuple[int, ...]] = {}
    for p in prepared:
        for module, dims in p.lora_modules.items():
            if lora.setdefault(module, dims) != dims:
                raise MismatchError(f"adapter {p.name}: {module} is {dims[0]}x{dims[1]}, another adapter has "
                                    f"{lora[module][0]}x{lora[module][1]}; they belong to different bases")
        for pname, shape in p.full_shapes.items():
            if pname not in params:
                raise MismatchError(f"adapter {p.name}: replaces {pname}, which the base model does not have")
            if shape != params[pname]:
                raise MismatchError(
                    f"adapter {p.name}: replaces {pname} with shape {'x'.join(map(str, shape))}, the base has "
                    f"{'x'.join(map(str, params[pname]))}; swappable adapters must share head sizes (labels)")
            full[pname] = shape
    return Interface(dict(sorted(lora.items())), dict(sorted(full.items())))


def adapter_entry(p: Prepared, interface: Interface, graph_sha: str, required: float) -> dict[str, Any]:
    source = p.ref.summary()
    entry = contract_entry(p.name, f"{ADAPTERS_DIR}/{p.name}{ADAPTER_SUFFIX}", p.tensors, interface, graph_sha,
                           source, p.scaling, list(p.labels) if p.labels else None)
    entry["effect"] = {"max_abs_diff": p.effect, "meaningful": max(p.effect.values()) >= required}
    return entry


def write_adapter(staging: Path, p: Prepared, graph_sha: str) -> None:
    from .probes import save_arrays

    (staging / ADAPTERS_DIR).mkdir(exist_ok=True)
    (staging / ADAPTER_REFERENCE_DIR).mkdir(parents=True, exist_ok=True)
    # A file of that name may be a hard link into the published bundle (add-adapter's clone): replace the
    # name, never write through it.
    for f in (staging / ADAPTERS_DIR / f"{p.name}{ADAPTER_SUFFIX}", staging / ADAPTER_REFERENCE_DIR / f"{p.name}.npz"):
        f.unlink(missing_ok=True)
    write_adapter_file(staging / ADAPTERS_DIR / f"{p.name}{ADAPTER_SUFFIX}", p.tensors, graph_sha)
    save_arrays(staging / ADAPTER_REFERENCE_DIR / f"{p.name}.npz", p.reference)


# --- export --keep-adapters -------------------------------------------------------------------------------


def build_swappable(ctx: BuildContext, adapters: list[tuple[str, Any]]) -> Report:
    """The keep-adapters export, for every family; returns the report, like pipeline's merged build."""
    from .families import builder_for
    from .formats import sha256_file
    from .manifest import add_ort_format, copy_base_docs, finish, manifest_head, manifest_tail
    from .merge import full_tensor_names, load_base_model, resolve_labels
    from .onnx_export import graph_path
    from .quantize import quantize_all, retry_unsigned_int8
    from .swap_export import add_defaults, base_defaults, inject
    from .tokenizer_files import save_tokenizer
    from .verify import evaluate_variants

    spec, stages, base, task, staging = ctx.spec, ctx.stages, ctx.base, ctx.task, ctx.staging
    warnings: list[str] = []
    if spec.no_tokenizer:
        raise UserInputError("--keep-adapters needs the base's tokenizer; drop --no-tokenizer")
    first = adapters[0][1]
    labels_by_name: dict[str, tuple[str, ...] | None] = {
        name: resolve_labels(task, ctx.arch, base, ref, spec.labels) for name, ref in adapters}
    label_counts = {len(v) for v in labels_by_name.values() if v}
    if len(label_counts) > 1:
        raise MismatchError("the adapters have heads of different sizes ("
                            + ", ".join(f"{n}: {len(v)} labels" for n, v in labels_by_name.items() if v)
                            + "); one graph serves one head size: export them separately")
    labels = next(iter(labels_by_name.values()))
    shipped = [n for n, ref in adapters[1:] if ref.path != first.path and any(
        (ref.path / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer.model"))]
    if shipped:
        warnings.append(f"adapter(s) {', '.join(shipped)} ship a tokenizer; the bundle uses one tokenizer for all "
                        f"adapters (the first one's, else the base's)")
    tok, pad_source = stages.run("tokenizer", "saving tokenizer", save_tokenizer, base, first, staging,
                                 spec.trust_remote_code)
    fam = builder_for(ctx)
    fam.prepare_probes(ctx, tok, warnings)

    def load_graph_model():
        import torch

        torch.manual_seed(0)  # an untrained head is random: make it the same on every export
        model, info = load_base_model(task, base, labels, spec.trust_remote_code)
        fam.prepare_model(model)
        return model, sorted(info.get("missing_keys") or [])

    graph_model, untrained = stages.run("load", "loading base model", load_graph_model)
    base_reference, _ = stages.run("reference_base", "computing the base's PyTorch reference", fam.select,
                                   graph_model)

    # Whole tensors some adapter replaces: every other adapter sees the graph's default for them.
    replaced = set()
    for _, ref in adapters:
        replaced |= set(full_tensor_names(ref.shapes))
    params = dict(graph_model.named_parameters())
    full_defaults = {n: params[n].detach().float().numpy().copy() for n in replaced if n in params}
    prepared = []
    for name, ref in adapters:
        prepared.append(stages.run(
            f"adapter_{name}", f"converting adapter {name} and computing its merged PyTorch reference", prepare_adapter,
            name, ref, fam, base, labels_by_name[name] or labels, base_reference, full_defaults, warnings,
            allow_pickle=spec.allow_pickle, trust_remote_code=spec.trust_remote_code))
    interface = make_interface(prepared, graph_model)
    inject(graph_model, interface)
    fp32 = stages.run("export", "exporting the base with LoRA inputs to ONNX (fp32)", fam.export_swappable,
                      graph_model, interface, graph_path(staging), spec.opset)
    defaults = base_defaults(graph_model, interface)
    graph_model.config.to_json_file(str(staging / "config.json"))
    num_parameters = sum(p.numel() for p in graph_model.parameters())
    fam.describe(graph_model, tok)
    del graph_model, params
    gc.collect()
    # Quantize while the adapter inputs have no initializers: the quantizers would otherwise treat the zero
    # defaults as weights and quantize the LoRA MatMuls; adapters stay float32 on every variant.
    artifacts = quantize_all(stages, fp32, ctx.modes, staging, decoder=task.is_decoder,
                             block_size=spec.int4_block_size, int4_embedding=spec.int4_embedding,
                             int8_weights=spec.int8_weights)
    for art in artifacts.values():
        add_defaults(art, defaults)
    graph_sha = sha256_file(fp32.path)

    required = fam.required(base_reference)
    fam.write_reference(staging, base_reference, None)
    for p in prepared:
        write_adapter(staging, p, graph_sha)
        weak = weak_adapter_warning(max(p.effect.values()), required, p.name)
        warnings += [weak] if weak else []
    copy_base_docs(base, staging)
    effect = {k: min(p.effect[k] for p in prepared) for k in prepared[0].effect}
    meaningful = all(max(p.effect.values()) >= required for p in prepared)
    one_labels = labels if len(set(labels_by_name.values())) == 1 else None
    manifest: dict[str, Any] = {
        **manifest_head(spec, task, base, first, num_parameters),
        **fam.manifest_fields(one_labels, tok, pad_source),
        "probes": fam.probes_manifest(),
        **manifest_tail(ctx, artifacts, effect, required, meaningful),
    }
    manifest["adapter"] = None
    manifest["adapters"] = {
        "mode": "swappable",
        "graph_sha256": graph_sha,
        "interface": interface.to_json(),
        # A base with freshly initialised tensors (a classification head no checkpoint provides) gives noise
        # logits without an adapter: its fp32 parity still proves graph == base, but a quantized variant's
        # cosine on noise means nothing, so quantized variants gate only the adapters (the base is reported).
        "base_gate": "fp32-only" if untrained else "all",
        "switch_atol": SWITCH_ATOL,
        "untrained_base_tensors": untrained,
        "items": {p.name: adapter_entry(p, interface, graph_sha, required) for p in prepared},
    }
    add_ort_format(ctx, artifacts, manifest)
    manifest["files"] = file_hashes(staging)  # the adapter files are checked against these before loading
    results = stages.run("verify", "checking parity with onnxruntime (base, each adapter, switching)",
                         lambda: evaluate_variants(staging, manifest, list(artifacts)))

    def rejudge_int8() -> dict[str, Any]:
        # The fp32 graph has its defaults now; the quantizer leaves initializers that are graph inputs float.
        add_defaults(artifacts["int8"], defaults)
        manifest["files"] = file_hashes(staging)
        return evaluate_variants(staging, manifest, ["int8"])["int8"]

    retried = retry_unsigned_int8(stages, fp32, artifacts, manifest, results, staging, decoder=task.is_decoder,
                                  int8_weights=spec.int8_weights, rejudge=rejudge_int8)
    warnings += [retried] if retried else []
    return finish(ctx, manifest, results, warnings, artifacts, None, extra={"adapters": adapters_summary(manifest)})
