"""Every parity threshold in one place, each with where its number comes from.

The thresholds used for a bundle are written into its manifest, so ``verify`` on a device applies exactly
the numbers the export was judged by, even after this module changes.
"""

from __future__ import annotations

# fp32 ONNX vs PyTorch, elementwise on every output: |ort - torch| <= FP32_ATOL + FP32_RTOL * |torch|.
# transformers 5.x + torch.onnx.export measured <= 3e-6 max abs diff on BERT-family encoders and
# MiniLM-L6 with a merged LoRA measured 7e-8; 1e-4 leaves ~30x headroom for other CPUs/thread counts
# (reduction order changes the last bits) while a dropped adapter or a perturbed weight is >= 1e-3.
FP32_ATOL = 1e-4
FP32_RTOL = 1e-3
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

# int8 dynamic per-channel: MiniLM logits measured max abs error 0.25 on logits of rms 3.4. Cosine 0.99 per row is the issue's
# contract for logits and embeddings; argmax must agree wherever the fp32 reference is not a near-tie.
INT8_MIN_COSINE = 0.99
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


def required_effect(arrays) -> float:
    """The smallest adapter effect (max |merged - base|) the fp32 gate can tell from noise, for these outputs."""
    import numpy as np

    values = [np.asarray(a, dtype=np.float64).ravel() for a in arrays]
    rms = float(np.sqrt(np.mean(np.concatenate(values) ** 2))) if values else 0.0
    return ADAPTER_EFFECT_FACTOR * fp32_atol(rms)


# Decoders (text-generation). fp32: the prompt logits under the fp32 gate above, and greedy continuations of
# GREEDY_TOKENS tokens identical to PyTorch for every probe prompt (measured max abs diff <= 3e-7 on seven
# tiny architectures, far below their smallest chosen top-2 margin).
DECODER_GREEDY_EXACT = 1.0
# Quantized decoders: top-1 agreement on prompt positions with a clear margin, mean KL(torch || onnx) over
# prompt positions, and the mean share of each greedy continuation that matches PyTorch before diverging.
# Measured on tiny random decoders (the only decoders available offline), see the parity tests.
DECODER_GATES = {
    "fp16": {"clear_margin_rel": 0.01, "argmax_agreement": 1.0, "max_mean_kl": 1e-3, "min_prefix_match": 0.75},
    "int8": {"clear_margin_rel": 0.2, "argmax_agreement": 0.98, "max_mean_kl": 0.02, "min_prefix_match": 0.5},
    # int4 weight-only (MatMulNBits, block 32): measured max abs logit error up to ~1x the logits rms on tiny
    # random decoders (no structure for 4 bits to keep), so only margins >= 1x rms count as clear there.
    "int4": {"clear_margin_rel": 1.0, "argmax_agreement": 0.95, "max_mean_kl": 0.05, "min_prefix_match": 0.25},
}


def decoder_thresholds_for(variant: str) -> dict[str, float]:
    if variant == "fp32":
        return {"atol": FP32_ATOL, "atol_rms": FP32_ATOL_RMS, "rtol": FP32_RTOL, "greedy_exact": DECODER_GREEDY_EXACT}
    if variant in DECODER_GATES:
        return dict(DECODER_GATES[variant])
    raise KeyError(f"no decoder thresholds for variant {variant!r}")


def thresholds_for(variant: str) -> dict[str, float]:
    """The gate for one variant, as stored in the manifest and re-applied by ``verify``."""
    if variant == "fp32":
        return {"atol": FP32_ATOL, "atol_rms": FP32_ATOL_RMS, "rtol": FP32_RTOL}
    if variant == "fp16":
        return {
            "min_cosine": FP16_MIN_COSINE,
            "argmax_agreement": FP16_ARGMAX_AGREEMENT,
            "clear_margin_rel": FP16_CLEAR_MARGIN_REL,
        }
    if variant == "int8":
        return {
            "min_cosine": INT8_MIN_COSINE,
            "argmax_agreement": INT8_ARGMAX_AGREEMENT,
            "clear_margin_rel": INT8_CLEAR_MARGIN_REL,
        }
    raise KeyError(f"no thresholds for variant {variant!r}")


# Task-level parity (run): a variant fails when its task metric drops by more than the recipe's max_metric_drop
# AND the paired eval units show the drop is real: more units got worse than better with an exact one-sided
# McNemar p below this. Measured on the main job (MiniLM sentiment, 192 eval sentences, 2259 with train):
# every exact int8 scheme flips 13-16 of 2259 sentences (0.6%) in both directions, so on 192 sentences the
# observed drop ranged 0.000-0.026 with the quantizer's rounding alone (0 to 5 sentences net); a per-point
# gate failed or passed the same quality by luck. 0.05 is the usual level; a drop of 5 net sentences with no
# gain back (p = 0.031) still fails.
TASK_METRIC_SIGNIFICANCE = 0.05
