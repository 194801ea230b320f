"""Every parity threshold in one place, each with where its number comes from.

The thresholds used for a bundle are written into its manifest, so ``verify`` on a device applies exactly
the numbers the export was judged by, even after this module changes. ``benchmarks/bench_gates.py`` measures
every gate's false rejects (a good set of real-model variants) and false accepts (a known-bad set); the
"measured" figures below are from it unless they name another source (AMD EPYC, x86 AVX2, no AVX-512/VNNI).
"""

from __future__ import annotations

from .tasks import TASKS

# fp32 ONNX vs PyTorch, elementwise on every output: |ort - torch| <= FP32_ATOL + FP32_RTOL * |torch|.
# transformers 5.x + torch.onnx.export measured <= 3e-6 max abs diff on BERT-family encoders and
# MiniLM-L6 with a merged LoRA measured 7e-8; 1e-4 leaves ~30x headroom for other CPUs/thread counts
# (reduction order changes the last bits) while a dropped adapter or a perturbed weight is >= 1e-3.
FP32_ATOL = 1e-4
# The relative term was 1e-3 until bench_gates showed it let a real defect through: 5% noise on one attention
# projection of the real MiniLM sentiment model moves its logits (~3) by 0.0022, inside 1e-3 x |3|. The largest
# relative fp32 error measured on a real model is 9.5e-6 / 1.6 (MiniLM, 3 labels) and 7.8e-5 / 8.5 (SmolLM2),
# so 1e-4 still leaves > 10x headroom and catches that perturbation.
FP32_RTOL = 1e-4
# The absolute term grows with the output's scale: max(FP32_ATOL, FP32_ATOL_RMS x rms(torch output)). Deep
# models accumulate more reduction-order noise, and on small logits the relative term does not help: SmolLM2-135M
# (30 layers, logits rms ~8.5) measured max |ort - torch| 8e-5 to 1.2e-4 on x86 AVX2 (no headroom under a flat
# 1e-4), and 2.2e-4 (219 of 3.5M values over 1e-4) with its weights moved off their GGUF grid. 1e-4 x rms gives
# SmolLM2 8.5e-4 (4-7x headroom); tiny test models (rms 0.05-3) keep the flat 1e-4. A dropped or perturbed
# adapter moves logits by >= 1e-3 x rms and still fails (tests/test_gates_bite.py).
FP32_ATOL_RMS = 1e-4

# fp16 (weights and activations fp16, inputs/outputs kept fp32): fp16 has an 11-bit mantissa (~5e-4
# relative), so per-row cosine stays above 0.9999 on MiniLM (measured max abs 7e-5 on logits ~0.05).
FP16_MIN_COSINE = 0.9999
FP16_ARGMAX_AGREEMENT = 1.0
# fp16 noise flips exact near-ties too (measured: 1 of 130 tokens of a tiny random token classifier with a
# top-2 gap of ~1e-4), so argmax is gated only where the PyTorch top-2 margin is clear. Margins are relative
# to the output's scale (rms of the reference logits) because quantization error scales with the logits:
# fp16 measured max abs error 0.0005-0.0014 x rms (MiniLM, tiny encoders); a flip needs the top-2 errors to
# differ by the margin, so 0.01 x rms is ~3.5x the worst pair. Agreement on every row is still reported.
FP16_CLEAR_MARGIN_REL = 0.01

# int8 dynamic per-channel: MiniLM logits measured max abs error 0.25 on logits of rms 3.4; argmax must agree
# wherever the fp32 reference is not a near-tie.
INT8_ARGMAX_AGREEMENT = 1.0
# A row's top-2 margin is "clear" at >= 0.2 x rms(reference logits): int8 measured max abs error
# 0.04-0.075 x rms (MiniLM sentiment 0.076, tiny token classifiers 0.041-0.053), so two errors can differ by
# ~0.15 x rms; a flip above 0.2 x rms is a real defect, one below is noise on a near-tie (reported, not gated).
INT8_CLEAR_MARGIN_REL = 0.2

# Swappable adapters: one session re-runs every configuration (base, each adapter) after the others; the
# outputs must equal the first run's. onnxruntime on CPU is deterministic for a fixed graph and thread count
# (measured 0.0 exactly); 1e-6 only absorbs reduction-order noise, a leaked adapter moves logits by >= 1e-3.
SWITCH_ATOL = 1e-6

# The adapter's own effect (max |merged - base| over the probes) must be at least this many times the
# fp32 absolute tolerance, or the fp32 gate could not tell the adapter was dropped (warned, not gated).
ADAPTER_EFFECT_FACTOR = 10.0


def fp32_atol(rms: float, thresholds: dict | None = None) -> float:
    """The absolute fp32 tolerance for outputs of this rms (see FP32_ATOL_RMS)."""
    t = thresholds or {"atol": FP32_ATOL, "atol_rms": FP32_ATOL_RMS}
    return max(t["atol"], t.get("atol_rms", 0.0) * rms)


def weak_adapter_warning(effect: float, required: float, name: str | None = None) -> str | None:
    """The report's warning when an adapter's effect is below what the fp32 gate can tell from noise."""
    if effect >= required:
        return None
    who = f"adapter {name}" if name else "the adapter"
    return (f"{who} barely changes the model (max |merged - base| {effect:.2g} < {required:g}); parity cannot "
            "show it survived export (an untrained or zero-initialised adapter?)")


def required_effect(arrays) -> float:
    """The smallest adapter effect (max |merged - base|) the fp32 gate can tell from noise, for these outputs."""
    import numpy as np

    values = [np.asarray(a, dtype=np.float64).ravel() for a in arrays]
    rms = float(np.sqrt(np.mean(np.concatenate(values) ** 2))) if values else 0.0
    return ADAPTER_EFFECT_FACTOR * fp32_atol(rms)


# Every quantized variant must reproduce the adapter's effect: adapter_kept is the least-squares share of
# (merged - base) on the probes that (variant - base) holds, 1 for the merged model, 0 for the base. Measured on
# the good set 0.66-1.24 (lowest: the 3-label model above, then 0.74 for an untrained head whose effect is tiny);
# adapter dropped -0.36 to 0.22 (SmolLM2 + LoRA q/v, whose int8 error is 6x the adapter's effect on the KL, is
# caught only by this gate). 0.5 is halfway.
MIN_ADAPTER_KEPT = 0.5

# Decoders (text-generation). fp32: the prompt logits under the fp32 gate above, and greedy continuations of
# GREEDY_TOKENS tokens identical to PyTorch for every probe prompt (measured max abs diff <= 3e-7 on seven
# tiny architectures, far below their smallest chosen top-2 margin).
DECODER_GREEDY_EXACT = 1.0
# Quantized decoders: top-1 agreement on prompt positions with a clear margin, mean KL(torch || onnx) over
# prompt positions, and the mean share of each greedy continuation that matches PyTorch before diverging.
# Measured on tiny random decoders (the only decoders available offline), see the parity tests.
DECODER_GATES = {
    "fp16": {"clear_margin_rel": 0.01, "argmax_agreement": 1.0, "max_mean_kl": 1e-3, "min_prefix_match": 0.75,
             "min_adapter_kept": MIN_ADAPTER_KEPT},
    "int8": {"clear_margin_rel": 0.2, "argmax_agreement": 0.98, "max_mean_kl": 0.02, "min_prefix_match": 0.5,
             "min_adapter_kept": MIN_ADAPTER_KEPT},
    # int4 weight-only (MatMulNBits, block 32): measured max abs logit error up to ~1x the logits rms on tiny
    # random decoders (no structure for 4 bits to keep), so only margins >= 1x rms count as clear there.
    "int4": {"clear_margin_rel": 1.0, "argmax_agreement": 0.95, "max_mean_kl": 0.05, "min_prefix_match": 0.25,
             "min_adapter_kept": MIN_ADAPTER_KEPT},
}


def decoder_thresholds_for(variant: str) -> dict[str, float]:
    if variant == "fp32":
        return {"atol": FP32_ATOL, "atol_rms": FP32_ATOL_RMS, "rtol": FP32_RTOL, "greedy_exact": DECODER_GREEDY_EXACT}
    if variant in DECODER_GATES:
        return dict(DECODER_GATES[variant])
    raise KeyError(f"no decoder thresholds for variant {variant!r}")


# Encoder gates per task, in the space the user consumes.
#
# Classification (sequence and token), quantized: probabilities. Measured int8 (U8U8) on the good set: largest
# class-probability change 0.002-0.151 (worst: MiniLM 3 labels, LoRA r=8 on q/k/v/dense with a fitted head, whose
# accuracy was unchanged: 8 sentences worse, 6 better of 269, p = 0.4; the NER recipe 0.114 with entity F1 0.870
# -> 0.871), mean KL <= 0.021 (the same 3-label model; every other case <= 7e-4). The known-bad int8 variants move a
# probability by >= 0.39 (adapter dropped) and 0.47 (zero points off by one, token classifier). 0.3 and 0.05 are
# about 2x the worst good case and below every harmful bad one. fp16 measured <= 0.001 and <= 3.4e-6: 0.01 and
# 1e-4 leave 10x / 30x, while fp16 of a dropped adapter moves a probability by >= 0.37.
# No logit cosine gates int8: on the 3-label model one probe's logits are [-0.045, 0.078, -0.033] (the issue's
# case), whose cosine is noise (0.76 min over all rows, 0.95 over rows not near zero) while its probabilities
# barely move. fp16 keeps a cosine >= 0.9999, on rows whose norm is >= 0.5 x the rms row norm (measured 1.0000).
CLASSIFICATION_GATES = {
    "fp16": {"max_prob_diff": 0.01, "max_mean_kl": 1e-4, "argmax_agreement": FP16_ARGMAX_AGREEMENT,
             "clear_margin_rel": FP16_CLEAR_MARGIN_REL, "min_cosine": FP16_MIN_COSINE, "cosine_min_norm_rel": 0.5,
             "min_adapter_kept": MIN_ADAPTER_KEPT},
    "int8": {"max_prob_diff": 0.3, "max_mean_kl": 0.05, "argmax_agreement": INT8_ARGMAX_AGREEMENT,
             "clear_margin_rel": INT8_CLEAR_MARGIN_REL, "min_adapter_kept": MIN_ADAPTER_KEPT},
}
# Embeddings (feature-extraction), quantized: what users do with them is rank neighbours. Measured int8 on real
# MiniLM + LoRA r=8 q/v: per-vector cosine 0.961 (tokens of last_hidden_state) and 0.969 (sentence_embedding),
# Spearman of the 28 pairwise similarities of the 8 probe texts 0.974, every clear nearest neighbour kept
# (int8 moves a pairwise cosine by up to 0.085, so a neighbour is "clear" at a gap >= 0.05; below that a swap is
# noise). Known-bad int8: adapter dropped 0.885 cosine (and adapter_kept 0.02), zero points off by one 0.05
# cosine / 0.60 Spearman / 3 of 5 clear neighbours lost. fp16 measured 1.0000 on all three.
EMBEDDING_GATES = {
    "fp16": {"min_cosine": FP16_MIN_COSINE, "min_neighbour_agreement": 1.0, "neighbour_clear_margin": 0.01,
             "min_rank_correlation": 0.999, "min_adapter_kept": MIN_ADAPTER_KEPT},
    "int8": {"min_cosine": 0.9, "min_neighbour_agreement": 1.0, "neighbour_clear_margin": 0.05,
             "min_rank_correlation": 0.9, "min_adapter_kept": MIN_ADAPTER_KEPT},
}
TASK_GATES = {"text-classification": CLASSIFICATION_GATES, "token-classification": CLASSIFICATION_GATES,
              "feature-extraction": EMBEDDING_GATES}


def thresholds_for(variant: str, task: str = "text-classification") -> dict[str, float]:
    """The gate for one variant of an encoder task, as stored in the manifest and re-applied by ``verify``."""
    if variant == "fp32":
        return {"atol": FP32_ATOL, "atol_rms": FP32_ATOL_RMS, "rtol": FP32_RTOL}
    gates = TASK_GATES.get(task, CLASSIFICATION_GATES)
    if variant in gates:
        return dict(gates[variant])
    raise KeyError(f"no thresholds for variant {variant!r}")


# Task-level parity (run): a variant fails when its task metric drops by more than the recipe's max_metric_drop
# AND the paired eval units show the drop is real: more units got worse than better with an exact one-sided
# McNemar p below this. Measured on the main job (MiniLM sentiment, 192 eval sentences, 2259 with train):
# every exact int8 scheme flips 13-16 of 2259 sentences (0.6%) in both directions, so on 192 sentences the
# observed drop ranged 0.000-0.026 with the quantizer's rounding alone (0 to 5 sentences net); a per-point
# gate failed or passed the same quality by luck. 0.05 is the usual level; a drop of 5 net sentences with no
# gain back (p = 0.031) still fails.
TASK_METRIC_SIGNIFICANCE = 0.05

# Embeddings: a text's nearest neighbour (by cosine, among the probe texts) counts for neighbour agreement only
# where its two nearest neighbours differ by at least this cosine in PyTorch (a near-tie swaps on any noise).
NEIGHBOUR_CLEAR_MARGIN = 0.01


def gate_for(task: str, variant: str) -> dict[str, float]:
    """The default gate of one variant of a task (decoders: text-generation)."""
    if task in TASKS and TASKS[task].is_decoder:
        return decoder_thresholds_for(variant)
    return thresholds_for(variant, task)


# Every threshold name a gate may hold: its kind decides its sane range ("min": a share or a cosine in [-1, 1];
# "max": a non-negative bound; "scale": a non-negative factor), and its meaning is documented in the manifest
# schema. A value out of range or not finite is refused, at export (--tolerance) and in a bundle's manifest
# (a NaN threshold would make a comparison fail open).
THRESHOLDS: dict[str, tuple[str, str]] = {
    "atol": ("max", "fp32: absolute tolerance, elementwise |ort - torch| <= max(atol, atol_rms x rms) + rtol x |torch|"),
    "atol_rms": ("scale", "fp32: the absolute tolerance grows to atol_rms x rms of the PyTorch output"),
    "rtol": ("scale", "fp32: relative tolerance"),
    "greedy_exact": ("min", "decoders fp32: share of prompts whose greedy tokens match PyTorch exactly"),
    "min_cosine": ("min", "lowest per-row cosine (row = example or token); for logits only rows whose norm is "
                   ">= cosine_min_norm_rel x the rms row norm"),
    "cosine_min_norm_rel": ("scale", "logits: rows with a smaller norm than this x the rms row norm are not "
                            "cosine-gated (the cosine of a near-zero vector is noise)"),
    "argmax_agreement": ("min", "share of clear-margin rows whose argmax matches PyTorch"),
    "clear_margin_rel": ("scale", "a row's top-2 margin is clear at >= this x rms of the reference logits"),
    "max_prob_diff": ("max", "classification: largest change of any class probability (softmax of the logits)"),
    "max_mean_kl": ("max", "mean KL(softmax torch || softmax onnx) per row (decoders: per prompt position)"),
    "min_neighbour_agreement": ("min", "embeddings: share of probe texts with a clear nearest neighbour (among "
                                "the probe texts) that keep it"),
    "neighbour_clear_margin": ("scale", "embeddings: a nearest neighbour is clear when the two nearest differ by "
                               ">= this cosine in PyTorch"),
    "min_rank_correlation": ("min", "embeddings: Spearman correlation of the pairwise cosine similarities of "
                             "the probe texts, onnx vs PyTorch"),
    "min_prefix_match": ("min", "quantized decoders: mean share of each greedy continuation matching PyTorch"),
    "min_adapter_kept": ("scale", "quantized variants: least-squares share of the adapter's effect (merged - base "
                         "on the probes) the variant reproduces; 1 = merged, 0 = adapter lost"),
}
THRESHOLD_KINDS = {name: kind for name, (kind, _) in THRESHOLDS.items()}
# A tolerance that lets anything through is no gate: loosening is allowed up to these bounds.
THRESHOLD_LIMITS = {"max": 1e3, "scale": 1e3}


def threshold_problem(name: str, value: object) -> str | None:
    """Why a threshold value cannot be a gate, or None when it can."""
    import math

    kind = THRESHOLD_KINDS.get(name)
    if kind is None:
        return f"unknown threshold {name!r}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"threshold {name} = {value!r} is not a finite number"
    if kind == "min" and not -1.0 <= value <= 1.0:
        return f"threshold {name} = {value!r} is outside [-1, 1]"
    if kind in THRESHOLD_LIMITS and not 0.0 <= value <= THRESHOLD_LIMITS[kind]:
        return f"threshold {name} = {value!r} is outside [0, {THRESHOLD_LIMITS[kind]:g}]"
    return None


def effective_gate(task: str, variant: str, overrides: tuple[tuple[str, float], ...] = ()
                   ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The gate of one variant with the user's overrides (``[VARIANT.]NAME``), and what was overridden:
    {name: {"value", "default"}}. Names are checked by check_overrides before the export starts."""
    gate = gate_for(task, variant)
    changed = {}
    for key, value in overrides:
        target, _, name = key.rpartition(".")
        if (target and target != variant) or name not in gate:
            continue
        changed[name] = {"value": float(value), "default": gate[name]}
        gate[name] = float(value)
    return gate, changed


def check_overrides(task: str, variants: tuple[str, ...], overrides: tuple[tuple[str, float], ...]) -> str | None:
    """Why these --tolerance overrides cannot apply to this export's variants, or None."""
    import difflib

    gates = {v: gate_for(task, v) for v in variants}
    for key, value in overrides:
        target, _, name = key.rpartition(".")
        if target and target not in gates:
            return f"--tolerance {key}: this export has no variant {target!r}; it has {', '.join(gates)}"
        names = sorted(set(gates[target]) if target else {n for g in gates.values() for n in g})
        if name not in names:
            near = difflib.get_close_matches(name, names, n=1)
            hint = f"did you mean {near[0]}? " if near else ""
            return (f"--tolerance {key}: no threshold {name!r} for {target or 'any variant'} of {task}; {hint}"
                    f"use one of {', '.join(names)}")
        problem = threshold_problem(name, value)
        if problem:
            return f"--tolerance {key}: {problem}"
    return None
