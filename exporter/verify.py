"""Run every variant of a bundle on its stored probes and judge it against the stored PyTorch outputs.

Used by ``export`` on the staging folder before publishing and by ``verify`` on a device, so both apply
the same code and the same thresholds (those written in the manifest). Torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .bundle import INPUTS_NPZ, OUTPUTS_NPZ, PROBES_JSON, check_integrity, read_manifest
from .errors import BundleError, ExporterError
from .parity import compare_variant
from .probes import encode, load_arrays
from .runtime import bundle_tokenizer, make_session, output_infos, text_input_names


def load_reference(root: Path) -> tuple[dict, list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    try:
        probes = json.loads((root / PROBES_JSON).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"{root / PROBES_JSON}: cannot read probes ({e}); re-export the bundle") from None
    n = len(probes["batches"])
    return probes, load_arrays(root / INPUTS_NPZ, n), load_arrays(root / OUTPUTS_NPZ, n)


def evaluate_variants(
    root: Path, manifest: dict[str, Any], names: list[str], providers: list[str] | None = None,
    threads: int | None = None,
) -> dict[str, dict[str, Any]]:
    if manifest.get("family") == "decoder":
        return evaluate_decoder_variants(root, manifest, names, providers, threads)
    _, inputs, reference = load_reference(root)
    infos = output_infos(manifest)
    masks = [b["attention_mask"] for b in inputs]
    output_names = [i.name for i in infos]
    results = {}
    for name in names:
        entry = manifest["variants"][name]
        try:
            session = make_session(root / entry["file"], providers, threads)
            outputs = [dict(zip(output_names, session.run(output_names, feeds))) for feeds in inputs]
        except ExporterError as e:
            results[name] = {"file": entry["file"], "passed": False, "thresholds": entry["thresholds"],
                             "outputs": {}, "failures": [str(e)]}
            continue
        result = compare_variant(outputs, reference, masks, infos, entry["thresholds"])
        results[name] = {"file": entry["file"], **result}
    return results


def evaluate_decoder_variants(
    root: Path, manifest: dict[str, Any], names: list[str], providers: list[str] | None = None,
    threads: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Each decoder variant re-generates the stored prompts greedily; logits and tokens are compared."""
    from .generation import DecoderIO, greedy
    from .parity import compare_decoder

    probes, inputs, reference = load_reference(root)
    dio = DecoderIO.from_json(manifest["decoder"])
    n_new = int(probes["max_new_tokens"])
    results = {}
    for name in names:
        entry = manifest["variants"][name]
        try:
            session = make_session(root / entry["file"], providers, threads)
        except ExporterError as e:
            results[name] = {"file": entry["file"], "passed": False, "thresholds": entry["thresholds"],
                             "outputs": {}, "failures": [str(e)]}
            continue

        def step(feeds, s=session):
            return dict(zip(dio.output_names, s.run(list(dio.output_names), {n: feeds[n] for n in dio.input_names})))

        runs = [greedy(step, dio, b["input_ids"], b["attention_mask"], n_new) for b in inputs]
        result = compare_decoder([r.prefill_logits for r in runs], [r["logits"] for r in reference],
                                 [b["attention_mask"] for b in inputs], [r.tokens for r in runs],
                                 [r["tokens"] for r in reference], entry["thresholds"],
                                 [r["margins"] for r in reference])
        results[name] = {"file": entry["file"], **result}
    return results


def check_tokenizer(root: Path, manifest: dict[str, Any]) -> list[str]:
    """Re-tokenize the stored probe texts; the ids must equal the stored ones, or inference would drift."""
    probes, inputs, _ = load_reference(root)
    tok = bundle_tokenizer(root, manifest)
    names = text_input_names(manifest)
    for i, batch in enumerate(probes["batches"]):
        feeds = encode(tok, [probes["texts"][j] for j in batch], names)
        for name in names:
            if feeds[name].shape != inputs[i][name].shape or not np.array_equal(feeds[name], inputs[i][name]):
                return [f"{manifest['tokenizer']['file']}: re-tokenizing probe batch {i} gives other {name} "
                        "than the stored reference (tokenizer changed)"]
    return []


def verify_bundle(
    root: Path | str, variants: list[str] | None = None, providers: list[str] | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """The Report for a published bundle: integrity, tokenizer, and every (or the chosen) variant's parity."""
    root = Path(root)
    manifest = read_manifest(root)
    available = list(manifest["variants"])
    names = variants or available
    for v in names:
        if v not in available:
            raise BundleError(f"{root}: no variant {v!r}; this bundle has {', '.join(available)}")
    problems = check_integrity(root, manifest)
    bad_files = {p.split(":")[0] for p in problems}
    tokenizer_file = (manifest.get("tokenizer") or {}).get("file")
    reference_ok = not ({PROBES_JSON, INPUTS_NPZ, OUTPUTS_NPZ, tokenizer_file} & bad_files)
    if reference_ok and tokenizer_file:
        problems += check_tokenizer(root, manifest)
    runnable = []
    results: dict[str, dict[str, Any]] = {}
    for v in names:
        entry = manifest["variants"][v]
        files = [entry["file"], *entry.get("data_files", [])]
        broken = [f for f in files if f in bad_files]
        if broken or not reference_ok:
            why = f"{broken[0]} failed the integrity check" if broken else "the reference files are damaged"
            results[v] = {"file": entry["file"], "passed": False, "thresholds": entry["thresholds"],
                          "outputs": {}, "failures": [f"not run: {why}"]}
        else:
            runnable.append(v)
    results.update(evaluate_variants(root, manifest, runnable, providers, threads))
    results = {v: results[v] for v in names}
    passed = not problems and all(r["passed"] for r in results.values())
    return {
        "schema_version": manifest["schema_version"],
        "command": "verify",
        "tool_version": __version__,
        "passed": passed,
        "bundle": str(root),
        "task": manifest["task"],
        "base": manifest["base"],
        "adapter": manifest["adapter"],
        "labels": manifest.get("labels"),
        "integrity": {"passed": not problems, "problems": problems},
        "variants": results,
        "adapter_effect": manifest.get("adapter_effect"),
        "warnings": [],
    }
