"""The decoder family's builder (causal LMs with a KV cache): its prompts, wrapper, export, greedy reference,
adapter effect, manifest fields and the task metric's prompts."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from .family_base import Arrays, BuildContext, FamilyBuild
from .parity import output_rows
from .tasks import TaskSpec
from .tolerances import required_effect

log = logging.getLogger(__name__)


class DecoderBuild(FamilyBuild):
    """A causal LM exported with a KV cache; its reference is the prompt logits and greedy continuations."""

    family = "decoder"

    def __init__(self, task: TaskSpec, dio=None, fused_graph: bool = False) -> None:
        super().__init__(task)
        self.dio = dio
        self.fused_graph = fused_graph  # try decoder_graph.py where the model allows it
        self.min_ort: str | None = None  # what the graph written needs beyond its opset (set by export)
        self.in_place_cache = False  # the graph written appends to the KV buffers it is given (set by export)
        self.names = ("input_ids", "attention_mask")
        self.prompts = None  # tokenizer_files.DecoderPrompts
        self.max_new_tokens = 0
        self._eos_ids: list[int] = []

    @classmethod
    def for_export(cls, ctx: BuildContext) -> DecoderBuild:
        return cls(ctx.task, fused_graph=ctx.arch.fused_graph and ctx.spec.ort_fusions)

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

        # tok is never None here: pipeline refuses --no-tokenizer for families whose tokenizer is not optional.
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
        self.feeds = list(feeds)
        self.probes_json = {"texts": list(p.prompts.texts), "batches": [list(b) for b in batches],
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

        self.min_ort, self.in_place_cache = None, False
        if self.fused_graph:
            from .decoder_graph import MIN_ONNXRUNTIME, export_fused_decoder, unsupported_reason
            from .onnx_export import min_onnxruntime

            reason = unsupported_reason(model)
            if reason is None:
                art = export_fused_decoder(model, self.dio, path, opset)
                self.min_ort = min_onnxruntime(opset, MIN_ONNXRUNTIME)
                self.in_place_cache = True
                return art
            log.info("tracing the decoder: the fused graph does not cover this model (%s)", reason)
        wrapper = self.wrap(model)
        return export_decoder(wrapper, self.dio, path, opset)

    def export_swappable(self, model, interface, path: Path, opset: int):
        from .decoder import decoder_example
        from .swap_export import export_swappable, make_swappable

        # traced: the adapter interface needs the traced graph's LoRA inputs
        self.min_ort, self.in_place_cache = None, False
        wrapper = make_swappable(self.wrap(model), len(self.dio.input_names), interface)
        example, shapes = decoder_example(self.dio)
        return export_swappable(wrapper, model, interface, example, shapes, self.dio.input_names,
                                self.dio.output_names, path, opset)

    def describe(self, model, tok) -> None:
        from .tokenizer_files import eos_token_ids

        self._eos_ids = eos_token_ids(model.config, tok)

    # --- the bundle -------------------------------------------------------------------------------------------

    def manifest_fields(self, labels, tok, pad_source: str | None) -> dict[str, Any]:
        """The manifest's description of a KV-cache decoder graph and what generate needs."""
        from .tokenizer_files import check_chat_template

        chat_template = getattr(tok, "chat_template", None)
        if isinstance(chat_template, str):
            check_chat_template(chat_template, tok)
        dio, p = self.dio, self.prompts
        return {
            **({"min_onnxruntime": self.min_ort} if self.min_ort else {}),
            "family": "decoder",
            "labels": None,
            "decoder": {**dio.to_json(), **({"in_place_cache": True} if self.in_place_cache else {})},
            "inputs": [{"name": n, "dtype": "float32" if n.startswith("past") else "int64",
                        "axes": (["batch", "num_kv_heads", "past_sequence", "head_dim"] if n.startswith("past") else
                                 ["batch", "total_sequence"] if n == "attention_mask" else ["batch", "sequence"])}
                       for n in dio.input_names],
            "outputs": [{"name": n, "dtype": "float32", "is_logits": n == "logits",
                         "axes": ["batch", "sequence", "vocab"] if n == "logits" else
                         ["batch", "num_kv_heads", "total_sequence", "head_dim"]} for n in dio.output_names],
            "pooling": None,
            "tokenizer": {"file": "tokenizer.json", "max_length": p.max_length, "pad_id": tok.pad_token_id,
                          "pad_token": tok.pad_token, "pad_source": pad_source,
                          "padding_side": self.task.family_spec.padding_side},
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
