"""export-adapter: LoRA fine-tuned Hugging Face models to verified, self-checking ONNX bundles.

The public API is what this module lists in ``__all__``; everything else is private and may change. Names
are imported on first use (PEP 562), so ``import exporter`` is cheap and a device with only the device
profile (onnxruntime, tokenizers, numpy) can use ``BundleModel``, ``BundleGenerator`` and ``verify_bundle``:
torch, transformers and peft load only inside the build and train functions that need them.

    from exporter import export, verify_bundle, BundleModel
    report = export("adapter/", "bundle/", quantize=("int8",))
    assert verify_bundle("bundle/").passed
    print(BundleModel("bundle/").infer(["I loved it"]))
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import (
    BundleError,
    ExporterError,
    FileSystemError,
    MismatchError,
    MissingExtraError,
    NonFiniteError,
    OutputExistsError,
    ParityError,
    TamperedBundleError,
    UnsafeFormatError,
    UnsupportedError,
    UsageError,
    UserInputError,
)

__version__ = "0.1.0"

# Public name -> the module that defines it (device: runtime, verify, report; build: pipeline, spec,
# swap_build; train: run, recipes, finetune). Strings, not imports: nothing here loads before it is used.
_LAZY = {
    "export": "pipeline",
    "run_pipeline": "pipeline",
    "ExportSpec": "spec",
    "Report": "report",
    "add_adapter": "swap_add",
    "run_recipe": "run",
    "load_recipe": "recipes",
    "finetune": "finetune",
    "BundleModel": "runtime",
    "BundleGenerator": "runtime",
    "verify_bundle": "verify",
}

__all__ = [
    "__version__", *_LAZY,
    "ExporterError", "UserInputError", "UsageError", "UnsafeFormatError", "MismatchError", "NonFiniteError",
    "UnsupportedError", "MissingExtraError", "OutputExistsError", "FileSystemError", "BundleError",
    "TamperedBundleError", "ParityError",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'exporter' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
