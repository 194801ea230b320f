"""Parity metrics and gates on numpy arrays.

The PyTorch reference is computed once at export and stored, so the device-side ``verify`` runs this same
code with onnxruntime only. Every miss is returned in the verdict, never hidden.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# The report shows at most this many values of a row (class probabilities, or the first embedding values).
MAX_SHOWN = 8
# Quantiles of each output's per-row error kept in the report (0%, 3.125%, ..., 100%) for its plot.
DISTRIBUTION_POINTS = 33


@dataclass(frozen=True)
class OutputInfo:
    name: str
    per_token: bool  # has a sequence axis: padded positions are excluded
    is_logits: bool


def output_rows(a: np.ndarray, mask: np.ndarray | None, per_token: bool) -> np.ndarray:
    """Flatten to (rows, features): one row per example, or per non-padded token for per-token outputs."""
    a = np.asarray(a, dtype=np.float64)
    if per_token:
        return a[mask.astype(bool)] if mask is not None else a.reshape(-1, a.shape[-1])
    return a.reshape(a.shape[0], -1)


def _row_origin(shapes: list[tuple[int, ...]], masks: list[np.ndarray | None], per_token: bool) -> np.ndarray:
    """(batch, example, token) of every row output_rows yields, in the same order (token -1 for per-example rows)."""
    out = []
    for b, (shape, mask) in enumerate(zip(shapes, masks)):
        if per_token:
            keep = mask.astype(bool) if mask is not None else np.ones(shape[:2], dtype=bool)
            ex, tok = np.nonzero(keep)
        else:
            ex, tok = np.arange(shape[0]), np.full(shape[0], -1)
        out.append(np.stack([np.full(len(ex), b), ex, tok], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 3), dtype=np.int64)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _cosine_matrix(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    u = x / np.maximum(n, 1e-30)
    return u @ u.T


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (tied values share their mean rank), as Spearman's correlation needs."""
    order = np.argsort(x, kind="stable")
    sx = x[order]
    ranks = np.empty(len(x))
    start = 0
    for end in [*np.nonzero(np.diff(sx))[0] + 1, len(x)]:
        ranks[order[start:end]] = (start + end - 1) / 2
        start = end
    return ranks


def similarity_metrics(g: np.ndarray, r: np.ndarray, margin_abs: float) -> dict[str, Any]:
    """What users do with embeddings, compared: nearest neighbours and the ranking of pairwise cosine
    similarities over the probe texts (one row per distinct text)."""
    n = len(r)
    if n < 3:
        return {}
    sr, sg = _cosine_matrix(r), _cosine_matrix(g)
    np.fill_diagonal(sr, -np.inf)
    np.fill_diagonal(sg, -np.inf)
    nn_r, nn_g = sr.argmax(axis=1), sg.argmax(axis=1)
    top2 = np.sort(sr, axis=1)[:, -2:]
    # As for argmax: a text whose two nearest neighbours are near-tied in PyTorch may swap them on any noise.
    clear = (top2[:, 1] - top2[:, 0]) >= margin_abs
    agree = nn_r == nn_g
    iu = np.triu_indices(n, 1)
    a, b = _ranks(sr[iu]), _ranks(sg[iu])
    a, b = a - a.mean(), b - b.mean()
    rho = float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum())) if (a * a).sum() and (b * b).sum() else 1.0
    return {
        "n_texts": int(n),
        "neighbour_agreement": float(agree.mean()),
        "n_clear_neighbours": int(clear.sum()),
        "neighbour_agreement_clear": float(agree[clear].mean()) if clear.any() else 1.0,
        "similarity_max_abs_diff": float(np.abs(sr[iu] - sg[iu]).max()),
        "rank_correlation": rho,
    }


def output_metrics(
    got: list[np.ndarray], ref: list[np.ndarray], masks: list[np.ndarray], info: OutputInfo, thresholds: dict,
    row_texts: list[list[int]] | None = None,
) -> dict[str, Any]:
    """Every metric of one output over all probe batches; ``worst`` says which row each metric's worst value came
    from (batch, example, token) so the report can show that probe. ``row_texts`` (probes.json batches) names the
    text of each example, so similarity metrics count each distinct text once."""
    g = np.concatenate([output_rows(x, m, info.per_token) for x, m in zip(got, masks)])
    r = np.concatenate([output_rows(x, m, info.per_token) for x, m in zip(ref, masks)])
    origin = _row_origin([x.shape for x in ref], masks, info.per_token)
    finite = bool(np.isfinite(g).all())
    diff = np.abs(g - r) if finite else np.full_like(r, np.inf)
    denom = np.linalg.norm(g, axis=1) * np.linalg.norm(r, axis=1)
    cos = np.where(denom > 0, (g * r).sum(axis=1) / np.maximum(denom, 1e-30), 1.0) if finite else np.zeros(len(r))
    rms = float(np.sqrt((r**2).mean())) if r.size else 0.0
    worst: dict[str, dict[str, Any]] = {}

    def shown(row: np.ndarray) -> list[float]:
        # What the report prints for a row: class probabilities for a few labels, else the first values.
        if info.is_logits and row.shape[-1] <= MAX_SHOWN:
            return [round(float(x), 6) for x in np.exp(_log_softmax(row))]
        return [round(float(x), 6) for x in row[:MAX_SHOWN]]

    def note(metric: str, i: int, value: float) -> None:
        b, e, t = (int(v) for v in origin[i])
        entry: dict[str, Any] = {"batch": b, "example": e, "token": t, "value": float(value),
                                 "torch": shown(r[i]), "onnx": shown(g[i]) if finite else None}
        if info.is_logits and r.shape[-1] > MAX_SHOWN:
            top = np.argsort(-r[i])[:3]
            entry["torch_top"] = [int(k) for k in top]
            entry["onnx_top"] = [int(k) for k in np.argsort(-g[i])[:3]] if finite else None
        worst[metric] = entry

    def at(metric: str, row_values: np.ndarray, pick=np.argmax) -> None:
        if len(row_values):
            i = int(pick(row_values))
            note(metric, i, row_values[i])

    m: dict[str, Any] = {
        "finite": finite,
        "n_values": int(r.size),
        "n_rows": int(len(r)),
        "rms": rms,
        # null when onnxruntime produced NaN/inf (JSON has no inf; the verdict names it).
        "max_abs_diff": (float(diff.max()) if r.size else 0.0) if finite else None,
        "mean_abs_diff": (float(diff.mean()) if r.size else 0.0) if finite else None,
        "cosine_min": float(cos.min()) if len(cos) else 1.0,
        "cosine_mean": float(cos.mean()) if len(cos) else 1.0,
    }
    if r.size and finite:
        at("max_abs_diff", diff.max(axis=1))
        at("cosine_min", cos, np.argmin)
    if "atol" in thresholds:
        from .tolerances import fp32_atol

        # Bundles from before atol_rms have a flat atol only (fp32_atol reads it as 0).
        atol = fp32_atol(rms, thresholds)
        m["atol_effective"] = atol
        bound = atol + thresholds["rtol"] * np.abs(r)
        m["n_over_tolerance"] = int((diff > bound).sum())
    if "cosine_min_norm_rel" in thresholds and len(r):
        # A row's cosine measures damage only when the row is not tiny next to the error: a near-zero logit
        # vector ([-0.05, 0.08, -0.03]) has a cosine of noise. Rows under this share of the rms row norm are
        # reported in cosine_min, gated by the probability metrics instead.
        norms = np.linalg.norm(r, axis=1)
        cond = norms >= thresholds["cosine_min_norm_rel"] * float(np.sqrt((norms**2).mean()))
        m["n_cosine_rows"] = int(cond.sum())
        m["cosine_min_gated"] = float(cos[cond].min()) if cond.any() else 1.0
        if cond.any():
            i = int(np.nonzero(cond)[0][int(np.argmin(cos[cond]))])
            note("cosine_min_gated", i, cos[i])
    if info.is_logits and r.shape[1] > 1:
        agree = g.argmax(axis=1) == r.argmax(axis=1)
        m["argmax_agreement"] = float(agree.mean())
        top2 = np.sort(r, axis=1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
        m["min_top2_margin"] = float(margin.min())
        if finite:
            # Classification users consume probabilities: the largest change of any class probability and the
            # KL divergence of the predicted distribution, per row.
            lp, lq = _log_softmax(r), _log_softmax(g)
            dp = np.abs(np.exp(lq) - np.exp(lp)).max(axis=1)
            kl = np.maximum((np.exp(lp) * (lp - lq)).sum(axis=1), 0.0)
            m["prob_max_abs_diff"] = float(dp.max())
            m["mean_kl"] = float(kl.mean())
            m["max_kl"] = float(kl.max())
            at("prob_max_abs_diff", dp)
            at("max_kl", kl)
        if "clear_margin_rel" in thresholds:
            # Relative to the output's scale: quantization error grows with the logits' magnitude.
            m["clear_margin_abs"] = float(thresholds["clear_margin_rel"] * rms)
            clear = margin >= m["clear_margin_abs"]
            m["n_clear"] = int(clear.sum())
            m["argmax_agreement_clear"] = float(agree[clear].mean()) if clear.any() else 1.0
            flips = np.nonzero(clear & ~agree)[0]
            if len(flips):
                i = int(flips[np.argmax(margin[flips])])
                note("argmax_agreement_clear", i, margin[i])
    if not info.is_logits and not info.per_token and finite:
        # Pooled embeddings: one row per distinct probe text (the batches repeat texts with other padding).
        keep, seen = [], set()
        for i, (b, e, _) in enumerate(origin):
            text = row_texts[b][e] if row_texts is not None else i
            if text not in seen:
                seen.add(text)
                keep.append(i)
        from .tolerances import NEIGHBOUR_CLEAR_MARGIN

        m.update(similarity_metrics(g[keep], r[keep], thresholds.get("neighbour_clear_margin", NEIGHBOUR_CLEAR_MARGIN)))
    # The per-row error's distribution, for the report's plot: the metric the gate reads most directly.
    if not finite or not r.size:
        per_row, what = np.zeros(0), ""
    elif "atol" in thresholds:
        per_row, what = diff.max(axis=1), "max_abs_diff"
    elif "mean_kl" in m and "max_prob_diff" not in thresholds:
        per_row, what = kl, "kl"
    elif "prob_max_abs_diff" in m:
        per_row, what = dp, "prob_max_abs_diff"
    else:
        per_row, what = 1.0 - cos, "one_minus_cosine"
    if len(per_row) and finite:
        q = np.quantile(per_row, np.linspace(0, 1, DISTRIBUTION_POINTS))
        m["distribution"] = {"metric": what, "quantiles": [float(x) for x in q]}
    m["worst"] = worst
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
    if "min_cosine" in thresholds:
        gated = "cosine_min_gated" in m
        value = m["cosine_min_gated"] if gated else m["cosine_min"]
        if value < thresholds["min_cosine"]:
            where = f" on {m['n_cosine_rows']} of {m['n_rows']} rows not near zero" if gated else ""
            fails.append(f"{name}: min cosine {value:.6f}{where} < {thresholds['min_cosine']}")
    if "argmax_agreement" in thresholds and "argmax_agreement" in m:
        key = "argmax_agreement_clear" if "clear_margin_rel" in thresholds else "argmax_agreement"
        if m[key] < thresholds["argmax_agreement"]:
            where = f" on {m['n_clear']} clear-margin rows" if key.endswith("clear") else ""
            fails.append(f"{name}: argmax agreement {m[key]:.4f}{where} < {thresholds['argmax_agreement']}")
    if "max_prob_diff" in thresholds and "prob_max_abs_diff" in m and m["prob_max_abs_diff"] > thresholds["max_prob_diff"]:
        fails.append(f"{name}: a class probability changed by {m['prob_max_abs_diff']:.4f} > "
                     f"{thresholds['max_prob_diff']}")
    if "max_mean_kl" in thresholds and "mean_kl" in m and m["mean_kl"] > thresholds["max_mean_kl"]:
        fails.append(f"{name}: mean KL(torch || onnx) {m['mean_kl']:.4g} > {thresholds['max_mean_kl']}")
    if ("min_neighbour_agreement" in thresholds and "neighbour_agreement_clear" in m
            and m["neighbour_agreement_clear"] < thresholds["min_neighbour_agreement"]):
        fails.append(f"{name}: nearest-neighbour agreement {m['neighbour_agreement_clear']:.3f} on "
                     f"{m['n_clear_neighbours']} texts with a clear nearest neighbour < "
                     f"{thresholds['min_neighbour_agreement']}")
    if ("min_rank_correlation" in thresholds and "rank_correlation" in m
            and m["rank_correlation"] < thresholds["min_rank_correlation"]):
        fails.append(f"{name}: rank correlation of pairwise similarities {m['rank_correlation']:.4f} < "
                     f"{thresholds['min_rank_correlation']}")
    if "min_adapter_kept" in thresholds and "adapter_kept" in m and m["adapter_kept"] < thresholds["min_adapter_kept"]:
        fails.append(f"{name}: the variant keeps {m['adapter_kept']:.2f} of the adapter's effect on the probes "
                     f"< {thresholds['min_adapter_kept']} (1 = merged model, 0 = base: the adapter was lost)")
    return fails


def adapter_kept(got: list[np.ndarray], ref: list[np.ndarray], base: list[np.ndarray | None],
                 masks: list[np.ndarray], per_token: bool) -> float | None:
    """How much of the adapter's effect a variant reproduces: the least-squares coefficient of (variant - base)
    on (merged - base) over every compared value, 1 for the merged model, 0 for the base. Quantization noise is
    not aligned with the adapter's effect, so over thousands of values this tells a dropped adapter from a kept
    one even where the noise is larger than the effect. None when the effect is too small to measure."""
    from .tolerances import required_effect

    pairs = [(g, r, b, k) for g, r, b, k in zip(got, ref, base, masks) if b is not None and b.shape == r.shape]
    if not pairs:
        return None
    gv = np.concatenate([output_rows(g, k, per_token).ravel() for g, _, _, k in pairs])
    rv = np.concatenate([output_rows(r, k, per_token).ravel() for _, r, _, k in pairs])
    bv = np.concatenate([output_rows(b, k, per_token).ravel() for _, _, b, k in pairs])
    if not np.isfinite(gv).all():
        return None
    e = rv - bv
    if np.abs(e).max() < required_effect([rv]):
        return None
    return float((gv - bv) @ e / (e @ e))


def compare_variant(
    outputs: list[dict[str, np.ndarray]],
    reference: list[dict[str, np.ndarray]],
    masks: list[np.ndarray],
    infos: list[OutputInfo],
    thresholds: dict,
    row_texts: list[list[int]] | None = None,
    base: list[dict[str, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """One variant against the reference on every probe batch: metrics per output and the verdict. ``base``:
    the base model's outputs on the same probes (no adapter), for adapter_kept."""
    per_output: dict[str, Any] = {}
    failures: list[str] = []
    for info in infos:
        got = [o[info.name] for o in outputs]
        ref = [r[info.name] for r in reference]
        shapes_ok = all(g.shape == r.shape for g, r in zip(got, ref))
        if not shapes_ok:
            failures.append(f"{info.name}: output shape {got[0].shape} differs from reference {ref[0].shape}")
            continue
        m = output_metrics(got, ref, masks, info, thresholds, row_texts)
        if base is not None:
            kept = adapter_kept(got, ref, [b.get(info.name) for b in base], masks, info.per_token)
            if kept is not None:
                m["adapter_kept"] = kept
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
            np.abs(output_rows(m[info.name], k, info.per_token) - output_rows(b[info.name], k, info.per_token)).max()
            for m, b, k in zip(merged, base, masks)
        ]
        out[info.name] = float(max(diffs))
    return out


def compare_decoder(
    got_logits: list[np.ndarray], ref_logits: list[np.ndarray], masks: list[np.ndarray],
    got_tokens: list[np.ndarray], ref_tokens: list[np.ndarray], thresholds: dict,
    ref_margins: list[np.ndarray] | None = None, base_logits: list[np.ndarray | None] | None = None,
) -> dict[str, Any]:
    """A decoder variant vs PyTorch: prompt logits (padded positions excluded) and greedy continuations."""
    info = OutputInfo("logits", True, True)
    m = output_metrics(got_logits, ref_logits, masks, info, thresholds)
    if base_logits is not None:
        kept = adapter_kept(got_logits, ref_logits, base_logits, masks, True)
        if kept is not None:
            m["adapter_kept"] = kept
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
    return {"passed": not fails, "thresholds": thresholds, "outputs": {"logits": m}, "failures": fails}
