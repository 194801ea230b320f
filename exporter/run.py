"""``run``: a recipe end to end (train layer): fine-tune LoRA, then the export pipeline with task-level parity
on the recipe's eval data."""

from __future__ import annotations

import shutil
from pathlib import Path

from .bundle import check_out
from .errors import require_full
from .finetune import finetune, load_task_data
from .pipeline import check_int8_weights, check_tolerances, run_pipeline
from .recipes import effective_yaml
from .report import Report
from .spec import ExportSpec, normalize_modes
from .stages import Progress, Stages
from .taskeval import TaskEvalSpec
from .tasks import is_decoder_task


def run_recipe(recipe, out: Path, *, overwrite: bool = False, quiet: bool = False,
               progress: Progress | None = None, work_dir: Path | None = None, resume: bool = False) -> Report:
    """finetune -> merge -> export -> quantize -> verify -> bundle, with task-level parity on the eval data."""
    require_full("run")
    out = Path(out)
    inputs = [Path(p) for p in (recipe.data.train, recipe.data.eval) if p]
    if not recipe.base.startswith("embedded:") and Path(recipe.base).exists():
        inputs.append(Path(recipe.base))
    check_out(out, overwrite, tuple(inputs))
    # Before minutes of fine-tuning: a misspelt threshold fails now.
    check_tolerances(recipe.task, normalize_modes(tuple(recipe.export.quantize)), tuple(recipe.tolerances.gates.items()))
    check_int8_weights(recipe.export.int8_weights, is_decoder_task(recipe.task))
    adapter_dir = out.parent / f".{out.name}.adapter"
    stages = Stages(progress)
    trained = stages.run("finetune", f"fine-tuning LoRA on {recipe.base}", finetune, recipe, adapter_dir,
                         work_dir=work_dir, resume=resume, overwrite=True, quiet=quiet)
    data = load_task_data(recipe)
    task_eval = None
    if recipe.task in ("text-classification", "token-classification"):
        task_eval = TaskEvalSpec(tuple(data.eval), recipe.data.text_column, recipe.data.label_column,
                                 recipe.tolerances.max_metric_drop)
    elif is_decoder_task(recipe.task):
        task_eval = TaskEvalSpec(tuple(data.eval), recipe.data.prompt_column, recipe.data.response_column,
                                 recipe.tolerances.max_metric_drop, recipe.training.max_length)
    spec = ExportSpec(
        adapter=adapter_dir, out=out, base=recipe.base, revision=recipe.revision, task=recipe.task,
        labels=tuple(data.labels) if data.labels else None, quantize=tuple(recipe.export.quantize),
        opset=recipe.export.opset, int8_weights=recipe.export.int8_weights, overwrite=overwrite, trust_remote_code=recipe.trust_remote_code,
        task_eval=task_eval, recipe_yaml=effective_yaml(recipe), include_adapter=True,
        tolerances=tuple(recipe.tolerances.gates.items()), session_config=tuple(recipe.export.session_config.items()),
        training={"seconds": stages.timings["finetune"],
                  **{k: trained.metrics.get(k) for k in ("global_step", "train_loss", "eval", "train_rows", "eval_rows",
                                                         "validation_rows", "best_checkpoint", "validation")}},
    )
    try:
        report = run_pipeline(spec, progress)
    finally:
        shutil.rmtree(adapter_dir, ignore_errors=True)
    return report
