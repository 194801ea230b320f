"""The build half of each model family, in the style of optimum's per-architecture export configs: what its
probes are, how a model is wrapped, traced and exported (merged or with LoRA inputs), what its PyTorch
reference and the adapter's effect are, and the manifest fields that describe its graph. ``BUILDERS`` is keyed
by the family names of ``tasks.FAMILIES``; the device half (``runners.RUNNERS``) reads what these write.

One builder object serves one export (or one add-adapter): its probe step fixes the feeds every later step
runs on. The stage order itself is pipeline.py's (merged) and swap_build.py's (swappable).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import BASE_OUTPUTS_NPZ, INPUTS_NPZ, OUTPUTS_NPZ, PROBES_JSON, REFERENCE_DIR, write_json
from .errors import UserInputError
from .parity import OutputInfo, output_rows
from .spec import ExportSpec
from .stages import Stages
from .tasks import TaskSpec
from .tolerances import required_effect


@dataclass(frozen=True)
class BuildContext:
    """What every step of one export shares; it travels as one object instead of eight arguments."""

    spec: ExportSpec
    modes: tuple[str, ...]
    stages: Stages
    base: Any  # loading.BaseRef
    arch: Any  # tasks.ArchSpec | tasks.DecoderArchSpec
    task: TaskSpec
    staging: Path
    adapter: Any = None  # loading.AdapterRef: the merged one, or the first of the swappable ones


Arrays = list[dict[str, np.ndarray]]


class EncoderBuild:
    """One forward pass per probe batch; parity on every output (classification, token labels, embeddings)."""

    family = "encoder"

    def __init__(self, task: TaskSpec, pooling: dict | None = None) -> None:
        self.task, self.pooling = task, pooling
        self.infos = [OutputInfo(o.name, "sequence" in o.axes, o.is_logits) for o in task.outputs]
        self.output_names = tuple(i.name for i in self.infos)
        self.names: tuple[str, ...] = ()
        self.feeds: Arrays = []
        self.texts = None  # probes.ProbeTexts (None: synthetic ids)
        self.fast_tok = None
        self.max_length = 0
        self._probes_json: dict[str, Any] = {}

    @classmethod
    def for_export(cls, ctx: BuildContext) -> EncoderBuild:
        from .loading import pooling_config

        return cls(ctx.task, pooling_config(ctx.base) if ctx.task.name == "feature-extraction" else None)

    @classmethod
    def from_bundle(cls, task: TaskSpec, manifest: dict[str, Any], probes: dict, inputs: Arrays) -> EncoderBuild:
        """add-adapter: the probes a published bundle stored (already checked against its manifest)."""
        from .runtime import text_input_names

        b = cls(task, manifest.get("pooling"))
        b.names, b.feeds = text_input_names(manifest), list(inputs)
        return b

    # --- probes ---------------------------------------------------------------------------------------------

    def prepare_probes(self, ctx: BuildContext, tok, warnings: list[str]) -> None:
        """The probe batches, tokenized by the bundle's tokenizer.json (``tok`` None: --no-tokenizer)."""
        from .probes import load_tokenizer, synthetic_probes
        from .tasks import input_names
        from .tokenizer_files import encoder_probes

        config = ctx.base.config
        self.names = input_names(ctx.arch, config.get("type_vocab_size"))
        # RoBERTa's position ids start after the padding index: two positions fewer than the table.
        limits = [ctx.spec.max_length, config.get("max_position_embeddings", ctx.spec.max_length)
                  - (2 if ctx.base.model_type in ("roberta", "xlm-roberta") else 0)]
        if tok is None:
            self.max_length = min(limits)
            probes = synthetic_probes(self.names, self.max_length, int(config.get("vocab_size", 1000)),
                                      int(config.get("pad_token_id") or 0))
            warnings.append("exported without a tokenizer (--no-tokenizer): the probes are synthetic token ids and "
                            "`infer` needs token ids from your own tokenizer")
        else:
            if 0 < tok.model_max_length < 1_000_000:
                limits.append(tok.model_max_length)
            self.max_length = min(limits)
            self.fast_tok = load_tokenizer(ctx.staging / "tokenizer.json", self.max_length, tok.pad_token_id,
                                           tok.pad_token)
            probes, self.texts = encoder_probes(ctx.spec, self.fast_tok, self.names, self.max_length, warnings)
        self.feeds = list(probes.feeds)
        self._probes_json = probes.to_json()

    def probes_manifest(self) -> dict[str, Any]:
        return self.texts.manifest() if self.texts else {"source": "synthetic", "count": len(self.feeds)}

    # --- PyTorch ---------------------------------------------------------------------------------------------

    def prepare_model(self, model) -> None:
        """Nothing to rewrite in an encoder before tracing."""

    def wrap(self, model):
        from .onnx_export import make_wrapper

        return make_wrapper(model, self.task, self.names, self.pooling)

    def reference(self, model) -> Arrays:
        """The model's outputs on the probe batches."""
        from .onnx_export import run_torch

        wrapper = self.wrap(model)
        return [run_torch(wrapper, f, self.output_names) for f in self.feeds]

    def base_outputs(self, peft_model) -> Arrays:
        """The base's outputs (the adapter disabled), before merging."""
        with peft_model.disable_adapter():
            return self.reference(peft_model)

    def select(self, model, base: Arrays | None = None) -> tuple[Arrays, Arrays | None]:
        """The reference, and the base's outputs on the same batches (an encoder's probes are fixed already)."""
        return self.reference(model), base

    def effect(self, reference: Arrays, base: Arrays) -> dict[str, float]:
        """Max |with adapter - without| per output, over the rows parity compares."""
        from .parity import adapter_effect

        return adapter_effect(reference, base, [f["attention_mask"] for f in self.feeds], self.infos)

    def required(self, reference: Arrays) -> float:
        return required_effect([a for r in reference for a in r.values()])

    # --- ONNX ------------------------------------------------------------------------------------------------

    def export(self, model, path: Path, opset: int):
        from .onnx_export import example_feeds, export_onnx

        return export_onnx(self.wrap(model), example_feeds(self.feeds[-1]), path, self.task, opset)

    def export_swappable(self, model, interface, path: Path, opset: int):
        import torch

        from .onnx_export import example_feeds
        from .swap_export import export_swappable, make_swappable

        wrapper = make_swappable(self.wrap(model), len(self.names), interface)
        example = example_feeds(self.feeds[-1])
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
        return export_swappable(wrapper, model, interface, [torch.from_numpy(a) for a in example.values()],
                                [{0: batch, 1: seq} for _ in self.names], self.names, self.output_names, path, opset)

    def describe(self, model, tok) -> None:
        """What the manifest needs from the model, read before it is freed (nothing, for encoders)."""

    # --- the bundle -------------------------------------------------------------------------------------------

    def write_reference(self, staging: Path, reference: Arrays, base: Arrays | None) -> None:
        from .probes import save_arrays

        (staging / REFERENCE_DIR).mkdir(exist_ok=True)
        write_json(staging / PROBES_JSON, self._probes_json)
        save_arrays(staging / INPUTS_NPZ, self.feeds)
        save_arrays(staging / OUTPUTS_NPZ, reference)
        if base is not None:
            save_arrays(staging / BASE_OUTPUTS_NPZ, base)

    def manifest_fields(self, labels, tok, pad_source: str | None) -> dict[str, Any]:
        """The manifest's description of an encoder graph: labels, inputs, outputs, pooling, tokenizer."""
        return {
            "labels": list(labels) if labels else None,
            "inputs": [{"name": n, "dtype": "int64", "axes": ["batch", "sequence"]} for n in self.names],
            "outputs": [{"name": o.name, "dtype": "float32", "axes": list(o.axes), "is_logits": o.is_logits}
                        for o in self.task.outputs],
            "pooling": self.pooling,
            "tokenizer": None if tok is None else {"file": "tokenizer.json", "max_length": self.max_length,
                                                   "pad_id": tok.pad_token_id, "pad_token": tok.pad_token,
                                                   "pad_source": pad_source},
        }

    # --- the task metric of `run` ------------------------------------------------------------------------------

    def eval_set(self, ctx: BuildContext, tok, labels):
        from .taskeval import PRIMARY_METRIC
        from .taskeval import prepare as prepare_eval

        if ctx.task.name not in PRIMARY_METRIC or self.fast_tok is None:
            return None
        return prepare_eval(ctx.task.name, ctx.spec.task_eval, labels, self.fast_tok, self.names)

    def torch_logits(self, model):
        from .onnx_export import run_torch

        wrapper = self.wrap(model)
        return lambda feeds: run_torch(wrapper, feeds, self.output_names)["logits"]

    def onnx_logits(self, session, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return session.run(["logits"], feeds)[0]


class DecoderBuild:
    """A causal LM exported with a KV cache; its reference is the prompt logits and greedy continuations."""

    family = "decoder"

    def __init__(self, task: TaskSpec, dio=None) -> None:
        self.task, self.dio = task, dio
        self.names: tuple[str, ...] = ("input_ids", "attention_mask")
        self.feeds: Arrays = []
        self.prompts = None  # tokenizer_files.DecoderPrompts
        self.max_new_tokens = 0
        self._probes_json: dict[str, Any] = {}
        self._chosen: list[int] = []
        self._eos_ids: list[int] = []

    @classmethod
    def for_export(cls, ctx: BuildContext) -> DecoderBuild:
        return cls(ctx.task)

    @classmethod
    def from_bundle(cls, task: TaskSpec, manifest: dict[str, Any], probes: dict, inputs: Arrays) -> DecoderBuild:
        from .generation import DecoderIO

        b = cls(task, DecoderIO.from_json(manifest["decoder"]))
        b.feeds, b.max_new_tokens = list(inputs), int(probes["max_new_tokens"])
        return b

    # --- probes ---------------------------------------------------------------------------------------------

    def prepare_probes(self, ctx: BuildContext, tok, warnings: list[str]) -> None:
        """The candidate prompts, each tokenized alone; ``select`` keeps the clearest and adds a padded batch."""
        from .probes import GREEDY_TOKENS
        from .tokenizer_files import decoder_prompts

        if tok is None:
            raise UserInputError("--no-tokenizer is for encoder tasks; a text-generation bundle needs its tokenizer")
        self.prompts = decoder_prompts(ctx.spec, ctx.base, tok, ctx.staging, warnings)
        self.names, self.max_new_tokens = self.prompts.names, GREEDY_TOKENS

    def probes_manifest(self) -> dict[str, Any]:
        return self.prompts.prompts.manifest()

    # --- PyTorch ---------------------------------------------------------------------------------------------

    def prepare_model(self, model) -> None:
        from .decoder import conv1d_to_linear

        conv1d_to_linear(model)  # GPT-2: Gemm would escape int4; Linear exports as MatMul

    def wrap(self, model):
        from .decoder import decoder_io, make_decoder_wrapper

        if self.dio is None:
            self.dio = decoder_io(model)
        return make_decoder_wrapper(model, self.dio)

    def _step(self, model):
        from .decoder import torch_step

        wrapper = self.wrap(model)
        return torch_step(wrapper, self.dio)

    def reference(self, model) -> Arrays:
        """Greedy continuations of the fixed probe batches."""
        from .generation import greedy, run_arrays

        step = self._step(model)
        return run_arrays([greedy(step, self.dio, f["input_ids"], f["attention_mask"], self.max_new_tokens)
                           for f in self.feeds])

    def base_outputs(self, peft_model) -> Arrays:
        """The base's prompt logits (the adapter disabled) for every candidate prompt, before merging."""
        import torch

        inner = peft_model.get_base_model()
        with peft_model.disable_adapter(), torch.inference_mode():
            return [{"logits": inner(input_ids=torch.from_numpy(f["input_ids"]),
                                     attention_mask=torch.from_numpy(f["attention_mask"])).logits.float().numpy()}
                    for f in self.prompts.singles]

    def select(self, model, base: Arrays | None = None) -> tuple[Arrays, Arrays | None]:
        """Choose the prompts (built-in ones: the least tied greedy paths), add their left-padded batch, and
        return the greedy reference with the base's logits for the same batches (the padded batch has none)."""
        from .generation import run_arrays
        from .tokenizer_files import choose_prompts

        p = self.prompts
        chosen, batches, feeds, runs = choose_prompts(self._step(model), self.dio, p.fast_tok, self.names,
                                                      p.prompts, p.singles)
        self._chosen, self.feeds = list(chosen), list(feeds)
        self._probes_json = {"texts": list(p.prompts.texts), "batches": [list(b) for b in batches],
                             "max_length": p.max_length, "max_new_tokens": self.max_new_tokens,
                             "min_top2_margin": float(min(r.margins.min() for r in runs)), "source": p.prompts.source}
        aligned = None if base is None else [base[i] for i in chosen] + [{}]
        return run_arrays(runs), aligned

    def _logit_rows(self, arrays: Arrays) -> list[tuple[int, np.ndarray]]:
        return [(k, output_rows(a["logits"], self.feeds[k]["attention_mask"], True))
                for k, a in enumerate(arrays) if "logits" in a]

    def effect(self, reference: Arrays, base: Arrays) -> dict[str, float]:
        """Max |with adapter - without| over the prompt positions of the batches the base has logits for."""
        ref = dict(self._logit_rows(reference))
        return {"logits": float(max(np.abs(ref[k] - b).max() for k, b in self._logit_rows(base)))}

    def required(self, reference: Arrays) -> float:
        return required_effect([rows for _, rows in self._logit_rows(reference)])

    # --- ONNX ------------------------------------------------------------------------------------------------

    def export(self, model, path: Path, opset: int):
        from .decoder import export_decoder

        wrapper = self.wrap(model)
        return export_decoder(wrapper, self.dio, path, opset)

    def export_swappable(self, model, interface, path: Path, opset: int):
        from .decoder import decoder_example
        from .swap_export import export_swappable, make_swappable

        wrapper = make_swappable(self.wrap(model), len(self.dio.input_names), interface)
        example, shapes = decoder_example(self.dio)
        return export_swappable(wrapper, model, interface, example, shapes, self.dio.input_names,
                                self.dio.output_names, path, opset)

    def describe(self, model, tok) -> None:
        from .tokenizer_files import eos_token_ids

        self._eos_ids = eos_token_ids(model.config, tok)

    # --- the bundle -------------------------------------------------------------------------------------------

    def write_reference(self, staging: Path, reference: Arrays, base: Arrays | None) -> None:
        from .probes import save_arrays

        (staging / REFERENCE_DIR).mkdir(exist_ok=True)
        write_json(staging / PROBES_JSON, self._probes_json)
        save_arrays(staging / INPUTS_NPZ, self.feeds)
        save_arrays(staging / OUTPUTS_NPZ, reference)
        if base is not None:
            save_arrays(staging / BASE_OUTPUTS_NPZ, [{k: v.astype(np.float32) for k, v in b.items()} for b in base])

    def manifest_fields(self, labels, tok, pad_source: str | None) -> dict[str, Any]:
        """The manifest's description of a KV-cache decoder graph and what generate needs."""
        from .tokenizer_files import check_chat_template

        chat_template = getattr(tok, "chat_template", None)
        if isinstance(chat_template, str):
            check_chat_template(chat_template, tok)
        dio, p = self.dio, self.prompts
        return {
            "family": "decoder",
            "labels": None,
            "decoder": dio.to_json(),
            "inputs": [{"name": n, "dtype": "float32" if n.startswith("past") else "int64",
                        "axes": (["batch", "num_kv_heads", "past_sequence", "head_dim"] if n.startswith("past") else
                                 ["batch", "total_sequence"] if n == "attention_mask" else ["batch", "sequence"])}
                       for n in dio.input_names],
            "outputs": [{"name": n, "dtype": "float32", "is_logits": n == "logits",
                         "axes": ["batch", "sequence", "vocab"] if n == "logits" else
                         ["batch", "num_kv_heads", "total_sequence", "head_dim"]} for n in dio.output_names],
            "pooling": None,
            "tokenizer": {"file": "tokenizer.json", "max_length": p.max_length, "pad_id": tok.pad_token_id,
                          "pad_token": tok.pad_token, "pad_source": pad_source, "padding_side": "left"},
            "generation": {"eos_token_ids": self._eos_ids, "context_length": int(p.positions),
                           "chat_template": chat_template if isinstance(chat_template, str) else None,
                           "bos_token": tok.bos_token, "eos_token": tok.eos_token},
        }

    # --- the task metric of `run` ------------------------------------------------------------------------------

    def eval_set(self, ctx: BuildContext, tok, labels):
        """The recipe's eval rows as fine-tuning saw them (``runtime.chat_prompt``, then the response and EOS),
        tokenized with the bundle's own tokenizer."""
        from tokenizers import Tokenizer

        from .runtime import chat_prompt
        from .taskeval import prepare_decoder

        template = getattr(tok, "chat_template", None)
        spec = ctx.spec.task_eval
        return prepare_decoder(spec, Tokenizer.from_file(str(ctx.staging / "tokenizer.json")),
                               lambda p: chat_prompt(template, p, tok.bos_token or "", tok.eos_token or ""),
                               tok.eos_token or "", spec.max_length)

    def torch_logits(self, model):
        from .generation import prefill_feeds

        step = self._step(model)
        return lambda f: step(prefill_feeds(self.dio, f["input_ids"], f["attention_mask"]))["logits"]

    def onnx_logits(self, session, feeds: dict[str, np.ndarray]) -> np.ndarray:
        from .generation import prefill_feeds

        return session.run(["logits"], prefill_feeds(self.dio, feeds["input_ids"], feeds["attention_mask"]))[0]


Builder = EncoderBuild | DecoderBuild
BUILDERS: dict[str, type[EncoderBuild] | type[DecoderBuild]] = {"encoder": EncoderBuild, "decoder": DecoderBuild}


def builder_for(ctx: BuildContext) -> Builder:
    return BUILDERS[ctx.task.family].for_export(ctx)


def builder_from_bundle(task: TaskSpec, manifest: dict[str, Any], probes: dict, inputs: Arrays) -> Builder:
    return BUILDERS[task.family].from_bundle(task, manifest, probes, inputs)
