"""Registry of what really varies: model families, tasks (outputs, model class) and architectures.

Declared as data, like optimum's exporters: a new architecture is one entry here plus a tiny test config
(tests fail when a registered architecture has none). A family's behaviour has two halves joined by its name,
because the device profile cannot import the build side: ``runners.RUNNERS[name]`` runs and judges a bundle
(device), ``families.BUILDERS[name]`` builds one (wrapper, export, reference, manifest fields).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UnsupportedError


@dataclass(frozen=True)
class FamilySpec:
    """What a model family is as data; every module reads these fields rather than compare family names."""

    name: str
    description: str
    # Variants export --quantize offers (int4 is weight-only MatMulNBits, built for decoders' large matmuls).
    quantize_modes: tuple[str, ...]
    # --probe-texts: at most this many texts (encoders) or prompts (decoders); parity re-runs them on every
    # variant and on the device, and a decoder's are each generated token by token.
    max_user_probes: int
    # Where a batch is padded: a KV-cache decoder generates after the prompt, so its batches pad on the left.
    padding_side: str
    # Whether the bundle can do without a tokenizer (encoders take token ids; generation must decode).
    tokenizer_optional: bool
    # The reference outputs that are not arrays parity compares elementwise (greedy tokens and their margins).
    non_output_keys: tuple[str, ...] = ()

    @property
    def is_decoder(self) -> bool:
        return self.name == "decoder"


FAMILIES: dict[str, FamilySpec] = {
    "encoder": FamilySpec("encoder", "one forward pass per batch (classification, token labels, embeddings)",
                          ("int8", "fp16"), 64, "right", True),
    "decoder": FamilySpec("decoder", "causal LM exported with a KV cache, judged on prompt logits and greedy "
                          "continuations", ("int8", "int4", "fp16"), 16, "left", False, ("tokens", "margins")),
}


def family_of(manifest: dict) -> FamilySpec:
    """A bundle's family: manifests say "family" for decoders (encoders predate the field)."""
    return FAMILIES["decoder" if manifest.get("family") == "decoder" else "encoder"]


@dataclass(frozen=True)
class OutputSpec:
    name: str
    # Axis names; "sequence" marks a per-token output whose padded positions parity excludes.
    axes: tuple[str, ...]
    # Outputs whose argmax is a prediction (labels), so argmax agreement and margins apply.
    is_logits: bool


@dataclass(frozen=True)
class TaskSpec:
    name: str
    model_class: str  # transformers Auto class
    peft_task_types: tuple[str, ...]
    outputs: tuple[OutputSpec, ...]
    has_labels: bool
    # "encoder" (one forward pass per batch) or "decoder" (KV-cache generation): what export, verify and the
    # runtime do differ per family, and every module asks this field rather than compare task names.
    family: str = "encoder"
    # The task-level metric of `run` (taskeval.py) and what it counts; None where there is none.
    metric: str | None = None
    metric_units: str | None = None
    # How a base's config.json "architectures" names a model of this task (the task when nothing else says).
    architecture_suffixes: tuple[str, ...] = ()

    @property
    def family_spec(self) -> FamilySpec:
        return FAMILIES[self.family]

    @property
    def is_decoder(self) -> bool:
        return self.family_spec.is_decoder

    @property
    def quantize_modes(self) -> tuple[str, ...]:
        return self.family_spec.quantize_modes


TASKS: dict[str, TaskSpec] = {
    "text-classification": TaskSpec(
        name="text-classification",
        model_class="AutoModelForSequenceClassification",
        peft_task_types=("SEQ_CLS",),
        outputs=(OutputSpec("logits", ("batch", "num_labels"), True),),
        has_labels=True,
        metric="accuracy",
        metric_units="sentences",
        architecture_suffixes=("ForSequenceClassification",),
    ),
    "token-classification": TaskSpec(
        name="token-classification",
        model_class="AutoModelForTokenClassification",
        peft_task_types=("TOKEN_CLS",),
        outputs=(OutputSpec("logits", ("batch", "sequence", "num_labels"), True),),
        has_labels=True,
        metric="entity_f1",
        metric_units="words",
        architecture_suffixes=("ForTokenClassification",),
    ),
    "feature-extraction": TaskSpec(
        name="feature-extraction",
        model_class="AutoModel",
        peft_task_types=("FEATURE_EXTRACTION",),
        outputs=(
            OutputSpec("last_hidden_state", ("batch", "sequence", "hidden"), False),
            OutputSpec("sentence_embedding", ("batch", "hidden"), False),
        ),
        has_labels=False,
    ),
}


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    # Whether the model's forward takes token_type_ids (used only when config.type_vocab_size > 1).
    accepts_token_type_ids: bool
    default_lora_targets: tuple[str, ...]
    # The head's final linear layer per task: its out_features is the number of labels.
    head_layers: dict[str, str]
    # Modules that peft must save with a sequence-classification adapter (modules_to_save): the head,
    # plus anything else the task class adds on top of the bare base model (DeBERTa's ContextPooler).
    seq_cls_modules: tuple[str, ...] = ("classifier",)
    # onnxruntime's transformer optimizer model_type whose fusions apply to the exported graph (exporter/fusions.py);
    # None: exported unfused. DeBERTa's disentangled attention matches none of its patterns.
    ort_fusion: str | None = "bert"
    # Written from the weights by encoder_graph.py (with the fusions on) instead of traced; ``unsupported_reason``
    # there names what of a model it does not cover, and that model is traced.
    written_graph: bool = False


ARCHITECTURES: dict[str, ArchSpec] = {
    "bert": ArchSpec(
        "bert", True, ("query", "value"),
        {"text-classification": "classifier", "token-classification": "classifier"},
        written_graph=True,
    ),
    "roberta": ArchSpec(
        "roberta", True, ("query", "value"),
        {"text-classification": "classifier.out_proj", "token-classification": "classifier"},
        written_graph=True,
    ),
    "xlm-roberta": ArchSpec(
        "xlm-roberta", True, ("query", "value"),
        {"text-classification": "classifier.out_proj", "token-classification": "classifier"},
        written_graph=True,
    ),
    "distilbert": ArchSpec(
        "distilbert", False, ("q_lin", "v_lin"),
        {"text-classification": "classifier", "token-classification": "classifier"},
    ),
    "deberta-v2": ArchSpec(
        "deberta-v2", True, ("query_proj", "value_proj"),
        {"text-classification": "classifier", "token-classification": "classifier"},
        seq_cls_modules=("classifier", "pooler"),
        ort_fusion=None,
    ),
}

ENCODER_TASKS = tuple(TASKS)  # the tasks of the encoder architectures below

# Decoder-only causal LMs: exported with a KV cache (exporter/decoder.py). Outputs are declared per model
# (present.{i}.key/value depend on the layer count), so only logits is listed here.
TEXT_GENERATION = TaskSpec(
    name="text-generation",
    model_class="AutoModelForCausalLM",
    peft_task_types=("CAUSAL_LM",),
    outputs=(OutputSpec("logits", ("batch", "sequence", "vocab"), True),),
    has_labels=False,
    family="decoder",
    # teacher-forced top-1 accuracy of the reference response tokens (perplexity is reported too)
    metric="token_accuracy",
    metric_units="response tokens",
    architecture_suffixes=("ForCausalLM", "LMHeadModel"),
)
TASKS["text-generation"] = TEXT_GENERATION


@dataclass(frozen=True)
class DecoderArchSpec:
    model_type: str
    default_lora_targets: tuple[str, ...]
    # Written as decoder_graph.py's fused graph (onnxruntime's GroupQueryAttention, RotaryEmbedding and
    # SkipSimplifiedLayerNormalization) where the model has nothing it does not cover; else traced.
    fused_graph: bool = False


DECODER_ARCHITECTURES: dict[str, DecoderArchSpec] = {
    "llama": DecoderArchSpec("llama", ("q_proj", "v_proj"), fused_graph=True),
    "mistral": DecoderArchSpec("mistral", ("q_proj", "v_proj"), fused_graph=True),
    "qwen2": DecoderArchSpec("qwen2", ("q_proj", "v_proj"), fused_graph=True),
    "qwen3": DecoderArchSpec("qwen3", ("q_proj", "v_proj")),
    "phi3": DecoderArchSpec("phi3", ("qkv_proj",)),  # fused q/k/v projection
    "gemma": DecoderArchSpec("gemma", ("q_proj", "v_proj")),
    "gpt2": DecoderArchSpec("gpt2", ("c_attn",)),  # Conv1D; peft sets fan_in_fan_out
}

# peft task_type -> task name, for adapters that record one.
PEFT_TASK_TYPES = {t: spec.name for spec in TASKS.values() for t in spec.peft_task_types}

# Decoder tasks arrive with decoder export; name them so the error says "not yet" rather than "unknown".
_LATER_TASK_TYPES = {"SEQ_2_SEQ_LM": "text2text-generation"}


TASK_NAMES = tuple(TASKS)


def is_decoder_task(name: str) -> bool:
    return get_task(name).is_decoder


def task_from_architectures(archs: list[str]) -> str | None:
    """The task a base's config names (``architectures``); a bare ``...Model`` is feature extraction."""
    for a in archs:
        for spec in TASKS.values():
            if a.endswith(spec.architecture_suffixes or ("\0",)):
                return spec.name
    if archs and all(a.endswith("Model") for a in archs):
        return "feature-extraction"
    return None


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise UnsupportedError(
            f"task {name!r} is not supported; use one of: {', '.join(sorted(TASKS))}"
        ) from None


def get_arch(model_type: str, *, needs_remote_code: bool = False) -> ArchSpec | DecoderArchSpec:
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    if model_type in DECODER_ARCHITECTURES:
        return DECODER_ARCHITECTURES[model_type]
    hint = " (it needs remote code, which is never run)" if needs_remote_code else ""
    supported = sorted(ARCHITECTURES) + sorted(DECODER_ARCHITECTURES)
    raise UnsupportedError(f"architecture {model_type!r} is not supported{hint}; supported: {', '.join(supported)}")


def task_from_peft(task_type: str | None) -> str | None:
    if task_type is None:
        return None
    if task_type in PEFT_TASK_TYPES:
        return PEFT_TASK_TYPES[task_type]
    if task_type in _LATER_TASK_TYPES:
        raise UnsupportedError(
            f"adapter task_type {task_type} ({_LATER_TASK_TYPES[task_type]}) is not supported yet; "
            f"supported: {', '.join(sorted(TASKS))}"
        )
    return None


def input_names(arch: ArchSpec, type_vocab_size: int | None) -> tuple[str, ...]:
    names = ["input_ids", "attention_mask"]
    if arch.accepts_token_type_ids and (type_vocab_size or 0) > 1:
        names.append("token_type_ids")
    return tuple(names)
