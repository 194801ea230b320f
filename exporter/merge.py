"""Build the PyTorch model: base + adapter, checked for fit and finiteness, then merged with peft.

Checks run before peft touches anything, because peft only warns on partial loads and silently
re-initialises what it cannot match.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .errors import MismatchError, NonFiniteError, UserInputError
from .formats import ALL_MARKERS, is_adapter_key
from .loading import AdapterRef, BaseRef, load_adapter_tensors
from .tasks import ArchSpec, TaskSpec

PEFT_PREFIX = "base_model.model."
GENERIC_LABEL = "LABEL_"


@dataclass(frozen=True)
class MergedModel:
    module: Any  # torch.nn.Module in eval mode: the merged model wrapped with the task's ONNX outputs
    labels: tuple[str, ...] | None
    config: Any  # transformers PretrainedConfig of the merged model (saved into the bundle)
    num_parameters: int


def resolve_labels(
    task: TaskSpec, arch: ArchSpec, base: BaseRef, adapter: AdapterRef, labels: tuple[str, ...] | None
) -> tuple[str, ...] | None:
    """Label names: --labels, else the adapter's sidecar, else the base's id2label; count checked against the head."""
    if not task.has_labels:
        return None
    head = arch.head_layers[task.name]
    head_key = full_tensor_names(adapter.shapes).get(f"{head}.weight")
    n_head = adapter.shapes[head_key][0] if head_key else None
    base_labels = None
    id2label = base.config.get("id2label") or {}
    if id2label and not all(str(v).startswith(GENERIC_LABEL) for v in id2label.values()):
        base_labels = tuple(id2label[k] for k in sorted(id2label, key=int))
    chosen = labels or adapter.labels or base_labels
    if chosen is None:
        if n_head is None:
            raise MismatchError(
                f"{adapter.path}: the adapter carries no classification head ({head} not in modules_to_save) and "
                f"the base {base.name} has no labels; train with task_type set so the head is saved, or pass --labels"
            )
        chosen = tuple(f"{GENERIC_LABEL}{i}" for i in range(n_head))
    if n_head is not None and len(chosen) != n_head:
        raise MismatchError(
            f"{len(chosen)} label names ({', '.join(chosen)}) but the adapter's head {head} has {n_head} outputs; "
            "fix --labels or the adapter's export_adapter.json"
        )
    if len(set(chosen)) != len(chosen):
        raise UserInputError(f"label names must be unique, got {', '.join(chosen)}")
    return tuple(chosen)


def load_base_model(task: TaskSpec, base: BaseRef, labels: tuple[str, ...] | None, trust_remote_code: bool):
    import torch
    import transformers

    cls = getattr(transformers, task.model_class)
    kwargs: dict[str, Any] = {"output_loading_info": True, "dtype": torch.float32}
    if labels is not None:
        kwargs.update(
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
        )
    if base.revision:
        kwargs["revision"] = base.revision
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    try:
        model, info = cls.from_pretrained(base.location, **kwargs)
    except OSError as e:
        raise UserInputError(
            f"cannot load base {base.name}: {str(e).splitlines()[0][:160]}; check the folder or hub id"
        ) from None
    except ValueError as e:  # shape clashes between config and weights, bad configs
        raise MismatchError(f"cannot load base {base.name}: {str(e).splitlines()[0][:200]}") from None
    except (TypeError, KeyError, AttributeError, IndexError) as e:  # a config field of the wrong type
        first = (str(e).splitlines() or [""])[0][:160]
        raise UserInputError(f"cannot load base {base.name}: its config.json does not describe a valid model "
                             f"({type(e).__name__}: {first}); check the config's values and types") from None
    model.eval()
    _check_finite(model, f"base {base.name}", "re-download the base model")
    return model, info


def full_tensor_names(keys) -> dict[str, str]:
    """Adapter keys of whole tensors (modules_to_save, saved embeddings) -> the base parameter they replace.

    peft writes the trained copy of a module either under the parameter's own name or with a
    ``.modules_to_save.`` infix (plus an ``.original_module.`` copy we ignore); the infixed one wins.
    """
    out: dict[str, str] = {}
    for key in sorted(keys, key=lambda k: ".modules_to_save." in k):
        if is_adapter_key(key) or ".original_module." in key:
            continue
        out[key.removeprefix(PEFT_PREFIX).replace(".modules_to_save.", ".")] = key
    return out


def adapter_vocab_size(adapter: AdapterRef) -> int | None:
    """Rows of the embedding matrix an adapter carries (it grew the vocabulary), else None."""
    for name, key in full_tensor_names(adapter.shapes).items():
        if name.endswith(("word_embeddings.weight", "embed_tokens.weight")):
            return adapter.shapes[key][0]
    return None


def resize_embeddings(model, adapter: AdapterRef) -> int | None:
    """An adapter that grew the vocabulary carries the whole embedding matrix: grow the base to match."""
    emb = model.get_input_embeddings()
    name = next(n for n, p in model.named_parameters() if p is emb.weight)
    key = full_tensor_names(adapter.shapes).get(name)
    if key is None:
        return None
    rows, dim = adapter.shapes[key]
    if rows != emb.weight.shape[0] and dim == emb.weight.shape[1]:
        model.resize_token_embeddings(rows, mean_resizing=False)
        return rows
    return None


def check_fit(model, adapter: AdapterRef, base: BaseRef, missing_in_base: list[str]) -> None:
    """Every adapter tensor must land on a module of the base with the right shape; heads must be trained."""
    import torch

    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    recorded = f" (the adapter records base {adapter.recorded_base!r})" if adapter.recorded_base else ""
    for key, shape in sorted(adapter.shapes.items()):
        if not key.startswith(PEFT_PREFIX):
            raise MismatchError(f"{adapter.weights_file}: unexpected key {key} (not a peft adapter key)")
        rel = key.removeprefix(PEFT_PREFIX)
        marker = next((m for m in ALL_MARKERS if m in rel), None)
        if marker is None:
            continue
        mod_name, _, rest = rel.partition(marker)
        mod = modules.get(mod_name)
        if mod is None:
            raise MismatchError(
                f"adapter key {key}: base {base.name} has no module {mod_name}{recorded}; "
                "use the base the adapter was trained on"
            )
        if adapter.peft_type != "LORA":
            continue  # peft checks the shapes of LoHa/LoKr/IA3/AdaLoRA factors when it loads them
        if isinstance(mod, torch.nn.Linear):
            n_in, n_out = mod.in_features, mod.out_features
        elif type(mod).__name__ == "Conv1D":  # GPT-2's transposed linear: weight is (in, out)
            n_in, n_out = mod.weight.shape
        else:
            raise MismatchError(f"adapter key {key}: module {mod_name} is {type(mod).__name__}, not Linear")
        if rest.startswith("A."):
            expected: tuple[int, ...] = (adapter.rank_for(mod_name), n_in)
            bad = shape[1] != n_in
        elif rest.startswith("B."):
            expected = (n_out, adapter.rank_for(mod_name))
            bad = shape[0] != n_out
        else:
            continue  # lora_magnitude_vector etc. are checked by peft
        if bad or len(shape) != 2:
            raise MismatchError(
                f"adapter key {key} has shape {tuple(shape)} but base {base.name} module {mod_name} needs "
                f"{tuple(expected)} (in={n_in}, out={n_out}){recorded}; use the base the adapter was trained on"
            )
    full = full_tensor_names(adapter.shapes)
    for name, key in full.items():
        p = params.get(name)
        if p is None:
            raise MismatchError(f"adapter key {key}: base {base.name} has no parameter {name}{recorded}")
        if tuple(p.shape) != tuple(adapter.shapes[key]):
            raise MismatchError(
                f"adapter key {key} has shape {tuple(adapter.shapes[key])} but base {base.name} parameter {name} "
                f"has {tuple(p.shape)}{recorded}"
            )
    untrained = [k for k in missing_in_base if k not in full]
    if untrained:
        top = sorted({k.split(".")[0] for k in untrained})
        raise MismatchError(
            f"base {base.name} has no trained weights for {untrained[0]} and the adapter does not carry them; "
            f"train the adapter with modules_to_save={top} (or the right task_type) so they are saved"
        )


def _lora_config(adapter: AdapterRef):
    """The adapter's peft config (LoraConfig, LoHaConfig, ...), tolerating keys from a newer peft."""
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING

    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING[adapter.peft_type]
    fields = {f.name for f in dataclasses.fields(config_cls)}
    known = {k: v for k, v in adapter.config.items() if k in fields}
    unknown = sorted(set(adapter.config) - fields - {"peft_version"})
    warnings = []
    if unknown:
        warnings.append(
            f"adapter_config.json has keys this peft does not know ({', '.join(unknown)}): ignored; "
            "it was probably written by a newer peft"
        )
    known["inference_mode"] = True
    try:
        return config_cls(**known), warnings
    except (TypeError, ValueError) as e:
        raise UserInputError(f"{adapter.path / 'adapter_config.json'}: invalid {adapter.peft_type} config ({e})") from None


def apply_adapter(model, adapter: AdapterRef, base: BaseRef, missing_in_base: list[str], allow_pickle: bool):
    """Fit-check, then load whole tensors into the base and LoRA tensors through peft; refuse any bad key.

    Whole tensors (heads, grown embeddings) go straight into the base: merging would copy them there anyway,
    and it keeps peft from re-initialising a module it cannot match.
    """
    import torch
    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    resize_embeddings(model, adapter)
    check_fit(model, adapter, base, missing_in_base)
    tensors = load_adapter_tensors(adapter.path, allow_pickle, adapter.peft_type)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, key in full_tensor_names(tensors).items():
            params[name].copy_(tensors[key])
    config, warnings = _lora_config(adapter)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:  # peft's NoMatchingPeftModuleError and "Target modules ... not found" are ValueErrors
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise MismatchError(f"{adapter.path / 'adapter_config.json'}: target_modules {config.target_modules!r} match "
                            f"no module of {base.name} ({str(e).splitlines()[0][:80]}); its linear layers are named "
                            f"{', '.join(names[:12])}") from None
    lora = {k: v for k, v in tensors.items() if is_adapter_key(k)}
    # Modules peft wraps itself (modules_to_save, a task's head) expect their weights in the state dict
    # again; the others were loaded into the base above.
    expected = set(get_peft_model_state_dict(peft_model))
    full = {PEFT_PREFIX + name: tensors[key] for name, key in full_tensor_names(tensors).items()
            if PEFT_PREFIX + name in expected}
    result = set_peft_model_state_dict(peft_model, {**lora, **full})
    if result.unexpected_keys:
        raise MismatchError(f"{adapter.weights_file}: key {result.unexpected_keys[0]} matches no adapter module")
    provided = {k.replace(".weight", "") for k in lora}
    for name, _ in peft_model.named_parameters():
        if not is_adapter_key(name) or ".ranknum" in name:
            continue
        short = name.replace(".default", "").replace(".weight", "")
        if short not in provided:
            raise MismatchError(
                f"{adapter.weights_file}: no weights for {short} although adapter_config.json targets that "
                "module; the file is partial (re-save the adapter)"
            )
    peft_model.eval()
    return peft_model, warnings


def merge(peft_model, base_name: str):
    try:
        merged = peft_model.merge_and_unload(safe_merge=True)
    except ValueError as e:  # safe_merge raises ValueError when the merge produces NaN/inf
        raise NonFiniteError(f"merging the adapter into {base_name} produced NaN or inf ({e})") from None
    merged.eval()
    _check_finite(merged, "merged model", "check the adapter's training")
    return merged


def _check_finite(model, what: str, fix: str) -> None:
    import torch

    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise NonFiniteError(f"{what}: parameter {name} contains NaN or inf; {fix}")
