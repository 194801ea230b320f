"""Parity metrics and gates on numpy arrays.

The PyTorch reference is computed once at export and stored, so the device-side ``verify`` runs this same
code with onnxruntime only. Every miss is returned in the verdict, never hidden.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class OutputInfo:
    name: str
    per_token: bool  # has a sequence axis: padded positions are excluded
    is_logits: bool


def _rows(a: np.ndarray, mask: np.ndarray | None, per_token: bool) -> np.ndarray:
    """Flatten to (rows, features): one row per example, or per non-padded token for per-token outputs."""
    a = np.asarray(a, dtype=np.float64)
    if per_token:
        return a[mask.astype(bool)] if mask is not None else a.reshape(-1, a.shape[-1])
    return a.reshape(a.shape[0], -1)


def output_metrics(
    got: list[np.ndarray], ref: list[np.ndarray], masks: list[np.ndarray], info: OutputInfo, thresholds: dict
) -> dict[str, Any]:
    g = np.concatenate([_rows(x, m, info.per_token) for x, m in zip(got, masks)])
    r = np.concatenate([_rows(x, m, info.per_token) for x, m in zip(ref, masks)])
    finite = bool(np.isfinite(g).all())
    diff = np.abs(g - r) if finite else np.full_like(r, np.inf)
    denom = np.linalg.norm(g, axis=1) * np.linalg.norm(r, axis=1)
    cos = np.where(denom > 0, (g * r).sum(axis=1) / np.maximum(denom, 1e-30), 1.0) if finite else np.zeros(len(r))
    m: dict[str, Any] = {
        "finite": finite,
        "n_values": int(r.size),
        "max_abs_diff": float(diff.max()) if r.size else 0.0,
        "mean_abs_diff": float(diff.mean()) if r.size else 0.0,
        "cosine_min": float(cos.min()) if len(cos) else 1.0,
        "cosine_mean": float(cos.mean()) if len(cos) else 1.0,
    }
    if "atol" in thresholds:
        from .tolerances import fp32_atol

        # Bundles from before atol_rms have a flat atol only (fp32_atol reads it as 0).
        atol = fp32_atol(float(np.sqrt((r**2).mean())) if r.size else 0.0, thresholds)
        m["atol_effective"] = atol
        bound = atol + thresholds["rtol"] * np.abs(r)
        m["n_over_tolerance"] = int((diff > bound).sum())
    if info.is_logits and r.shape[1] > 1:
        agree = g.argmax(axis=1) == r.argmax(axis=1)
        m["argmax_agreement"] = float(agree.mean())
        top2 = np.sort(r, axis=1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
        m["min_top2_margin"] = float(margin.min())
        if "clear_margin_rel" in thresholds:
            # Relative to the output's scale: quantization error grows with the logits' magnitude.
            m["clear_margin_abs"] = float(thresholds["clear_margin_rel"] * np.sqrt((r**2).mean()))
            clear = margin >= m["clear_margin_abs"]
            m["n_clear"] = int(clear.sum())
            m["argmax_agreement_clear"] = float(agree[clear].mean()) if clear.any() else 1.0
    return m


def gate_failures(name: str, m: dict[str, Any], thresholds: dict) -> list[str]:
    """Human-readable reasons an output misses its gate; empty when it passes."""
    fails = []
    if not m["finite"]:
        return [f"{name}: onnxruntime produced NaN or inf"]
    if "atol" in thresholds and m["n_over_tolerance"]:
        fails.append(
            f"{name}: {m['n_over_tolerance']} of {m['n_values']} values exceed "
            f"|ort - torch| <= {m['atol_effective']:.3g} + {thresholds['rtol']:g}*|torch| "
            f"(max abs diff {m['max_abs_diff']:.3g})"
        )
    if "min_cosine" in thresholds and m["cosine_min"] < thresholds["min_cosine"]:
        fails.append(f"{name}: min cosine {m['cosine_min']:.6f} < {thresholds['min_cosine']}")
    if "argmax_agreement" in thresholds and "argmax_agreement" in m:
        key = "argmax_agreement_clear" if "clear_margin_rel" in thresholds else "argmax_agreement"
        if m[key] < thresholds["argmax_agreement"]:
            where = f" on {m['n_clear']} clear-margin rows" if key.endswith("clear") else ""
            fails.append(f"{name}: argmax agreement {m[key]:.4f}{where} < {thresholds['argmax_agreement']}")
    return fails


def compare_variant(
    outputs: list[dict[str, np.ndarray]],
    reference: list[dict[str, np.ndarray]],
    masks: list[np.ndarray],
    infos: list[OutputInfo],
    thresholds: dict,
) -> dict[str, Any]:
    """One variant against the reference on every probe batch: metrics per output and the verdict."""
    per_output: dict[str, Any] = {}
    failures: list[str] = []
    for info in infos:
        got = [o[info.name] for o in outputs]
        ref = [r[info.name] for r in reference]
        shapes_ok = all(g.shape == r.shape for g, r in zip(got, ref))
        if not shapes_ok:
            failures.append(f"{info.name}: output shape {got[0].shape} differs from reference {ref[0].shape}")
            continue
        m = output_metrics(got, ref, masks, info, thresholds)
        per_output[info.name] = m
        failures += gate_failures(info.name, m, thresholds)
    return {"passed": not failures, "thresholds": thresholds, "outputs": per_output, "failures": failures}


def adapter_effect(
    merged: list[dict[str, np.ndarray]], base: list[dict[str, np.ndarray]], masks: list[np.ndarray],
    infos: list[OutputInfo],
) -> dict[str, float]:
    """Max |merged - base| per output over non-padded positions: how much the adapter changes the model."""
    out = {}
    for info in infos:
        diffs = [
            np.abs(_rows(m[info.name], k, info.per_token) - _rows(b[info.name], k, info.per_token)).max()
            for m, b, k in zip(merged, base, masks)
        ]
        out[info.name] = float(max(diffs))
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def compare_decoder(
    got_logits: list[np.ndarray], ref_logits: list[np.ndarray], masks: list[np.ndarray],
    got_tokens: list[np.ndarray], ref_tokens: list[np.ndarray], thresholds: dict,
    ref_margins: list[np.ndarray] | None = None,
) -> dict[str, Any]:
    """A decoder variant vs PyTorch: prompt logits (padded positions excluded) and greedy continuations."""
    info = OutputInfo("logits", True, True)
    m = output_metrics(got_logits, ref_logits, masks, info, thresholds)
    g = np.concatenate([_rows(x, k, True) for x, k in zip(got_logits, masks)])
    r = np.concatenate([_rows(x, k, True) for x, k in zip(ref_logits, masks)])
    if m["finite"]:
        lp, lq = _log_softmax(r), _log_softmax(g)
        m["mean_kl"] = float((np.exp(lp) * (lp - lq)).sum(axis=1).mean())
    else:
        m["mean_kl"] = float("inf")
    # A continuation that first departs from PyTorch where PyTorch itself had a near-tie (top-2 margin below
    # the clear margin) has not been damaged: from there on both follow equally likely paths. Those count as
    # matched for prefix_match_mean (quantized variants) and are reported as tie_divergences.
    clear_abs = m.get("clear_margin_abs")
    prefix, exact, ties = [], [], 0
    margins = ref_margins if ref_margins is not None else [None] * len(ref_tokens)
    for got, ref, marg in zip(got_tokens, ref_tokens, margins):
        for row, (a, b) in enumerate(zip(got, ref)):
            diff = np.nonzero(a != b)[0]
            exact.append(not len(diff))
            if len(diff) and clear_abs is not None and marg is not None and marg[row][diff[0]] < clear_abs:
                ties += 1
                prefix.append(1.0)
            else:
                prefix.append((diff[0] if len(diff) else len(b)) / len(b))
    m["greedy_exact"] = float(np.mean(exact))
    m["prefix_match_mean"] = float(np.mean(prefix))
    m["tie_divergences"] = ties
    fails = [f for f in gate_failures("logits", m, thresholds) if "cosine" not in f]
    if "greedy_exact" in thresholds and m["greedy_exact"] < thresholds["greedy_exact"]:
        fails.append(f"greedy tokens: {m['greedy_exact']:.0%} of prompts match PyTorch exactly "
                     f"< {thresholds['greedy_exact']:.0%}")
    if "min_prefix_match" in thresholds and m["prefix_match_mean"] < thresholds["min_prefix_match"]:
        fails.append(f"greedy tokens: mean matching prefix {m['prefix_match_mean']:.2f} < "
                     f"{thresholds['min_prefix_match']}")
    if "max_mean_kl" in thresholds and m["mean_kl"] > thresholds["max_mean_kl"]:
        fails.append(f"logits: mean KL(torch || onnx) {m['mean_kl']:.4g} > {thresholds['max_mean_kl']}")
    return {"passed": not fails, "thresholds": thresholds, "outputs": {"logits": m}, "failures": fails}
