"""YAML recipes: pydantic models (unknown keys are errors), loading with file:line messages, JSON Schema.

A recipe says everything a run needs: base, task, data, LoRA, training, export and tolerances. Paths are
relative to the recipe file. CLI flags override recipe values; the effective recipe is written into the
bundle so the run can be reproduced.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserInputError
from .formats import SESSION_CONFIG_VALUES, check_session_config
from .tasks import TASK_NAMES, get_task

Task = Literal[TASK_NAMES]  # type: ignore[valid-type]  # the registry's names (exporter/tasks.py)
QuantizeMode = Literal["int8", "int4", "fp16", "none"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(_Strict):
    train: Path = Field(description="Training file: .jsonl, .json (a list of objects), .csv or .parquet.")
    eval: Path | None = Field(None, description="Evaluation file; when omitted, eval_fraction of train is held out.")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="Held-out share of train when no eval file is given.")
    text_column: str = Field("text", description="Text (classification), token list (NER) column.")
    label_column: str = Field("label", description="Label (classification) or tag-list (NER) column.")
    prompt_column: str = Field("prompt", description="Prompt column (text-generation).")
    response_column: str = Field("response", description="Response column (text-generation); the loss is on it.")
    labels: list[str] | None = Field(None, description="Label names in head order; default: sorted labels of train.")


class LoraSpec(_Strict):
    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: float = Field(16, gt=0, description="lora_alpha (scaling = alpha / r, or alpha / sqrt(r) with rsLoRA).")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, description="Default: the architecture's (exporter/tasks.py).")
    modules_to_save: list[str] | None = Field(None, description="Default: the task head (and DeBERTa's pooler).")
    use_rslora: bool = False
    use_dora: bool = False


class TrainingSpec(_Strict):
    epochs: float = Field(3, gt=0, description="Training epochs (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    batch_size: int = Field(16, gt=0, description="Per-process batch size.")
    learning_rate: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    seed: int = 0
    eval_steps: int | None = Field(None, gt=0, description="Evaluate every N steps; default: every epoch.")
    max_length: int = Field(128, ge=8, description="Longest training sequence in tokens.")
    select_best: bool = Field(
        False, description="Keep the checkpoint that scores best on a validation split held out of train "
        "(validation_fraction), not the last one; the eval set is never used to choose. Checkpoints are scored "
        "every epoch, every eval_steps, or (max_steps without eval_steps) every max_steps/4 steps.")
    validation_fraction: float = Field(0.1, gt=0, lt=1, description="Share of train held out when select_best.")


class ExportSettings(_Strict):
    opset: int = 20
    quantize: list[QuantizeMode] = Field(default_factory=lambda: ["int8"])
    int8_weights: Literal["auto", "signed7", "unsigned"] = Field(
        "auto", description="Encoder int8 weights: signed7 (7-bit, the fast u8 x s8 kernels), unsigned (8-bit with a "
        "zero point, twice the resolution), or auto: signed7 where it passes its gate, else unsigned.")
    session_config: dict[str, str] = Field(
        default_factory=dict,
        description="onnxruntime session config entries the bundle carries (export --session-config): parity runs "
        "with them, and infer, generate, verify and bench use them. Only "
        + ", ".join(SESSION_CONFIG_VALUES) + ".")

    @field_validator("session_config", mode="before")
    @classmethod
    def _yaml_scalars_as_text(cls, value: Any) -> Any:
        # YAML reads `allow_spinning: 0` as an int and `true` as a bool; onnxruntime's entries are strings.
        if isinstance(value, dict):
            return {k: ("1" if v else "0") if isinstance(v, bool) else str(v) if isinstance(v, int) else v
                    for k, v in value.items()}
        return value

    @field_validator("session_config")
    @classmethod
    def _known_session_entries(cls, value: dict[str, str]) -> dict[str, str]:
        try:
            return check_session_config(value)
        except UserInputError as e:
            raise ValueError(str(e)) from None


class Tolerances(_Strict):
    max_metric_drop: float = Field(
        0.01, ge=0, le=1,
        description="Largest allowed drop of the task metric (accuracy, entity F1, the token accuracy of the reference "
        "responses for text-generation) from PyTorch to any ONNX variant.",
    )
    gates: dict[str, float] = Field(
        default_factory=dict,
        description="Overrides of the parity gates' thresholds, as [VARIANT.]NAME: VALUE (e.g. int8.max_prob_diff: "
        "0.3); names and defaults in docs/gates.md. Recorded in the manifest and shown in parity.md.",
    )


class Recipe(_Strict):
    base: str = Field(description="Base model: embedded:all-MiniLM-L6-v2, embedded:SmolLM2-135M-Instruct, a local "
                      "folder or a hub id.")
    revision: str | None = Field(None, description="Hub revision of the base.")
    task: Task
    data: DataSpec
    lora: LoraSpec = Field(default_factory=LoraSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    export: ExportSettings = Field(default_factory=ExportSettings)
    tolerances: Tolerances = Field(default_factory=Tolerances)
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _labels_only_for_classification(self) -> Recipe:
        if self.data.labels is not None and not get_task(self.task).has_labels:
            raise ValueError(f"data.labels does not apply to task {self.task}")
        return self


# Names users bring from peft's LoraConfig and transformers' TrainingArguments.
ALIASES = {
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "lr": "learning_rate",
    "num_epochs": "epochs", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
    "train_file": "train", "eval_file": "eval", "validation": "eval", "model": "base",
    "base_model_name_or_path": "base", "quantization": "quantize", "max_seq_length": "max_length",
}


def recipe_schema() -> dict[str, Any]:
    return Recipe.model_json_schema()


def _line_map(text: str) -> dict[tuple, int]:
    """Recipe path (keys and list indexes) -> 1-based line, from the YAML node tree."""
    import yaml

    lines: dict[tuple, int] = {}

    def walk(node, path: tuple) -> None:
        lines.setdefault(path, node.start_mark.line + 1)  # a key's own line wins over its value's
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                lines[(*path, k.value)] = k.start_mark.line + 1
                walk(v, (*path, k.value))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, (*path, i))

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: Any = Recipe
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        model = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)),
                     ann)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _describe(err: dict, lines: dict[tuple, int], path: Path) -> str:
    loc = tuple(err["loc"])
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    line = lines.get(loc) or lines.get(loc[:-1]) or 1
    where = f"{path}:{line}"
    if err["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1])
        valid = sorted(parent.model_fields) if parent else []
        close = [ALIASES[loc[-1]]] if ALIASES.get(loc[-1]) in valid else \
            difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f"did you mean {'.'.join(map(str, loc[:-1] + (close[0],)))!r}?" if close else \
            f"valid keys here: {', '.join(valid)}"
        return f"{where}: unknown key {dotted!r}; {hint}"
    if err["type"] == "missing":
        return f"{where}: missing required key {dotted!r}"
    return f"{where}: {dotted}: {err['msg']}"


def load_recipe(path: Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Parse, validate and resolve a recipe; ``overrides`` maps dotted keys (training.epochs) to values."""
    import yaml

    from .formats import read_text

    path = Path(path)
    text = read_text(path, "recipe")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserInputError(f"{path}{line}: not valid YAML ({problem}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise UserInputError(f"{path}: a recipe must be a YAML mapping (key: value), got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserInputError(f"{path}: cannot override {dotted}: {p} is not a mapping in the recipe")
        node[leaf] = value
    lines = _line_map(text)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        errors = e.errors()
        first = _describe(errors[0], lines, path)
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        raise UserInputError(first + more) from None
    return _resolve_paths(recipe, path, lines)


def _resolve_paths(recipe: Recipe, path: Path, lines: dict[tuple, int]) -> Recipe:
    root = path.resolve().parent
    updates: dict[str, Any] = {}
    for key in ("train", "eval"):
        p = getattr(recipe.data, key)
        if p is None:
            continue
        full = p if p.is_absolute() else (root / p)
        if not full.is_file():
            line = lines.get(("data", key), 1)
            raise UserInputError(f"{path}:{line}: data.{key} file {p} not found (paths are relative to the recipe)")
        updates[key] = full
    base = recipe.base
    if not base.startswith("embedded:") and (base.startswith((".", "/")) or (root / base).is_dir()):
        candidate = Path(base) if Path(base).is_absolute() else root / base
        if candidate.is_dir():
            base = str(candidate)
    return recipe.model_copy(update={"data": recipe.data.model_copy(update=updates), "base": base})


def effective_yaml(recipe: Recipe) -> str:
    """The effective recipe as YAML, with data paths reduced to file names (no machine paths in bundles)."""
    import yaml

    data = recipe.model_dump(mode="json")
    for key in ("train", "eval"):
        if data["data"][key]:
            data["data"][key] = Path(data["data"][key]).name
    from .loading import public_base_name

    data["base"] = public_base_name(recipe.base)
    return yaml.safe_dump(data, sort_keys=False)
