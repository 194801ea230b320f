"""Run every variant of a bundle on its stored probes and judge it against the stored PyTorch outputs.

Used by ``export`` on the staging folder before publishing and by ``verify`` on a device, so both apply
the same code and the same thresholds (those written in the manifest). Torch-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .bundle import (
    INPUTS_NPZ,
    MANIFEST,
    OUTPUTS_NPZ,
    PROBES_JSON,
    check_integrity,
    read_manifest,
)
from .cpu import cpu_features
from .errors import BundleError, ExporterError
from .probes import encode, load_arrays
from .reference import check_arrays, expected_outputs, load_reference
from .report import Report, new_report
from .runners import make_runner, runner_class
from .runtime import (
    bundle_session_config,
    bundle_tokenizer,
    check_providers,
    check_threads,
    in_place_cache,
    make_session,
    text_input_names,
)
from .signing import SIGNATURE, check_signature
from .swappable import adapters_summary
from .tasks import FamilySpec, family_of
from .tolerances import threshold_problem


def evaluate_variants(
    root: Path, manifest: dict[str, Any], names: list[str], providers: list[str] | None = None,
    threads: int | None = None, skip_adapters: dict[str, str] | None = None, loaded: tuple | None = None,
) -> dict[str, dict[str, Any]]:
    """Each variant on the stored probes against the stored PyTorch reference (and, for a bundle with
    swappable adapters, with each adapter active and switching between them). ``loaded``: load_reference's
    result, when the caller has it already."""
    probes, inputs, reference = loaded or load_reference(root, manifest)
    runner = make_runner(manifest, probes, inputs)
    # The base model's outputs on the probes (bundles from schema 2 on): they let a quantized variant show it kept
    # the adapter (parity.adapter_kept).
    base_file = (manifest.get("reference") or {}).get("base_outputs")
    base = None
    if base_file:
        base = load_arrays(root / base_file, len(reference))
        names_in_base = runner.base_output_names  # a family may store the base's outputs for some batches only
        check_arrays(root / base_file, base, expected_outputs(manifest, probes, inputs, names_in_base),
                     optional=names_in_base is not None)
    results = {}
    config = bundle_session_config(manifest)
    for name in names:
        entry = manifest["variants"][name]
        try:
            session = make_session(root / entry["file"], providers, threads, config)
            outputs = runner.run(session, in_place=in_place_cache(manifest, name))
        except ExporterError as e:
            results[name] = {"file": entry["file"], "passed": False, "thresholds": entry["thresholds"],
                             "outputs": {}, "failures": [str(e)]}
            continue
        result = runner.judge(outputs, reference, entry["thresholds"], base if name != "fp32" else None)
        section = manifest.get("adapters")
        if section and name != "fp32" and section.get("base_gate") == "fp32-only" and result["failures"]:
            result = {**result, "passed": True, "failures": [],
                      "base_not_gated": "the base's " + ", ".join(section.get("untrained_base_tensors") or [])
                      + " are untrained (random) without an adapter, so its quantized outputs are reported, not "
                      "gated; fp32 proves graph == base, each adapter is gated on every variant: "
                      + "; ".join(result["failures"])}
        results[name] = {"file": entry["file"], **result}
        if entry.get("ort_file"):
            _evaluate_ort(root, entry, runner, reference, base if name != "fp32" else None, results[name],
                          providers, threads, config, in_place_cache(manifest, name))
        if entry.get("user_tolerances"):
            results[name]["user_tolerances"] = entry["user_tolerances"]
        if section:
            _evaluate_adapters(root, manifest, runner, session, outputs, results[name], skip_adapters or {})
    return results


def _evaluate_ort(root: Path, entry: dict[str, Any], runner, reference, base, result: dict,
                  providers: list[str] | None, threads: int | None, config: dict[str, str], in_place: bool) -> None:
    """The variant's .ort file (export --ort-format) on the same probes, judged with the same thresholds."""
    try:
        session = make_session(root / entry["ort_file"], providers, threads, config)
        judged = runner.judge(runner.run(session, in_place=in_place), reference,
                              entry["thresholds"], base)
    except ExporterError as e:
        judged = {"passed": False, "outputs": {}, "failures": [str(e)]}
    result["ort"] = {"file": entry["ort_file"], **{k: judged[k] for k in ("passed", "outputs", "failures")}}
    if not judged["passed"] and not result.get("base_not_gated"):
        result["failures"] = [*result["failures"], *(f"ORT format ({entry['ort_file']}): {f}"
                                                     for f in judged["failures"])]
        result["passed"] = False


def _evaluate_adapters(root: Path, manifest: dict[str, Any], runner, session, base_outputs, result: dict,
                       skip: dict[str, str]) -> None:
    """Each adapter active vs its merged PyTorch reference, then every configuration again in reverse order:
    switching adapters within one session must give each one's own outputs."""
    from .probes import load_arrays
    from .swappable import ActiveAdapters
    from .tolerances import SWITCH_ATOL

    # The gate the bundle was exported with (older bundles did not record it: the default then).
    switch_atol = float(manifest["adapters"].get("switch_atol", SWITCH_ATOL))

    thresholds = result["thresholds"]
    items = manifest["adapters"]["items"]
    n = len(runner.inputs)
    per_adapter: dict[str, Any] = {}
    active: dict[str, Any] = {}
    first: dict[str | None, Any] = {None: base_outputs}
    for adapter, item in items.items():
        if adapter in skip:
            per_adapter[adapter] = {"passed": False, "outputs": {}, "failures": [f"not run: {skip[adapter]}"]}
            continue
        try:
            active[adapter] = ActiveAdapters(root, manifest, [adapter])
            reference = load_arrays(root / item["reference"], n)
            check_arrays(root / item["reference"], reference, expected_outputs(manifest, runner.probes, runner.inputs))
            outputs = runner.run(session, active[adapter].run_options)
        except ExporterError as e:
            per_adapter[adapter] = {"passed": False, "outputs": {}, "failures": [str(e)]}
            continue
        first[adapter] = outputs
        judged = runner.judge(outputs, reference, thresholds)
        per_adapter[adapter] = {k: judged[k] for k in ("passed", "outputs", "failures")}
    worst = 0.0
    for adapter in reversed(list(first)):
        again = runner.run(session, active[adapter].run_options if adapter else None)
        for a, b in zip(runner.arrays(again), runner.arrays(first[adapter])):
            worst = max(worst, float(np.abs(a.astype(np.float64) - b).max()) if a.shape == b.shape else np.inf)
    switching = {"passed": worst <= switch_atol, "max_abs_diff": worst, "configurations": len(first),
                 "atol": switch_atol}
    result["adapters"] = per_adapter
    result["switching"] = switching
    for adapter, r in per_adapter.items():
        result["failures"] += [f"adapter {adapter}: {f}" for f in r["failures"]]
    if not switching["passed"]:
        result["failures"].append(f"switching: re-running a configuration after others changed its outputs by "
                                  f"{worst:.3g} > {switch_atol:g} (adapter state leaks between runs)")
    result["passed"] = not result["failures"]


def read_probe_file(path: Path, family: FamilySpec) -> tuple[tuple[str, ...], int]:
    """verify --probe-texts FILE: the same format, and the same reading, as export's."""
    from .formats import read_text
    from .probes import parse_probe_file

    return parse_probe_file(read_text(Path(path), "probe file"), str(path), family.max_user_probes)


def check_on_texts(root: Path, manifest: dict[str, Any], texts: tuple[str, ...], names: list[str],
                   providers: list[str] | None = None, threads: int | None = None) -> dict[str, Any]:
    """Parity on the user's own texts, on the device. There is no PyTorch here, so the fp32 graph is the
    reference (verify proves it equals PyTorch on the stored probes, to ~1e-4 x the output's scale); every
    other variant is judged against it with the thresholds in the manifest."""
    if not manifest.get("tokenizer"):
        raise BundleError(f"{root}: exported with --no-tokenizer, so it cannot tokenize --probe-texts")
    kind = runner_class(manifest)
    probes, feeds = kind.user_probes(bundle_tokenizer(root, manifest), texts, manifest)
    runner = kind(manifest, probes, feeds)
    config = bundle_session_config(manifest)
    reference = runner.as_reference(runner.run(make_session(root / manifest["variants"]["fp32"]["file"],
                                                            providers, threads, config),
                                               in_place=in_place_cache(manifest, "fp32")))
    results = {}
    for name in names:
        if name == "fp32":
            continue
        entry = manifest["variants"][name]
        try:
            outputs = runner.run(make_session(root / entry["file"], providers, threads, config),
                                 in_place=in_place_cache(manifest, name))
        except ExporterError as e:
            results[name] = {"passed": False, "outputs": {}, "failures": [str(e)]}
            continue
        judged = runner.judge(outputs, reference, entry["thresholds"])
        results[name] = {k: judged[k] for k in ("passed", "outputs", "failures")}
    return {"count": len(texts), "reference": "fp32", "variants": results}


def check_tokenizer(root: Path, manifest: dict[str, Any], reference: tuple | None = None) -> list[str]:
    """Re-tokenize the stored probe texts; the ids must equal the stored ones, or inference would drift.
    ``reference``: load_reference's result, when the caller has it already."""
    probes, inputs, _ = reference or load_reference(root, manifest)
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
    threads: int | None = None, probe_texts: Path | None = None, trusted_key: Path | None = None,
) -> Report:
    """The Report for a published bundle: integrity, tokenizer, and every (or the chosen) variant's parity;
    with ``probe_texts``, also every quantized variant against fp32 on those texts (check_on_texts)."""
    root = Path(root)
    check_threads(threads)  # usage errors (exit 2), not a failed verification
    check_providers(providers)
    signature: dict[str, Any] = {"signed": (root / SIGNATURE).is_file(), "checked": False}
    if trusted_key is not None:  # before anything in the bundle is parsed
        signature = {"signed": True, "checked": True, "key_id": check_signature(root, trusted_key)}
    manifest = read_manifest(root)
    user_texts = None
    if probe_texts is not None:
        user_texts, total = read_probe_file(probe_texts, family_of(manifest))
    available = list(manifest["variants"])
    names = variants or available
    for v in names:
        if v not in available:
            raise BundleError(f"{root}: no variant {v!r}; this bundle has {', '.join(available)}")
    problems = check_integrity(root, manifest)
    bad_files = {p.split(":")[0] for p in problems}
    bad_gates = set()
    for v, entry in manifest["variants"].items():
        thresholds = entry.get("thresholds")
        found = ([threshold_problem(k, x) for k, x in thresholds.items()] if isinstance(thresholds, dict)
                 else ["thresholds is not an object"])
        for problem in filter(None, found):
            problems.append(f"{MANIFEST}: variants.{v}.thresholds: {problem} (the bundle was tampered with or is "
                            "damaged; re-export it)")
            bad_gates.add(v)
    tokenizer_file = (manifest.get("tokenizer") or {}).get("file")
    base_file = (manifest.get("reference") or {}).get("base_outputs")
    reference_ok = not ({PROBES_JSON, INPUTS_NPZ, OUTPUTS_NPZ, tokenizer_file, base_file} & bad_files)
    # Loaded once, for the tokenizer check and every variant (a damaged array is one error line).
    reference = load_reference(root, manifest) if reference_ok else None
    if reference is not None and tokenizer_file:
        problems += check_tokenizer(root, manifest, reference)
    runnable = []
    results: dict[str, dict[str, Any]] = {}
    for v in names:
        entry = manifest["variants"][v]
        files = [entry["file"], *entry.get("data_files", []), *([entry["ort_file"]] if entry.get("ort_file") else [])]
        broken = [f for f in files if f in bad_files]
        if broken or not reference_ok or v in bad_gates:
            why = (f"{broken[0]} failed the integrity check" if broken else "its thresholds are invalid"
                   if v in bad_gates else "the reference files are damaged")
            # Invalid thresholds are not echoed (a NaN is not even JSON).
            results[v] = {"file": entry["file"], "passed": False,
                          "thresholds": {} if v in bad_gates else entry["thresholds"],
                          "outputs": {}, "failures": [f"not run: {why}"]}
        else:
            runnable.append(v)
    skip = {}
    for adapter, item in ((manifest.get("adapters") or {}).get("items") or {}).items():
        broken = [f for f in (item["file"], item["reference"]) if f in bad_files]
        if broken:
            skip[adapter] = f"{broken[0]} failed the integrity check"
    if runnable:  # else the reference files are damaged: not even opened
        results.update(evaluate_variants(root, manifest, runnable, providers, threads, skip, reference))
    results = {v: results[v] for v in names}
    user = None
    if user_texts is not None:
        fp32_files = [manifest["variants"]["fp32"]["file"], *manifest["variants"]["fp32"].get("data_files", [])]
        if (set(fp32_files) | {tokenizer_file}) & bad_files:
            user = {"count": len(user_texts), "reference": "fp32", "variants": {},
                    "problems": ["not run: the fp32 reference or the tokenizer failed the integrity check"]}
        else:
            user = check_on_texts(root, manifest, user_texts, [v for v in runnable if v != "fp32"], providers,
                                  threads)
        user["file"] = Path(probe_texts).name
        user["texts_in_file"] = total
        for v, r in user["variants"].items():
            if not r["passed"]:
                results[v]["passed"] = False
                results[v]["failures"] += [f"your probes ({user['file']}, vs fp32): {f}" for f in r["failures"]]
    passed = not problems and all(r["passed"] for r in results.values()) and not (user or {}).get("problems")
    return new_report(
        "verify", manifest, results, str(root), passed=passed, problems=problems,
        cpu=cpu_features(), exported_on=(manifest.get("verified_on") or {}).get("cpu"),
        **({"adapters": adapters_summary(manifest)} if manifest.get("adapters") else {}),
        **({"user_probes": user} if user is not None else {}),
        signature=signature)

