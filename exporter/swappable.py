"""Swappable LoRA adapters: one base graph whose LoRA matrices are inputs, one ``.onnx_adapter`` per adapter.

The graph exposes, for every LoRA target module, two inputs ``{module}.lora_A`` (in_features x rank) and
``{module}.lora_B`` (rank x out_features, alpha/r already folded in), so the layer computes
``linear(x) + (x @ A) @ B``. Their default initializers are zeros, so with no adapter active the graph is
exactly the base model, and the rank axis is dynamic, so one graph serves adapters of any rank. Whole tensors
an adapter replaces (modules_to_save: a classifier head, a pooler) are inputs too, defaulting to the base's.

onnxruntime feeds an active adapter's tensors by name and silently accepts clashing or partial adapters (the
first active adapter wins; a missing tensor falls back to its default), so this module checks the contract
itself: every tensor of an adapter file must be a graph input of the right shape and dtype, A and B come in
pairs of one rank, and the file belongs to this graph (sha256 in the manifest, model version in the file).

This module is torch-free; the torch side (conversion from peft, the export wrapper) is in ``swap_export``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BundleError, MismatchError, UserInputError
from .formats import sha256_file

ADAPTERS_DIR = "adapters"
ADAPTER_SUFFIX = ".onnx_adapter"
ADAPTER_REFERENCE_DIR = "reference/adapters"
LORA_KINDS = ("lora_A", "lora_B")
# The onnx_adapter format carries an int "model version": we store the first 28 bits of the base graph's
# sha256 there, so a file copied from another bundle is recognised even without its manifest entry.
_VERSION_HEX = 7


def lora_input(module: str, kind: str) -> str:
    return f"{module}.{kind}"


def graph_version(graph_sha256: str) -> int:
    return int(graph_sha256[:_VERSION_HEX], 16)


@dataclass(frozen=True)
class Interface:
    """What the base graph lets an adapter replace."""

    lora_modules: dict[str, tuple[int, int]]  # module path -> (in_features, out_features)
    full_parameters: dict[str, tuple[int, ...]]  # parameter name -> shape (modules_to_save)

    @property
    def input_names(self) -> list[str]:
        names = [lora_input(m, k) for m in self.lora_modules for k in LORA_KINDS]
        return names + list(self.full_parameters)

    def expected_shape(self, name: str) -> tuple[int | None, ...] | None:
        """The shape a tensor named ``name`` must have (None for the rank axis), or None if not an input."""
        if name in self.full_parameters:
            return self.full_parameters[name]
        module, _, kind = name.rpartition(".")
        if module in self.lora_modules and kind in LORA_KINDS:
            fan_in, fan_out = self.lora_modules[module]
            return (fan_in, None) if kind == "lora_A" else (None, fan_out)
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "lora_modules": {m: {"in_features": i, "out_features": o, "inputs": [lora_input(m, k) for k in LORA_KINDS]}
                             for m, (i, o) in self.lora_modules.items()},
            "full_parameters": {n: {"shape": list(s), "dtype": "float32"} for n, s in self.full_parameters.items()},
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Interface:
        return cls({m: (int(v["in_features"]), int(v["out_features"])) for m, v in d["lora_modules"].items()},
                   {n: tuple(int(x) for x in v["shape"]) for n, v in d["full_parameters"].items()})


def check_tensors(tensors: dict[str, tuple[tuple[int, ...], str]], interface: Interface, what: str) -> dict[str, int]:
    """The adapter-to-graph contract on names, shapes and dtypes; returns the rank of each LoRA module.

    ``tensors`` maps name -> (shape, dtype name). Raises MismatchError naming the first problem.
    """
    if not tensors:
        raise MismatchError(f"{what}: holds no tensors")
    ranks: dict[str, int] = {}
    for name, (shape, dtype) in sorted(tensors.items()):
        want = interface.expected_shape(name)
        if want is None:
            module = name.rpartition(".")[0]
            raise MismatchError(
                f"{what}: tensor {name} is not an input of this graph (module {module} is not exposed); it was "
                "made for another model, or targets modules this bundle was not exported with (re-export with "
                "--keep-adapters and an adapter that targets them)"
            )
        if dtype != "float32":
            raise MismatchError(f"{what}: tensor {name} is {dtype}; adapter tensors are float32")
        if len(shape) != len(want) or any(w is not None and w != s for w, s in zip(want, shape)):
            shown = "x".join("rank" if w is None else str(w) for w in want)
            raise MismatchError(f"{what}: tensor {name} has shape {'x'.join(map(str, shape))}, the graph expects "
                                f"{shown}; it belongs to another base model")
        module, _, kind = name.rpartition(".")
        if kind in LORA_KINDS and module in interface.lora_modules:
            r = shape[1] if kind == "lora_A" else shape[0]
            if r < 1:
                raise MismatchError(f"{what}: tensor {name} has rank 0")
            if ranks.setdefault(module, r) != r:
                raise MismatchError(f"{what}: {module} has lora_A of rank {ranks[module]} but lora_B of rank {r}")
    for module in ranks:
        missing = [lora_input(module, k) for k in LORA_KINDS if lora_input(module, k) not in tensors]
        if missing:
            raise MismatchError(f"{what}: {missing[0]} is missing (A and B come in pairs); the file is partial")
    return ranks


def write_adapter_file(path: Path, tensors: dict[str, np.ndarray], graph_sha256: str) -> None:
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(graph_version(graph_sha256))
    # OrtValues view the numpy buffers: keep the contiguous arrays alive until the file is written.
    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()})
    fmt.export_adapter(str(path))


def read_adapter_file(path: Path) -> tuple[int, dict[str, tuple[tuple[int, ...], str]]]:
    """(model version, name -> (shape, dtype)) of an .onnx_adapter file."""
    import onnxruntime as ort

    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for unreadable files
        raise BundleError(f"{path.name}: not a readable onnx_adapter file ({str(e).splitlines()[0][:120]})") from None
    params = fmt.get_parameters()
    out = {}
    for name, value in params.items():
        out[name] = (tuple(int(x) for x in value.shape()), _ort_dtype(value.data_type()))
    return int(fmt.get_model_version()), out


def _ort_dtype(t: str) -> str:
    return {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64"}.get(t, t)


def contract_entry(name: str, file: str, tensors: dict[str, np.ndarray], interface: Interface, graph_sha256: str,
                   source: dict[str, Any], scaling: dict[str, float], labels: list[str] | None) -> dict[str, Any]:
    """The manifest's record of one adapter: what verify and the runtime check the file against."""
    shapes = {k: (tuple(v.shape), str(v.dtype)) for k, v in tensors.items()}
    ranks = check_tensors(shapes, interface, f"adapter {name}")
    distinct = sorted(set(ranks.values()))
    return {
        "file": file,
        "source": source,
        "rank": distinct[0] if len(distinct) == 1 else None,
        "ranks": ranks,
        "scaling": scaling,
        "target_modules": sorted(ranks),
        "full_parameters": sorted(k for k in tensors if k in interface.full_parameters),
        "parameters": {k: {"shape": list(s), "dtype": d} for k, (s, d) in sorted(shapes.items())},
        "base_graph_sha256": graph_sha256,
        "labels": labels,
        "reference": f"{ADAPTER_REFERENCE_DIR}/{name}.npz",
    }


def check_bundle_adapter(root: Path, manifest: dict[str, Any], name: str) -> Path:
    """The contract of one adapter of a bundle, checked before onnxruntime sees the file; returns its path."""
    section = manifest.get("adapters")
    if not section:
        raise UserInputError(f"{root}: this bundle has no swappable adapters (export with --keep-adapters)")
    items = section["items"]
    if name not in items:
        raise UserInputError(f"{root}: no adapter {name!r}; this bundle has {', '.join(items) or 'none'}")
    entry = items[name]
    path = root / entry["file"]
    if not path.is_file():
        raise BundleError(f"{root}: adapter file {entry['file']} is missing; re-run add-adapter")
    # Integrity before onnxruntime sees the file: the manifest's sha256 (itself checked against its checksum
    # by read_manifest) must match.
    want = (manifest.get("files") or {}).get(entry["file"])
    if want is None or sha256_file(path) != want:
        raise BundleError(f"adapter {name}: {entry['file']} does not match the sha256 in the manifest (changed or "
                          "replaced); re-run add-adapter or re-export")
    graph = section["graph_sha256"]
    if entry["base_graph_sha256"] != graph:
        raise MismatchError(f"adapter {name}: made for base graph {entry['base_graph_sha256'][:12]}, this bundle's "
                            f"graph is {graph[:12]}; convert it again with add-adapter")
    version, tensors = read_adapter_file(path)
    if version != graph_version(graph):
        raise MismatchError(f"adapter {name}: {entry['file']} was written for another base graph (model version "
                            f"{version}, this graph is {graph_version(graph)}); convert it again with add-adapter")
    check_tensors(tensors, Interface.from_json(section["interface"]), f"adapter {name} ({entry['file']})")
    recorded = {k: (tuple(v["shape"]), v["dtype"]) for k, v in entry["parameters"].items()}
    if recorded != tensors:
        diff = sorted(set(recorded) ^ set(tensors)) or sorted(k for k in tensors if tensors[k] != recorded.get(k))
        raise MismatchError(f"adapter {name}: {entry['file']} does not hold what the manifest records "
                            f"(first difference: {diff[0]}); the file was replaced")
    return path


def check_no_clash(manifest: dict[str, Any], names: list[str]) -> None:
    """Adapters active together must not share a tensor: onnxruntime would silently use the first one's."""
    items = manifest["adapters"]["items"]
    unknown = [n for n in names if n not in items]
    if unknown:
        raise UserInputError(f"no adapter {unknown[0]!r} in this bundle; it has {', '.join(items) or 'none'}")
    seen: dict[str, str] = {}
    for name in names:
        for param in manifest["adapters"]["items"][name]["parameters"]:
            if param in seen:
                raise MismatchError(f"adapters {seen[param]} and {name} both set {param}: they cannot be active "
                                    "together (onnxruntime would silently use one of them); activate one at a time")
            seen[param] = name


class ActiveAdapters:
    """onnxruntime RunOptions with adapters active, holding every LoraAdapter object it refers to.

    onnxruntime crashes the process (std::bad_array_new_length) when a LoraAdapter is freed while a
    RunOptions still refers to it, so the objects live exactly as long as this holder.
    """

    def __init__(self, root: Path, manifest: dict[str, Any], names: list[str]) -> None:
        import onnxruntime as ort

        self.names = list(names)
        if not manifest.get("adapters"):
            raise UserInputError(f"{root}: this bundle has no swappable adapters (export with --keep-adapters)")
        check_no_clash(manifest, self.names)
        self._adapters = []
        self.run_options = ort.RunOptions()
        for name in self.names:
            path = check_bundle_adapter(root, manifest, name)
            adapter = ort.LoraAdapter()
            try:
                adapter.Load(str(path))
            except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
                raise BundleError(f"{path.name}: onnxruntime cannot load it ({str(e).splitlines()[0][:120]})") from None
            self._adapters.append(adapter)
            self.run_options.add_active_adapter(adapter)


def adapters_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """What the report says about each adapter (the manifest holds the full contract)."""
    return {n: {"rank": e["rank"], "ranks": sorted(set(e["ranks"].values())), "target_modules": len(e["target_modules"]),
                "full_parameters": e["full_parameters"], "labels": e["labels"], "effect": e["effect"],
                "sha256": e["source"]["sha256"]}
            for n, e in manifest["adapters"]["items"].items()}
