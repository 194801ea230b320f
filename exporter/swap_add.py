"""``add-adapter``: one more swappable adapter for a published ``--keep-adapters`` bundle, without re-exporting
the base. The bundle's own base outputs prove the base given is the one it was exported from; the new adapter's
merged PyTorch reference is computed independently of its conversion; the updated bundle is staged, verified
(every variant, every adapter, switching) and published atomically, or the bundle is left as it was."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import (
    INPUTS_NPZ,
    PARITY_JSON,
    check_integrity,
    file_hashes,
    make_staging,
    output_lock,
    publish,
    read_manifest,
    reject,
    write_manifest,
)
from .errors import BundleError, MismatchError, ParityError, TamperedBundleError, UserInputError, require_full
from .report import Report, new_report
from .swap_build import (
    adapter_entry,
    check_adapter_name,
    prepare_adapter,
    set_parameters,
    write_adapter,
)
from .swappable import ADAPTER_SUFFIX, Interface, adapters_summary, check_tensors
from .tolerances import FP32_ATOL, FP32_RTOL, weak_adapter_warning


def _check_ids_fit(model, feeds: list[dict[str, np.ndarray]], root: Path) -> None:
    """The bundle's stored probe ids must index the base's tables (else torch raises an IndexError)."""
    limits = {"input_ids": model.get_input_embeddings().num_embeddings,
              "token_type_ids": getattr(model.config, "type_vocab_size", None)}
    for i, feeds_i in enumerate(feeds):
        for name, limit in limits.items():
            a = feeds_i.get(name)
            if a is not None and limit and a.size and int(a.max()) >= limit:
                raise TamperedBundleError(f"{root / INPUTS_NPZ}: batch {i} {name} reaches {int(a.max())}, the base "
                                          f"has {limit}; the bundle is damaged or tampered with, re-export it")


def add_adapter(bundle: Path, adapter_path: Path, name: str | None = None, *, base: str | None = None,
                allow_pickle: bool = False, trust_remote_code: bool = False, progress=None,
                sign: Path | None = None) -> Report:
    """Convert one more peft adapter for a swappable bundle; OUT is replaced only when everything passes.
    The manifest changes, so a signed bundle must be re-signed (``sign``) or it is published unsigned."""
    require_full("add-adapter")
    if sign is not None:
        from .signing import load_private_key

        load_private_key(sign)
    from .stages import quiet_libraries
    from .staging import disk_error

    root = Path(bundle)
    name = check_adapter_name(name) if name else check_adapter_name(Path(adapter_path).resolve().name)
    if not (root / "manifest.json").is_file():
        raise UserInputError(f"{root}: not a bundle (no manifest.json); give the folder export wrote")
    # The lock first: a concurrent add-adapter must see this one's manifest, not the one before it.
    with output_lock(root), quiet_libraries():
        try:
            return _add_locked(root, Path(adapter_path), name, base, allow_pickle, trust_remote_code, progress,
                               sign)
        except OSError as e:
            raise disk_error(e, root) from None


def _add_locked(root: Path, adapter_path: Path, name: str, base: str | None, allow_pickle: bool,
                trust_remote_code: bool, progress, sign: Path | None = None) -> Report:
    from .families import builder_from_bundle
    from .formats import sha256_file
    from .loading import check_architecture, inspect_adapter, public_base_name, resolve_base_name
    from .merge import load_base_model, resolve_labels
    from .reference import load_reference
    from .report import write_report
    from .stages import Stages
    from .tasks import get_arch, get_task, task_from_peft
    from .verify import check_tokenizer, evaluate_variants

    manifest = read_manifest(root)
    section = manifest.get("adapters")
    if not section:
        raise UserInputError(f"{root}: this bundle has merged weights, no swappable adapters; re-export it with "
                             "--keep-adapters to add adapters later")
    problems = check_integrity(root, manifest)
    reference = load_reference(root, manifest) if not problems else None
    if reference and (manifest.get("tokenizer") or {}).get("file"):
        problems = check_tokenizer(root, manifest, reference)  # the stored probe ids are what its tokenizer makes
    if problems:
        raise BundleError(f"{root}: the bundle fails its integrity check ({problems[0]}); re-export it before "
                          "adding adapters")
    if name in section["items"]:
        raise UserInputError(f"{root}: already has an adapter named {name}; choose another with --adapter NEW=PATH")
    stages = Stages(progress)
    ref = stages.run("inspect", "inspecting adapter", inspect_adapter, adapter_path, allow_pickle)
    bundle_base = manifest["base"]["name"]
    recorded = public_base_name(ref.recorded_base)
    if recorded and recorded != bundle_base:
        raise MismatchError(f"adapter {name} was trained for {recorded}, this bundle's base is {bundle_base}; an "
                            "adapter only fits the base it was trained on (if it was trained on this base, fix "
                            "base_model_name_or_path in its adapter_config.json)")
    if base is None and bundle_base.startswith("local:"):
        raise UserInputError(f"this bundle's base is a local folder ({bundle_base}); pass it with --base")
    base_ref = resolve_base_name(base or bundle_base, manifest["base"].get("revision"))
    check_architecture(base_ref, trust_remote_code)
    task = get_task(manifest["task"])
    adapter_task = task_from_peft(ref.task_type)
    if adapter_task and adapter_task != task.name:
        raise MismatchError(f"adapter {name} is a {adapter_task} adapter, this bundle is {task.name}")
    interface = Interface.from_json(section["interface"])
    probes, inputs, base_reference = reference
    fam = builder_from_bundle(task, manifest, probes, inputs)
    arch = get_arch(base_ref.model_type)
    warnings: list[str] = []
    defaults = _graph_defaults(root / manifest["variants"]["fp32"]["file"], interface)
    labels = resolve_labels(task, arch, base_ref, ref, None)
    if labels is not None:
        head = f"{arch.head_layers[task.name]}.weight"
        size = interface.full_parameters.get(head, (None,))[0]
        if size is not None and size != len(labels):
            raise MismatchError(f"adapter {name} has {len(labels)} labels, this bundle's graph serves a head of "
                                f"{size}; adapters of one bundle share the head size: export it separately")

    def check_base():

        model, _ = load_base_model(task, base_ref, labels, trust_remote_code)
        fam.prepare_model(model)
        set_parameters(model, defaults)
        _check_ids_fit(model, fam.feeds, root)
        diff = max(fam.effect(fam.reference(model), base_reference).values())
        skip = task.family_spec.non_output_keys
        bound = FP32_ATOL + FP32_RTOL * max(float(np.abs(r[k]).max()) for r in base_reference for k in r
                                            if k not in skip)
        if not diff <= bound:
            raise MismatchError(f"base {base_ref.name} does not reproduce this bundle's base outputs (max abs diff "
                                f"{diff:.3g} > {bound:.3g}); pass the base the bundle was exported from (--base)")

    stages.run("base_check", "checking the base reproduces the bundle's base outputs", check_base)
    p = stages.run("convert", f"converting adapter {name} and computing its merged PyTorch reference", prepare_adapter,
                   name, ref, fam, base_ref, labels, base_reference, defaults, warnings, allow_pickle=allow_pickle,
                   trust_remote_code=trust_remote_code)
    shapes = {k: (tuple(v.shape), str(v.dtype)) for k, v in p.tensors.items()}
    check_tensors(shapes, interface, f"adapter {name}")
    required = fam.required(base_reference)
    weak = weak_adapter_warning(max(p.effect.values()), required, name)
    warnings += [weak] if weak else []
    staging = make_staging(root)
    try:
        _clone_bundle(root, staging)
        graph_sha = section["graph_sha256"]
        if sha256_file(staging / manifest["variants"]["fp32"]["file"]) != graph_sha:
            raise BundleError(f"{root}: model.onnx is not the graph the adapters were made for; re-export")
        write_adapter(staging, p, graph_sha)
        section["items"][name] = adapter_entry(p, interface, graph_sha, required)
        _update_effect(manifest)
        manifest["spec"]["adapters"] = list(section["items"])
        variants = list(manifest["variants"])
        manifest["files"] = file_hashes(staging)  # the adapter files are checked against these before loading
        results = stages.run("verify", "checking parity with onnxruntime (base, each adapter, switching)",
                             lambda: evaluate_variants(staging, manifest, variants))
        passed = all(r["passed"] for r in results.values())
        for v, r in results.items():
            manifest["variants"][v]["passed"] = r["passed"]
        # What export measured stays in the report (it was checked with the bundle); the rest is this run's.
        before = _read_report(staging)
        report = new_report("add-adapter", manifest, results, str(before.get("bundle") or root.name),
                            passed=passed, warnings=list(before.get("warnings") or []) + warnings,
                            timings={**(before.get("timings") or {}),
                                     **{f"add_{k}": v for k, v in stages.timings.items()}},
                            task_metrics=before.get("task_metrics"), training=before.get("training"),
                            sizes=before.get("sizes") or {}, adapters=adapters_summary(manifest))
        from .signing import SIGNATURE, sign_bundle

        was_signed = (staging / SIGNATURE).is_file()
        (staging / SIGNATURE).unlink(missing_ok=True)  # it signs the old manifest
        if was_signed and sign is None:
            report["warnings"].append("the bundle was signed; its signature no longer matches the new manifest and "
                                      "was removed: add --sign KEY to re-sign it")
        write_report(staging, report)
        manifest["files"] = file_hashes(staging)
        write_manifest(staging, manifest)
        if sign is not None:
            report["signed_by"] = sign_bundle(staging, sign)
        if not passed:
            rejected = reject(staging, root)
            fails = [f"{v}: {r['failures'][0]}" for v, r in results.items() if r["failures"]][:3]
            raise ParityError(f"parity gate failed ({'; '.join(fails)}); {root} is unchanged, diagnostics are in "
                              f"{rejected}", report)
        publish(staging, root, overwrite=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def _update_effect(manifest: dict[str, Any]) -> None:
    """The bundle-level adapter effect: the weakest adapter's, per output."""
    effects = [e["effect"] for e in manifest["adapters"]["items"].values()]
    outputs = effects[0]["max_abs_diff"]
    manifest["adapter_effect"]["max_abs_diff"] = {k: min(e["max_abs_diff"][k] for e in effects) for k in outputs}
    manifest["adapter_effect"]["meaningful"] = all(e["meaningful"] for e in effects)


def _read_report(root: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads((root / PARITY_JSON).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _graph_defaults(path: Path, interface: Interface) -> dict[str, np.ndarray]:
    """The default values of the whole-tensor inputs, read back from the graph."""
    import onnx
    from onnx import numpy_helper

    wanted = set(interface.full_parameters)
    model = onnx.load(str(path))
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name in wanted}


def _clone_bundle(root: Path, staging: Path) -> None:
    """Copy the bundle into staging; large immutable files (graphs, weights) are hard links when possible."""
    for src in sorted(root.rglob("*")):
        rel = src.relative_to(root)
        dst = staging / rel
        if src.is_symlink() or not (src.is_dir() or src.is_file()):
            # It would copy (and then hash and list) whatever it points at, inside or outside the bundle.
            raise BundleError(f"{root}: {rel.as_posix()} is a symlink or not a regular file; a bundle holds only "
                              "regular files, remove it")
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.suffix in (".onnx", ".data", ADAPTER_SUFFIX):
            try:
                os.link(src, dst)
                continue
            except OSError:
                pass
        shutil.copy2(src, dst)
