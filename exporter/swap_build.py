"""``export --keep-adapters`` and ``add-adapter``: bundles whose LoRA adapters stay swappable at run time.

Export builds one base graph with LoRA inputs (``swap_export``), converts every adapter into an
``adapters/NAME.onnx_adapter`` file, and stores, beside the base's PyTorch reference, each adapter's own
reference: the PyTorch model with that adapter *merged* (computed independently of the conversion, so parity
proves the conversion too). ``add-adapter`` does the same for one more adapter on a published bundle,
staged and published atomically, without re-exporting the base.
"""

from __future__ import annotations

import gc
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import (
    INPUTS_NPZ,
    OUTPUTS_NPZ,
    PARITY_JSON,
    PROBES_JSON,
    REFERENCE_DIR,
    check_integrity,
    file_hashes,
    make_staging,
    output_lock,
    publish,
    read_manifest,
    reject,
    write_json,
    write_manifest,
)
from .errors import (
    BundleError,
    MismatchError,
    ParityError,
    TamperedBundleError,
    UnsupportedError,
    UserInputError,
    require_full,
)
from .generation import run_arrays
from .parity import OutputInfo, output_rows
from .report import Report
from .swappable import (
    ADAPTER_REFERENCE_DIR,
    ADAPTER_SUFFIX,
    ADAPTERS_DIR,
    Interface,
    adapters_summary,
    check_tensors,
    contract_entry,
    write_adapter_file,
)
from .tolerances import FP32_ATOL, FP32_RTOL, required_effect


def _required_effect(base_reference: list[dict[str, np.ndarray]]) -> float:
    """The smallest adapter effect the fp32 gate can see, from the base's stored outputs (not greedy tokens)."""
    return required_effect([a for r in base_reference for k, a in r.items() if k not in ("tokens", "margins")])


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


# --- the two families: what a reference is, how the graph is traced -------------------------------------


def _check_ids_fit(model, feeds: list[dict[str, np.ndarray]], root: Path) -> None:
    """The bundle's stored probe ids must index the base's tables (else torch raises an IndexError)."""
    limits = {"input_ids": model.get_input_embeddings().num_embeddings,
              "token_type_ids": getattr(model.config, "type_vocab_size", None)}
    for i, feeds_i in enumerate(feeds):
        for name, limit in limits.items():
            a = feeds_i.get(name)
            if a is not None and limit and a.size and int(a.max()) >= limit:
                raise TamperedBundleError(f"{root / INPUTS_NPZ}: batch {i} {name} reaches {int(a.max())}, the base "
                                          f"has {limit}; the bundle is damaged or tampered with, re-export it")


class _Encoder:
    def __init__(self, task, names: tuple[str, ...], pooling: dict | None, feeds: list[dict[str, np.ndarray]]) -> None:
        self.task, self.names, self.pooling, self.feeds = task, names, pooling, feeds
        self.infos = [OutputInfo(o.name, "sequence" in o.axes, o.is_logits) for o in task.outputs]
        self.output_names = tuple(i.name for i in self.infos)

    def reference(self, model) -> list[dict[str, np.ndarray]]:
        from .onnx_export import make_wrapper, run_torch

        wrapper = make_wrapper(model, self.task, self.names, self.pooling)
        return [run_torch(wrapper, f, self.output_names) for f in self.feeds]

    def effect(self, ref: list[dict], base: list[dict]) -> dict[str, float]:
        from .parity import adapter_effect

        return adapter_effect(ref, base, [f["attention_mask"] for f in self.feeds], self.infos)

    def max_diff(self, ref: list[dict], base: list[dict]) -> float:
        return max(self.effect(ref, base).values())

    def export(self, model, interface: Interface, path: Path, opset: int):
        import torch

        from .onnx_export import example_feeds, make_wrapper
        from .swap_export import export_swappable, make_swappable

        wrapper = make_swappable(make_wrapper(model, self.task, self.names, self.pooling), len(self.names), interface)
        example = example_feeds(self.feeds[-1])
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
        return export_swappable(wrapper, model, interface, [torch.from_numpy(a) for a in example.values()],
                                [{0: batch, 1: seq} for _ in self.names], self.names, self.output_names, path, opset)


class _Decoder:
    def __init__(self, dio, feeds: list[dict[str, np.ndarray]], max_new_tokens: int) -> None:
        self.dio, self.feeds, self.max_new_tokens = dio, feeds, max_new_tokens

    def reference(self, model) -> list[dict[str, np.ndarray]]:
        from .decoder import make_decoder_wrapper, torch_step
        from .generation import greedy

        step = torch_step(make_decoder_wrapper(model, self.dio), self.dio)
        runs = [greedy(step, self.dio, f["input_ids"], f["attention_mask"], self.max_new_tokens) for f in self.feeds]
        return run_arrays(runs)

    def effect(self, ref: list[dict], base: list[dict]) -> dict[str, float]:
        return {"logits": self.max_diff(ref, base)}

    def max_diff(self, ref: list[dict], base: list[dict]) -> float:
        return float(max(np.abs(output_rows(r["logits"], f["attention_mask"], True) -
                                output_rows(b["logits"], f["attention_mask"], True)).max()
                         for r, b, f in zip(ref, base, self.feeds)))

    def export(self, model, interface: Interface, path: Path, opset: int):
        from .decoder import decoder_example, make_decoder_wrapper
        from .swap_export import export_swappable, make_swappable

        wrapper = make_swappable(make_decoder_wrapper(model, self.dio), len(self.dio.input_names), interface)
        example, shapes = decoder_example(self.dio)
        return export_swappable(wrapper, model, interface, example, shapes, self.dio.input_names,
                                self.dio.output_names, path, opset)


def _set_parameters(model, values: dict[str, np.ndarray]) -> None:
    """Copy the given values into the model's parameters of the same name and shape (others are skipped)."""
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in values.items():
            if name in params and tuple(params[name].shape) == tuple(value.shape):
                params[name].copy_(torch.from_numpy(np.array(value)))


@dataclass
class _Prepared:
    name: str
    ref: Any  # AdapterRef
    tensors: dict[str, np.ndarray]
    scaling: dict[str, float]
    lora_modules: dict[str, tuple[int, int]]
    full_shapes: dict[str, tuple[int, ...]]
    labels: tuple[str, ...] | None
    reference: list[dict[str, np.ndarray]]
    effect: dict[str, float]


def _prepare(name: str, ref, task, arch, base, labels, family, base_reference: list[dict],
             full_defaults: dict[str, Any], allow_pickle: bool, trust_remote_code: bool,
             warnings: list[str]) -> _Prepared:
    """One adapter: its graph tensors (from peft) and its reference (the PyTorch model with it merged)."""

    from .decoder import conv1d_to_linear
    from .loading import load_adapter_tensors
    from .merge import adapter_vocab_size, apply_adapter, full_tensor_names, load_base_model, merge
    from .swap_export import convert_peft

    vocab = adapter_vocab_size(ref)
    if vocab is not None and vocab != base.config.get("vocab_size"):
        raise UnsupportedError(f"adapter {name} grows the vocabulary to {vocab} tokens: swappable adapters share the "
                               "base's tokenizer and embeddings; export it merged (without --keep-adapters)")
    model, info = load_base_model(task, base, labels, trust_remote_code)
    _refuse_conv1d_tensors(name, model, full_tensor_names(ref.shapes))
    # Tensors no adapter trained (a randomly initialised head, say) must be the graph's own defaults, or the
    # merged reference and the graph would disagree for reasons that have nothing to do with the adapter.
    _set_parameters(model, full_defaults)
    peft_model, w = apply_adapter(model, ref, base, list(info.get("missing_keys", [])), allow_pickle)
    warnings.extend(f"adapter {name}: {x}" for x in w)
    tensors = load_adapter_tensors(ref.path, allow_pickle, ref.peft_type)
    full = {pname: tensors[key] for pname, key in full_tensor_names(tensors).items()}
    graph = convert_peft(peft_model, ref, full)
    merged = merge(peft_model, base.name)
    if task.name == "text-generation":
        conv1d_to_linear(merged)
    reference = family.reference(merged)
    del merged, peft_model, model
    gc.collect()
    return _Prepared(name, ref, graph.tensors, graph.scaling, graph.lora_modules, graph.full_shapes, labels,
                     reference, family.effect(reference, base_reference))


def _refuse_conv1d_tensors(name: str, model, full: dict[str, str]) -> None:
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


def _interface(prepared: list[_Prepared], model) -> Interface:
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


def _entry(p: _Prepared, interface: Interface, graph_sha: str, required: float) -> dict[str, Any]:
    source = p.ref.summary()
    entry = contract_entry(p.name, f"{ADAPTERS_DIR}/{p.name}{ADAPTER_SUFFIX}", p.tensors, interface, graph_sha,
                           source, p.scaling, list(p.labels) if p.labels else None)
    entry["effect"] = {"max_abs_diff": p.effect, "meaningful": max(p.effect.values()) >= required}
    return entry


def _write_adapter(staging: Path, p: _Prepared, graph_sha: str) -> None:
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


def build_swappable(spec, modes, stages, adapters: list[tuple[str, Any]], base, arch, task,
                    staging: Path) -> dict[str, Any]:
    """The keep-adapters export (both families); returns the report, like pipeline's builders."""
    from .decoder import conv1d_to_linear, decoder_io, make_decoder_wrapper, torch_step
    from .formats import sha256_file
    from .loading import pooling_config
    from .manifest import decoder_fields, encoder_fields, finish, manifest_head, manifest_tail
    from .merge import full_tensor_names, load_base_model, resolve_labels
    from .probes import GREEDY_TOKENS, encode, load_tokenizer, save_arrays
    from .quantize import quantize_all
    from .swap_export import add_defaults, base_defaults, inject
    from .tasks import input_names as task_inputs
    from .tokenizer_files import choose_prompts, encoder_probes, eos_token_ids, probe_texts, save_tokenizer
    from .verify import evaluate_variants

    warnings: list[str] = []
    is_decoder = task.name == "text-generation"
    if spec.no_tokenizer:
        raise UserInputError("--keep-adapters needs the base's tokenizer; drop --no-tokenizer")
    first = adapters[0][1]
    labels_by_name: dict[str, tuple[str, ...] | None] = {
        name: resolve_labels(task, arch, base, ref, spec.labels) for name, ref in adapters}
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

    def load_graph_model():
        import torch

        torch.manual_seed(0)  # an untrained head is random: make it the same on every export
        model, info = load_base_model(task, base, labels, spec.trust_remote_code)
        if is_decoder:
            conv1d_to_linear(model)
        return model, sorted(info.get("missing_keys") or [])

    graph_model, untrained = stages.run("load", "loading base model", load_graph_model)
    if is_decoder:
        positions = base.config.get("max_position_embeddings") or base.config.get("n_positions") or spec.max_length
        max_length = min(spec.max_length, positions)
        fast_tok = load_tokenizer(staging / "tokenizer.json", max_length, tok.pad_token_id, tok.pad_token, "left")
        names = ("input_ids", "attention_mask")
        texts = probe_texts(spec, fast_tok, "decoder", warnings)
        singles = [encode(fast_tok, [p], names) for p in texts.texts]
        dio = decoder_io(graph_model)
        chosen, batches, feeds, runs = stages.run(
            "reference_base", "computing the base's PyTorch reference (greedy generation)", choose_prompts,
            torch_step(make_decoder_wrapper(graph_model, dio), dio), dio, fast_tok, names, texts, singles)
        family: Any = _Decoder(dio, feeds, GREEDY_TOKENS)
        base_reference = run_arrays(runs)
    else:
        names = task_inputs(arch, base.config.get("type_vocab_size"))
        limits = [spec.max_length, base.config.get("max_position_embeddings", spec.max_length)
                  - (2 if base.model_type in ("roberta", "xlm-roberta") else 0)]
        if 0 < tok.model_max_length < 1_000_000:
            limits.append(tok.model_max_length)
        max_length = min(limits)
        fast_tok = load_tokenizer(staging / "tokenizer.json", max_length, tok.pad_token_id, tok.pad_token)
        probes, texts = encoder_probes(spec, fast_tok, names, max_length, warnings)
        pooling = pooling_config(base) if task.name == "feature-extraction" else None
        family = _Encoder(task, names, pooling, list(probes.feeds))
        base_reference = stages.run("reference_base", "computing the base's PyTorch reference",
                                    family.reference, graph_model)

    # Whole tensors some adapter replaces: every other adapter sees the graph's default for them.
    replaced = set()
    for _, ref in adapters:
        replaced |= set(full_tensor_names(ref.shapes))
    params = dict(graph_model.named_parameters())
    full_defaults = {n: params[n].detach().float().numpy().copy() for n in replaced if n in params}
    prepared = []
    for name, ref in adapters:
        prepared.append(stages.run(
            f"adapter_{name}", f"converting adapter {name} and computing its merged PyTorch reference", _prepare,
            name, ref, task, arch, base, labels_by_name[name] or labels, family, base_reference, full_defaults,
            spec.allow_pickle, spec.trust_remote_code, warnings))
    interface = _interface(prepared, graph_model)
    inject(graph_model, interface)
    fp32 = stages.run("export", "exporting the base with LoRA inputs to ONNX (fp32)", family.export, graph_model,
                      interface, staging / "model.onnx", spec.opset)
    defaults = base_defaults(graph_model, interface)
    graph_model.config.to_json_file(str(staging / "config.json"))
    num_parameters = sum(p.numel() for p in graph_model.parameters())
    eos_ids = eos_token_ids(graph_model.config, tok) if is_decoder else []
    del graph_model, params
    gc.collect()
    # Quantize while the adapter inputs have no initializers: the quantizers would otherwise treat the zero
    # defaults as weights and quantize the LoRA MatMuls; adapters stay float32 on every variant.
    artifacts = quantize_all(stages, fp32, modes, staging, decoder=is_decoder, block_size=spec.int4_block_size,
                             int4_embedding=spec.int4_embedding)
    for art in artifacts.values():
        add_defaults(art, defaults)
    graph_sha = sha256_file(fp32.path)

    required = _required_effect(base_reference)
    (staging / REFERENCE_DIR).mkdir(exist_ok=True)
    if is_decoder:
        write_json(staging / PROBES_JSON, {"texts": list(texts.texts), "batches": [list(b) for b in batches],
                                           "max_length": max_length, "max_new_tokens": GREEDY_TOKENS,
                                           "min_top2_margin": float(min(r.margins.min() for r in runs)),
                                           "source": texts.source})
        save_arrays(staging / INPUTS_NPZ, list(feeds))
    else:
        write_json(staging / PROBES_JSON, probes.to_json())
        save_arrays(staging / INPUTS_NPZ, list(probes.feeds))
    save_arrays(staging / OUTPUTS_NPZ, base_reference)
    for p in prepared:
        _write_adapter(staging, p, graph_sha)
        if max(p.effect.values()) < required:
            warnings.append(f"adapter {p.name} barely changes the model (max |merged - base| "
                            f"{max(p.effect.values()):.2g} < {required:g}); parity cannot show it survived export")
    from .manifest import copy_base_docs

    copy_base_docs(base, staging)
    effect = {k: min(p.effect[k] for p in prepared) for k in prepared[0].effect}
    meaningful = all(max(p.effect.values()) >= required for p in prepared)
    all_labels = {v for v in labels_by_name.values()}
    fields = (decoder_fields(dio, tok, max_length, positions, eos_ids, pad_source) if is_decoder else
              encoder_fields(task, names, labels if len(all_labels) == 1 else None, pooling, tok, max_length,
                              pad_source))
    manifest: dict[str, Any] = {
        **manifest_head(spec, task, base, first, num_parameters),
        **fields,
        "probes": texts.manifest(),
        **manifest_tail(spec, artifacts, task.name, effect, required, meaningful, decoder=is_decoder),
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
        "untrained_base_tensors": untrained,
        "items": {p.name: _entry(p, interface, graph_sha, required) for p in prepared},
    }
    manifest["files"] = file_hashes(staging)  # the adapter files are checked against these before loading
    results = stages.run("verify", "checking parity with onnxruntime (base, each adapter, switching)",
                         lambda: evaluate_variants(staging, manifest, list(artifacts)))
    return finish(staging, spec, modes, manifest, results, warnings, stages, task, artifacts, None, None,
                   extra={"adapters": adapters_summary(manifest)})


# --- add-adapter ----------------------------------------------------------------------------------------


def add_adapter(bundle: Path, adapter_path: Path, name: str | None = None, *, base: str | None = None,
                allow_pickle: bool = False, trust_remote_code: bool = False, progress=None,
                sign: Path | None = None) -> Report:
    """Convert one more peft adapter for a swappable bundle; OUT is replaced only when everything passes.
    The manifest changes, so a signed bundle must be re-signed (``sign``) or it is published unsigned."""
    require_full("add-adapter")
    if sign is not None:
        from .signing import load_private_key

        load_private_key(sign)
    from .stages import quiet_libraries
    from .staging import disk_error

    root = Path(bundle)
    name = check_adapter_name(name) if name else check_adapter_name(Path(adapter_path).resolve().name)
    if not (root / "manifest.json").is_file():
        raise UserInputError(f"{root}: not a bundle (no manifest.json); give the folder export wrote")
    # The lock first: a concurrent add-adapter must see this one's manifest, not the one before it.
    with output_lock(root), quiet_libraries():
        try:
            return Report(_add_locked(root, Path(adapter_path), name, base, allow_pickle, trust_remote_code,
                                      progress, sign))
        except OSError as e:
            raise disk_error(e, root) from None


def _add_locked(root: Path, adapter_path: Path, name: str, base: str | None, allow_pickle: bool,
                trust_remote_code: bool, progress, sign: Path | None = None) -> dict[str, Any]:
    from .decoder import conv1d_to_linear
    from .formats import sha256_file
    from .generation import DecoderIO
    from .loading import check_architecture, inspect_adapter, public_base_name, resolve_base_name
    from .merge import load_base_model, resolve_labels
    from .report import write_report
    from .runtime import text_input_names
    from .stages import Stages
    from .tasks import get_arch, get_task, task_from_peft
    from .verify import check_tokenizer, evaluate_variants, load_reference

    manifest = read_manifest(root)
    section = manifest.get("adapters")
    if not section:
        raise UserInputError(f"{root}: this bundle has merged weights, no swappable adapters; re-export it with "
                             "--keep-adapters to add adapters later")
    problems = check_integrity(root, manifest)
    if not problems and (manifest.get("tokenizer") or {}).get("file"):
        problems = check_tokenizer(root, manifest)  # the stored probe ids are what its tokenizer makes
    if problems:
        raise BundleError(f"{root}: the bundle fails its integrity check ({problems[0]}); re-export it before "
                          "adding adapters")
    if name in section["items"]:
        raise UserInputError(f"{root}: already has an adapter named {name}; choose another with --adapter NEW=PATH")
    stages = Stages(progress)
    ref = stages.run("inspect", "inspecting adapter", inspect_adapter, adapter_path, allow_pickle)
    bundle_base = manifest["base"]["name"]
    recorded = public_base_name(ref.recorded_base)
    if recorded and recorded != bundle_base:
        raise MismatchError(f"adapter {name} was trained for {recorded}, this bundle's base is {bundle_base}; an "
                            "adapter only fits the base it was trained on (if it was trained on this base, fix "
                            "base_model_name_or_path in its adapter_config.json)")
    if base is None and bundle_base.startswith("local:"):
        raise UserInputError(f"this bundle's base is a local folder ({bundle_base}); pass it with --base")
    base_ref = resolve_base_name(base or bundle_base, manifest["base"].get("revision"))
    check_architecture(base_ref, trust_remote_code)
    task = get_task(manifest["task"])
    adapter_task = task_from_peft(ref.task_type)
    if adapter_task and adapter_task != task.name:
        raise MismatchError(f"adapter {name} is a {adapter_task} adapter, this bundle is {task.name}")
    interface = Interface.from_json(section["interface"])
    probes, inputs, base_reference = load_reference(root, manifest)
    if task.name == "text-generation":
        dio = DecoderIO.from_json(manifest["decoder"])
        family: Any = _Decoder(dio, inputs, int(probes["max_new_tokens"]))
    else:
        family = _Encoder(task, text_input_names(manifest), manifest.get("pooling"), inputs)
    arch = get_arch(base_ref.model_type) if task.name != "text-generation" else None
    warnings: list[str] = []
    defaults = _graph_defaults(root / manifest["variants"]["fp32"]["file"], interface)
    labels = resolve_labels(task, arch, base_ref, ref, None) if arch is not None else None
    if labels is not None:
        head = f"{arch.head_layers[task.name]}.weight"
        size = interface.full_parameters.get(head, (None,))[0]
        if size is not None and size != len(labels):
            raise MismatchError(f"adapter {name} has {len(labels)} labels, this bundle's graph serves a head of "
                                f"{size}; adapters of one bundle share the head size: export it separately")

    def check_base():

        model, _ = load_base_model(task, base_ref, labels, trust_remote_code)
        if task.name == "text-generation":
            conv1d_to_linear(model)
        _set_parameters(model, defaults)
        _check_ids_fit(model, family.feeds, root)
        got = family.reference(model)
        diff = family.max_diff(got, base_reference)
        bound = FP32_ATOL + FP32_RTOL * max(float(np.abs(r[k]).max()) for r in base_reference for k in r
                                            if k != "tokens")
        if not diff <= bound:
            raise MismatchError(f"base {base_ref.name} does not reproduce this bundle's base outputs (max abs diff "
                                f"{diff:.3g} > {bound:.3g}); pass the base the bundle was exported from (--base)")

    stages.run("base_check", "checking the base reproduces the bundle's base outputs", check_base)
    p = stages.run("convert", f"converting adapter {name} and computing its merged PyTorch reference", _prepare,
                   name, ref, task, arch, base_ref, labels, family, base_reference, defaults, allow_pickle,
                   trust_remote_code, warnings)
    shapes = {k: (tuple(v.shape), str(v.dtype)) for k, v in p.tensors.items()}
    check_tensors(shapes, interface, f"adapter {name}")
    required = _required_effect(base_reference)
    if max(p.effect.values()) < required:
        warnings.append(f"adapter {name} barely changes the model (max |merged - base| "
                        f"{max(p.effect.values()):.2g} < {required:g}); parity cannot show it survived export")
    staging = make_staging(root)
    try:
        _clone_bundle(root, staging)
        graph_sha = section["graph_sha256"]
        if sha256_file(staging / manifest["variants"]["fp32"]["file"]) != graph_sha:
            raise BundleError(f"{root}: model.onnx is not the graph the adapters were made for; re-export")
        _write_adapter(staging, p, graph_sha)
        section["items"][name] = _entry(p, interface, graph_sha, required)
        _update_effect(manifest)
        manifest["spec"]["adapters"] = list(section["items"])
        variants = list(manifest["variants"])
        manifest["files"] = file_hashes(staging)  # the adapter files are checked against these before loading
        results = stages.run("verify", "checking parity with onnxruntime (base, each adapter, switching)",
                             lambda: evaluate_variants(staging, manifest, variants))
        passed = all(r["passed"] for r in results.values())
        for v, r in results.items():
            manifest["variants"][v]["passed"] = r["passed"]
        report = _read_report(staging)
        report.update({"command": "add-adapter", "passed": passed, "variants": results,
                       "adapters": adapters_summary(manifest), "adapter_effect": manifest["adapter_effect"],
                       "warnings": list(report.get("warnings", [])) + warnings})
        report.setdefault("timings", {}).update({f"add_{k}": v for k, v in stages.timings.items()})
        from .signing import SIGNATURE, sign_bundle

        was_signed = (staging / SIGNATURE).is_file()
        (staging / SIGNATURE).unlink(missing_ok=True)  # it signs the old manifest
        if was_signed and sign is None:
            report["warnings"].append("the bundle was signed; its signature no longer matches the new manifest and "
                                      "was removed: add --sign KEY to re-sign it")
        write_report(staging, report)
        manifest["files"] = file_hashes(staging)
        write_manifest(staging, manifest)
        if sign is not None:
            report["signed_by"] = sign_bundle(staging, sign)
        if not passed:
            rejected = reject(staging, root)
            fails = [f"{v}: {r['failures'][0]}" for v, r in results.items() if r["failures"]][:3]
            raise ParityError(f"parity gate failed ({'; '.join(fails)}); {root} is unchanged, diagnostics are in "
                              f"{rejected}", report)
        publish(staging, root, overwrite=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def _update_effect(manifest: dict[str, Any]) -> None:
    """The bundle-level adapter effect: the weakest adapter's, per output."""
    effects = [e["effect"] for e in manifest["adapters"]["items"].values()]
    outputs = effects[0]["max_abs_diff"]
    manifest["adapter_effect"]["max_abs_diff"] = {k: min(e["max_abs_diff"][k] for e in effects) for k in outputs}
    manifest["adapter_effect"]["meaningful"] = all(e["meaningful"] for e in effects)


def _read_report(root: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads((root / PARITY_JSON).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _graph_defaults(path: Path, interface: Interface) -> dict[str, np.ndarray]:
    """The default values of the whole-tensor inputs, read back from the graph."""
    import onnx
    from onnx import numpy_helper

    wanted = set(interface.full_parameters)
    model = onnx.load(str(path))
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name in wanted}


def _clone_bundle(root: Path, staging: Path) -> None:
    """Copy the bundle into staging; large immutable files (graphs, weights) are hard links when possible."""
    for src in sorted(root.rglob("*")):
        rel = src.relative_to(root)
        dst = staging / rel
        if src.is_symlink() or not (src.is_dir() or src.is_file()):
            # It would copy (and then hash and list) whatever it points at, inside or outside the bundle.
            raise BundleError(f"{root}: {rel.as_posix()} is a symlink or not a regular file; a bundle holds only "
                              "regular files, remove it")
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.suffix in (".onnx", ".data", ADAPTER_SUFFIX):
            try:
                os.link(src, dst)
                continue
            except OSError:
                pass
        shutil.copy2(src, dst)
