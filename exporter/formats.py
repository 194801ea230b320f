"""What a peft adapter folder looks like, and reading the files users and bundles hand us.

Device layer (torch-free): the bundle reader, ``inspect`` and the build side all use it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .errors import UserInputError

# A bundle's own files: the manifest, its checksum and its optional detached signature.
MANIFEST = "manifest.json"
MANIFEST_SHA = "manifest.json.sha256"
SIGNATURE = "manifest.json.sig"
# The manifest layout this version writes (older ones still verify).
SCHEMA_VERSION = 2

# Each variant's graph, where transformers.js looks for it (onnx/, by dtype: fp32, q8, fp16, q4), so the bundle
# is a transformers.js model folder as it is; optimum's ORTModel classes load them with subfolder="onnx".
# Bundles record the paths in their manifest (older ones have model.onnx, model.int8.onnx, ... at the top).
VARIANT_FILES = {"fp32": "onnx/model.onnx", "int8": "onnx/model_quantized.onnx", "fp16": "onnx/model_fp16.onnx",
                 "int4": "onnx/model_q4.onnx"}

# onnxruntime session config entries a bundle may carry (manifest "session"), each with the values it may
# take. A manifest is a stranger's file: only entries that change scheduling or float denormal handling, never
# ones that name files or providers (ep.context_file_path would make a session write where the bundle says).
SESSION_CONFIG_VALUES: dict[str, tuple[str, ...]] = {
    "session.intra_op.allow_spinning": ("0", "1"),
    "session.inter_op.allow_spinning": ("0", "1"),
    "session.set_denormal_as_zero": ("0", "1"),
    "session.dynamic_block_base": ("1", "2", "4", "8", "16"),
}


def check_session_config(entries: dict[str, str]) -> dict[str, str]:
    """The entries, if every key and value is one a bundle may carry; else a UserInputError naming the fix."""
    for key, value in entries.items():
        allowed = SESSION_CONFIG_VALUES.get(key)
        if allowed is None:
            raise UserInputError(f"session config {key}: not a session option a bundle may carry; use one of "
                                 f"{', '.join(SESSION_CONFIG_VALUES)}")
        if value not in allowed:
            raise UserInputError(f"session config {key}={value}: use one of {', '.join(allowed)}")
    return dict(entries)


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
# Written beside the adapter by our fine-tuning and sample scripts: label names and the task.
ADAPTER_SIDECAR = "export_adapter.json"
# Merge-able adapter types and the key fragment that marks their weights in a saved adapter.
ADAPTER_MARKERS = {
    "LORA": (".lora_",),
    "ADALORA": (".lora_",),  # plus ranknum, which peft derives and does not save
    "LOHA": (".hada_",),
    "LOKR": (".lokr_",),
    "IA3": (".ia3_",),
}
SUPPORTED_PEFT_TYPES = tuple(ADAPTER_MARKERS)
ALL_MARKERS = tuple(sorted({m for ms in ADAPTER_MARKERS.values() for m in ms}))


def is_adapter_key(key: str) -> bool:
    return any(m in key for m in ALL_MARKERS)


UNMERGEABLE_PEFT_TYPES = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "CPT")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_text(path: Path, what: str) -> str:
    """A user-named text file, or one line saying it is missing or unreadable."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserInputError(f"{path}: {what} not found") from None
    except UnicodeDecodeError:
        raise UserInputError(f"{path}: {what} is not UTF-8 text; re-save it as UTF-8") from None
    except OSError as e:
        raise UserInputError(f"{path}: cannot read {what} ({e.strerror}); check its permissions") from None


def read_json(path: Path, what: str) -> dict[str, Any]:
    text = read_text(path, what)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserInputError(
            f"{path}: {what} is not valid JSON (line {e.lineno}: {e.msg}); re-save or re-download it"
        ) from None
    if not isinstance(data, dict):
        raise UserInputError(f"{path}: {what} must be a JSON object, got {type(data).__name__}")
    return data
