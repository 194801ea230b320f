"""Embedded bases shipped as GGUF inside a Python package, converted once into a cached transformers folder.

transformers reads GGUF (with the ``gguf`` package) and dequantizes it to float32, but such a model cannot be
saved as it is. The conversion copies its state dict into a plain ``*ForCausalLM`` built from its config and
saves safetensors, the tokenizer and its chat template beside it, plus the package's license and a note of
where the weights came from (both travel into bundles as ``base_model/``). Measured for SmolLM2-135M: ~40 s
once on 2 cores; later loads read the folder (~4 s). The cache is keyed by the GGUF file's sha256.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .errors import ExporterError, UserInputError, require_full

SOURCE_FILE = "export_adapter_source.json"


def cache_root() -> Path:
    """$EXPORT_ADAPTER_CACHE, else $XDG_CACHE_HOME/export-adapter, else ~/.cache/export-adapter."""
    env = os.environ.get("EXPORT_ADAPTER_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "export-adapter"


def converted_folder(name: str, gguf: Path, package: str) -> Path:
    """The cached float32 folder of an embedded GGUF base, converting it on first use (atomically)."""
    from .formats import sha256_file

    digest = sha256_file(gguf)
    final = cache_root() / "embedded" / f"{name}-{digest[:12]}"
    if (final / SOURCE_FILE).is_file():
        return final
    require_full(f"embedded:{name} (converting its GGUF weights once)")
    try:
        import gguf as _gguf  # noqa: F401 - transformers' GGUF reader needs it
    except ImportError:
        raise UserInputError(f"embedded:{name} is stored as GGUF; converting it needs the gguf package: "
                             "pip install gguf") from None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.staging-", dir=final.parent))
    except OSError as e:
        raise ExporterError(f"cannot write the model cache {final.parent} ({e.strerror}); set EXPORT_ADAPTER_CACHE "
                            "to a writable folder") from None
    print(f"[export-adapter] converting embedded:{name} from GGUF to a cached float32 folder (once, ~1 min) ...",
          file=sys.stderr, flush=True)
    try:
        _convert(gguf, staging, name, digest, package)
        try:
            staging.rename(final)
        except OSError:
            if not (final / SOURCE_FILE).is_file():  # another process won the race: use its folder
                raise
    except OSError as e:
        raise ExporterError(f"cannot write the model cache {final.parent} ({e.strerror}); free space or set "
                            "EXPORT_ADAPTER_CACHE to another folder") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _convert(gguf: Path, out: Path, name: str, digest: str, package: str) -> None:
    import importlib.metadata

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder, file = str(gguf.parent), gguf.name
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    config.architectures = [type(loaded).__name__]
    plain = type(loaded)(config)
    result = plain.load_state_dict(loaded.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ExporterError(f"embedded:{name}: converting {file} left weights unmatched "
                            f"({(result.missing_keys or result.unexpected_keys)[0]})")
    plain.eval().save_pretrained(str(out))
    tok.save_pretrained(str(out))
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    license_text = dist.read_text("LICENSE") if dist else None
    if license_text:
        (out / "LICENSE").write_text(license_text, encoding="utf-8")
    version = dist.version if dist else "unknown"
    meta = dist.metadata.get("License") if dist else None
    (out / "README.md").write_text(
        f"# {name}\n\nConverted by export-adapter from `{file}` (package {dist.name if dist else '?'} {version}, "
        f"license {meta or 'see LICENSE'}). Its tensors ({_tensor_types(gguf)}) were dequantized to float32 by "
        "transformers: these are not the original checkpoint's weights.\n", encoding="utf-8")
    (out / SOURCE_FILE).write_text(json.dumps({"name": name, "gguf": file, "gguf_sha256": digest,
                                               "package_version": version,
                                               "transformers": importlib.metadata.version("transformers")},
                                              indent=2), encoding="utf-8")


def _tensor_types(gguf: Path) -> str:
    """How the GGUF file stores its tensors, e.g. "Q4_1 x210, F32 x61, Q8_0 x1"."""
    from collections import Counter

    from gguf import GGUFReader

    counts = Counter(t.tensor_type.name for t in GGUFReader(str(gguf)).tensors)
    return ", ".join(f"{k} x{v}" for k, v in counts.most_common())
