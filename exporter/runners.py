"""The device half of each model family: run a bundle's probe batches through an onnxruntime session and judge
them against a reference. ``RUNNERS`` is keyed by the family names of ``tasks.FAMILIES``; the build half of a
family (``families.BUILDERS``) writes what these read. Torch-free.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .parity import compare_variant
from .probes import GREEDY_TOKENS, encode, user_batches
from .runtime import InPlaceStep, output_infos, run_session, session_step, text_input_names
from .tasks import family_of


class EncoderRunner:
    """One forward pass per stored batch; every output judged (encoders)."""

    family = "encoder"
    # Every batch of the base's stored outputs has every output.
    base_output_names: tuple[str, ...] | None = None

    def __init__(self, manifest: dict[str, Any], probes: dict, inputs: list[dict[str, np.ndarray]]) -> None:
        self.inputs = inputs
        self.probes = probes
        self.row_texts = probes.get("batches")
        self.infos = output_infos(manifest)
        self.output_names = [i.name for i in self.infos]
        self.masks = [b["attention_mask"] for b in inputs]

    @staticmethod
    def user_probes(tok, texts: tuple[str, ...], manifest: dict[str, Any]) -> tuple[dict, list[dict[str, np.ndarray]]]:
        """The probes and feeds of ``verify --probe-texts``: the texts in batches of mixed lengths."""
        batches = user_batches(len(texts))
        feeds = [encode(tok, [texts[i] for i in b], text_input_names(manifest)) for b in batches]
        return {"texts": list(texts), "batches": [list(b) for b in batches]}, feeds

    def run(self, session, run_options=None, in_place: bool = False) -> list[dict[str, np.ndarray]]:
        return [dict(zip(self.output_names, run_session(session, self.output_names, feeds, run_options)))
                for feeds in self.inputs]

    def as_reference(self, outputs) -> list[dict[str, np.ndarray]]:
        """A run's outputs in the stored reference's form (the fp32 graph as the reference)."""
        return outputs

    def judge(self, outputs, reference, thresholds: dict, base=None) -> dict[str, Any]:
        result = compare_variant(outputs, reference, self.masks, self.infos, thresholds, self.row_texts, base)
        return name_worst_probes(result, self.probes)

    def arrays(self, outputs) -> list[np.ndarray]:
        return [o[n] for o in outputs for n in self.output_names]


class DecoderRunner:
    """Re-generates the stored prompts greedily through a session; judges logits and tokens (decoders)."""

    family = "decoder"
    # The base's stored outputs: prompt logits, for the single-prompt batches only (the padded batch has none).
    base_output_names: tuple[str, ...] | None = ("logits",)

    def __init__(self, manifest: dict[str, Any], probes: dict, inputs: list[dict[str, np.ndarray]]) -> None:
        from .generation import DecoderIO

        self.inputs = inputs
        self.probes = probes
        self.dio = DecoderIO.from_json(manifest["decoder"])
        self.n_new = int(probes["max_new_tokens"])

    @staticmethod
    def user_probes(tok, texts: tuple[str, ...], manifest: dict[str, Any]) -> tuple[dict, list[dict[str, np.ndarray]]]:
        """Each prompt alone, then one left-padded batch of them all (as export's reference)."""
        batches = [(i,) for i in range(len(texts))] + [tuple(range(len(texts)))]
        feeds = [encode(tok, [texts[i] for i in b], text_input_names(manifest)) for b in batches]
        return {"texts": list(texts), "batches": [list(b) for b in batches], "max_new_tokens": GREEDY_TOKENS}, feeds

    def run(self, session, run_options=None, in_place: bool = False) -> list:
        """Greedy runs of every probe batch; ``in_place``: the KV cache in one buffer per layer, as ``generate``
        runs the variant (runtime.in_place_cache), so the gates judge that path."""
        from .generation import greedy

        def stepper():
            return (InPlaceStep(session, self.dio, run_options) if in_place
                    else session_step(session, self.dio, run_options))

        return [greedy(stepper(), self.dio, b["input_ids"], b["attention_mask"], self.n_new) for b in self.inputs]

    def as_reference(self, runs) -> list[dict[str, np.ndarray]]:
        return [{"logits": r.prefill_logits, "tokens": r.tokens, "margins": r.margins} for r in runs]

    def judge(self, runs, reference, thresholds: dict, base=None) -> dict[str, Any]:
        from .parity import compare_decoder

        result = compare_decoder([r.prefill_logits for r in runs], [r["logits"] for r in reference],
                                 [b["attention_mask"] for b in self.inputs], [r.tokens for r in runs],
                                 [r["tokens"] for r in reference], thresholds, [r["margins"] for r in reference],
                                 [b.get("logits") for b in base] if base is not None else None)
        return name_worst_probes(result, self.probes)

    def arrays(self, runs) -> list[np.ndarray]:
        return [a for r in runs for a in (r.prefill_logits, r.tokens.astype(np.float64))]


Runner = EncoderRunner | DecoderRunner
RUNNERS: dict[str, type[EncoderRunner] | type[DecoderRunner]] = {"encoder": EncoderRunner, "decoder": DecoderRunner}


def runner_class(manifest: dict[str, Any]) -> type[EncoderRunner] | type[DecoderRunner]:
    return RUNNERS[family_of(manifest).name]


def make_runner(manifest: dict[str, Any], probes: dict, inputs: list[dict[str, np.ndarray]]) -> Runner:
    return runner_class(manifest)(manifest, probes, inputs)


def name_worst_probes(result: dict[str, Any], probes: dict) -> dict[str, Any]:
    """Give each worst-probe entry its text (probes.json maps batch and example to a text), for the report."""
    texts, batches = probes.get("texts") or [], probes.get("batches") or []
    for m in result["outputs"].values():
        for entry in (m.get("worst") or {}).values():
            b, e = entry["batch"], entry["example"]
            index = batches[b][e] if b < len(batches) and e < len(batches[b]) else None
            entry["text"] = texts[index] if isinstance(index, int) and 0 <= index < len(texts) else None
    return result
