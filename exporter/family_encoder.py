"""The encoder family's builder (one forward pass per batch: classification, token labels, embeddings):
its probes, wrapper, export, reference, adapter effect and manifest fields; and the sentence-transformers
pooling a feature-extraction bundle applies."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UnsupportedError, UserInputError
from .family_base import Arrays, BuildContext, FamilyBuild
from .formats import read_json
from .parity import OutputInfo
from .tasks import TaskSpec
from .tolerances import required_effect

log = logging.getLogger(__name__)


class EncoderBuild(FamilyBuild):
    """One forward pass per probe batch; parity on every output (classification, token labels, embeddings)."""

    family = "encoder"

    def __init__(self, task: TaskSpec, pooling: dict | None = None, ort_fusion: str | None = None,
                 tune: bool = False, written_graph: bool = False) -> None:
        super().__init__(task)
        self.pooling = pooling
        self.written_graph = written_graph  # try encoder_graph.py where the model allows it
        self.ort_fusion = ort_fusion
        self.tune = tune
        self.min_ort: str | None = None  # what the graph written needs beyond its opset (set by export)
        self.infos = [OutputInfo(o.name, "sequence" in o.axes, o.is_logits) for o in task.outputs]
        self.output_names = tuple(i.name for i in self.infos)
        self.texts = None  # probes.ProbeTexts (None: synthetic ids)
        self.fast_tok = None
        self.max_length = 0

    @classmethod
    def for_export(cls, ctx: BuildContext) -> EncoderBuild:
        return cls(ctx.task, pooling_config(ctx.base) if ctx.task.name == "feature-extraction" else None,
                   ctx.arch.ort_fusion if ctx.spec.ort_fusions else None, tune=ctx.spec.ort_fusions,
                   written_graph=ctx.arch.written_graph)

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
        self.probes_json = probes.to_json()

    def probes_manifest(self) -> dict[str, Any]:
        return self.texts.manifest() if self.texts else {"source": "synthetic", "count": len(self.feeds)}

    # --- PyTorch ---------------------------------------------------------------------------------------------

    def prepare_model(self, model) -> None:
        """Trace the eager attention, not SDPA (the reference runs it too). Measured for issue 15 (MiniLM, AVX2,
        1 thread): SDPA exports NaN guards (IsNaN/Where per layer, 313 nodes vs 241) and runs 1.00-1.08x torch
        eager's latency in fp32; the eager graph 0.94-0.99x, and int8 0.92x of the SDPA graph's int8."""
        if getattr(model.config, "_attn_implementation", None) not in (None, "eager"):
            # An architecture without an eager path keeps what it has; parity judges the graph either way.
            with contextlib.suppress(ValueError, AttributeError):
                model.set_attn_implementation("eager")

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
        from .fusions import ATTENTION_MIN_ONNXRUNTIME
        from .onnx_export import example_feeds, export_onnx, min_onnxruntime

        written = None
        if self.written_graph and self.tune and self.ort_fusion:
            from .encoder_graph import export_encoder_graph, unsupported_reason

            reason = unsupported_reason(model, self.task)
            if reason is None:
                written = export_encoder_graph(model, self.task, self.names, self.pooling, path, opset)
            else:
                log.info("tracing the encoder: the written graph does not cover this model (%s)", reason)
        if written is not None:
            art, fused = written
        else:
            art = export_onnx(self.wrap(model), example_feeds(self.feeds[-1]), path, self.task, opset)
            fused = self._tune_for_ort(art, self.ort_fusion)
        self.min_ort = min_onnxruntime(opset, ATTENTION_MIN_ONNXRUNTIME) if "MultiHeadAttention" in fused else None
        return art

    def _tune_for_ort(self, art, fusion: str | None) -> dict[str, int]:
        """onnxruntime's fusions (``fusion``: its model_type) and fusions.tune_for_cpu, in one load and save of
        the graph; nothing for graphs with external data. A graph left unfused stays standard ONNX: its
        attention is not fused either. Returns the contrib op counts the graph now has."""
        if art.data_files or not self.tune:
            return {}
        if fusion:
            from .fusions import fuse_transformer

            return fuse_transformer(art.path, fusion, tune=True)
        from .fusions import tune_file_for_cpu

        tune_file_for_cpu(art.path)
        return {}

    def export_swappable(self, model, interface, path: Path, opset: int):
        import torch

        from .onnx_export import BATCH_AXIS, example_feeds
        from .swap_export import export_swappable, make_swappable

        self.min_ort = None  # swappable graphs get no MultiHeadAttention (standard ONNX but for fusions' If)
        wrapper = make_swappable(self.wrap(model), len(self.names), interface)
        example = example_feeds(self.feeds[-1])
        batch, seq = torch.export.Dim(BATCH_AXIS), torch.export.Dim("sequence")
        art = export_swappable(wrapper, model, interface, [torch.from_numpy(a) for a in example.values()],
                               [{0: batch, 1: seq} for _ in self.names], self.names, self.output_names, path, opset)
        self._tune_for_ort(art, None)  # swappable graphs are not fused
        return art

    def describe(self, model, tok) -> None:
        """What the manifest needs from the model, read before it is freed (nothing, for encoders)."""

    # --- the bundle -------------------------------------------------------------------------------------------

    def manifest_fields(self, labels, tok, pad_source: str | None) -> dict[str, Any]:
        """The manifest's description of an encoder graph: labels, inputs, outputs, pooling, tokenizer."""
        return {
            **({"min_onnxruntime": self.min_ort} if self.min_ort else {}),
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


def pooling_config(base) -> dict[str, Any]:  # base: loading.BaseRef
    """Sentence-transformers pooling of the base (modules.json), else mean pooling without normalisation."""
    default = {"mode": "mean", "normalize": False, "source": "default (no sentence-transformers config)"}
    if not base.is_local:
        return default
    root = Path(base.location)
    modules_file = root / "modules.json"
    if not modules_file.exists():
        return default
    try:
        modules = json.loads(modules_file.read_text())
    except json.JSONDecodeError:
        raise UserInputError(f"{modules_file}: not valid JSON; fix or remove it") from None
    mode, normalize = "mean", False
    for m in modules:
        kind = str(m.get("type", ""))
        if kind.endswith("Pooling"):
            pcfg = read_json(root / m.get("path", "") / "config.json", "pooling config")
            modes = [k for k, v in pcfg.items() if k.startswith("pooling_mode") and v]
            names = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                     "pooling_mode_max_tokens": "max"}
            if len(modes) != 1 or modes[0] not in names:
                raise UnsupportedError(f"{root}: pooling {modes} is not supported; supported: mean, cls, max")
            mode = names[modes[0]]
        elif kind.endswith("Normalize"):
            normalize = True
    return {"mode": mode, "normalize": normalize, "source": "modules.json"}
