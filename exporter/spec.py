"""What one export is asked to do: the frozen spec every build stage reads."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserInputError
from .onnx_export import DEFAULT_OPSET
from .probes import DEFAULT_MAX_LENGTH
from .quantize import QUANTIZE_MODES
from .taskeval import TaskEvalSpec


@dataclass(frozen=True)
class ExportSpec:
    adapter: Path
    out: Path
    base: str | None = None
    revision: str | None = None
    task: str | None = None
    labels: tuple[str, ...] | None = None
    quantize: tuple[str, ...] = ("int8",)
    opset: int = DEFAULT_OPSET
    overwrite: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False
    max_length: int = DEFAULT_MAX_LENGTH
    # From `run`: the user's eval rows for task-level parity (only metrics reach the bundle), the effective
    # recipe to store as recipe.yaml, and whether to ship the trained adapter folder inside the bundle.
    task_eval: TaskEvalSpec | None = field(default=None, repr=False)
    recipe_yaml: str | None = field(default=None, repr=False)
    include_adapter: bool = False
    int4_block_size: int = 32
    int4_embedding: bool = False
    # Encoder int8 weights (quantize.INT8_WEIGHTS): auto = signed7 where it passes its gate, else unsigned.
    int8_weights: str = "auto"
    no_tokenizer: bool = False  # export a base that ships no tokenizer; probes are synthetic token ids
    ort_format: bool = False  # every variant also as an .ort file (ort_format.py), verified like the .onnx
    # The fp32 graph tuned for onnxruntime: encoders' fusions (fusions.py), Llama-family decoders written with its
    # fused decoder ops (decoder_graph.py); False: as torch exports it, standard ONNX.
    ort_fusions: bool = True
    training: dict[str, Any] | None = field(default=None, repr=False)  # from `run`: fine-tuning summary
    # --keep-adapters: (name, folder) of every adapter; the graph keeps LoRA as inputs, adapters become
    # adapters/NAME.onnx_adapter files. ``adapter`` is then the first of them.
    adapters: tuple[tuple[str, Path], ...] = ()
    keep_adapters: bool = False
    # export --probe-texts: the user's own texts (encoders) or prompts (decoders) to judge parity on.
    probe_texts: Path | None = None
    # export --tolerance [VARIANT.]NAME=VALUE: the user's own thresholds, recorded in the manifest and the report.
    tolerances: tuple[tuple[str, float], ...] = ()
    # export --sign KEY: an Ed25519 private key (PEM); the bundle gets manifest.json.sig (exporter/signing.py).
    sign: Path | None = None
    # export --session-config KEY=VALUE: onnxruntime session entries (formats.SESSION_CONFIG_VALUES) that parity
    # runs with, stored in the manifest so that infer, generate, verify and bench run with them too.
    session_config: tuple[tuple[str, str], ...] = ()

    def recorded(self) -> dict[str, Any]:
        """The effective settings as written into the bundle: no machine paths, no eval data."""
        d = asdict(self)
        d.pop("task_eval")
        d.pop("recipe_yaml")
        d.pop("training")
        d["task_eval_rows"] = len(self.task_eval.rows) if self.task_eval else None
        d["adapter"] = Path(self.adapter).resolve().name
        d["adapters"] = [name for name, _ in self.adapters]
        d["out"] = Path(self.out).name
        d["labels"] = list(self.labels) if self.labels else None
        d["quantize"] = list(self.quantize)
        d["probe_texts"] = Path(self.probe_texts).name if self.probe_texts else None
        d["sign"] = self.sign is not None  # never the key's path
        d["session_config"] = dict(self.session_config)
        return d


def normalize_modes(modes: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    out: list[str] = []
    for m in modes:
        if m == "none":
            continue
        if m not in QUANTIZE_MODES:
            raise UserInputError(f"--quantize {m}: unknown mode; use one of: {', '.join(QUANTIZE_MODES)}, none")
        if m not in out:
            out.append(m)
    return tuple(out)
