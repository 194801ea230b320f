"""``inspect``: what an adapter folder or a bundle holds, read from JSON and safetensors headers only.

Torch-free, so it runs with the device profile too.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

from .bundle import MANIFEST, read_manifest
from .errors import UserInputError
from .formats import (
    ADAPTER_CONFIG,
    ADAPTER_PICKLE,
    ADAPTER_SAFETENSORS,
    ADAPTER_SIDECAR,
    ALL_MARKERS,
    is_adapter_key,
    read_json,
)


def safetensors_header(path: Path) -> dict[str, Any]:
    """Tensor names, dtypes and shapes from a safetensors header, without loading any tensor."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise UserInputError(f"{path}: truncated safetensors file (no header); re-save the adapter")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise UserInputError(f"{path}: corrupt safetensors header (length {n}); re-save the adapter")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserInputError(f"{path}: corrupt safetensors header; re-save the adapter") from None
    header.pop("__metadata__", None)
    return header


def inspect_path(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{path}: not found")
    if (path / MANIFEST).exists():
        m = read_manifest(path)
        return {
            "kind": "bundle",
            "schema_version": m["schema_version"],
            "task": m["task"],
            "base": m["base"]["name"],
            "labels": ", ".join(m["labels"]) if m.get("labels") else None,
            "adapter": ({k: m["adapter"][k] for k in ("name", "peft_type", "rank", "alpha", "target_modules")}
                        if m.get("adapter") else None),
            **({"adapters": {
                name: f"{e['file']} (rank {e['rank'] if e['rank'] is not None else 'mixed'}, "
                      f"{len(e['target_modules'])} modules" + (f", labels {', '.join(e['labels'])}" if e.get("labels")
                                                               else "") + ")"
                for name, e in m["adapters"]["items"].items()}} if m.get("adapters") else {}),
            "opset": m["opset"],
            "min_onnxruntime": m["min_onnxruntime"],
            "default_variant": m.get("default_variant"),
            "variants": {
                name: f"{v['file']} ({v['dtype']}, {'passed' if v.get('passed') else 'FAILED'})"
                for name, v in m["variants"].items()
            },
        }
    if (path / ADAPTER_CONFIG).exists():
        cfg = read_json(path / ADAPTER_CONFIG, "adapter_config.json")
        st = path / ADAPTER_SAFETENSORS
        if st.exists():
            header = safetensors_header(st)
            weights = f"{ADAPTER_SAFETENSORS} ({len(header)} tensors)"
            modules = sorted({re.split("|".join(re.escape(m) for m in ALL_MARKERS), k)[0].removeprefix("base_model.model.")
                              for k in header if is_adapter_key(k)})
        else:
            weights = f"{ADAPTER_PICKLE} (pickle: refused by export unless --allow-pickle)" \
                if (path / ADAPTER_PICKLE).exists() else "missing"
            modules = []
        labels = None
        if (path / ADAPTER_SIDECAR).exists():
            labels = read_json(path / ADAPTER_SIDECAR, ADAPTER_SIDECAR).get("labels")
        tm = cfg.get("target_modules")
        return {
            "kind": "adapter",
            "base": cfg.get("base_model_name_or_path"),
            "peft_type": cfg.get("peft_type"),
            "task_type": cfg.get("task_type"),
            "rank": cfg.get("r"),
            "alpha": cfg.get("lora_alpha"),
            "target_modules": ", ".join(sorted(tm)) if isinstance(tm, list) else tm,
            "modules_to_save": ", ".join(cfg.get("modules_to_save") or []) or None,
            "labels": ", ".join(labels) if labels else None,
            "weights": weights,
            "adapted_modules": len(modules),
        }
    raise UserInputError(f"{path}: neither a bundle ({MANIFEST}) nor an adapter folder ({ADAPTER_CONFIG})")
