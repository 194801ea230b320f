"""The ``export-adapter`` command line: flags in, library calls, messages and exit codes out. No logic.

Results go to stdout (``--json`` for machines); progress and errors go to stderr. Exit codes (docs/exit-codes.md):
0 ok, 1 error, 2 usage, 3 parity gate or verification failed, 130/143 interrupted.
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path
from typing import Any

import click

from . import __version__, interrupts
from .cli_device import (
    bench,
    emit_json,
    generate,
    infer,
    inspect,
    keygen,
    parse_config_entry,
    print_summary,
    verify,
)
from .errors import (  # the exit codes are imported for docs/exit-codes.md's test too
    EXIT_ERROR,
    EXIT_OK,  # noqa: F401
    EXIT_PARITY,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_USAGE,  # noqa: F401
    FULL_MODULES,
    RECIPE_MODULES,
    ExporterError,
    ParityError,
    UserInputError,
    describe_os_error,
    require_full,
)
from .formats import SESSION_CONFIG_VALUES, check_session_config
from .onnx_export import DEFAULT_OPSET
from .probes import DEFAULT_MAX_LENGTH
from .quantize import DEFAULT_INT4_BLOCK, INT8_WEIGHTS, QUANTIZE_MODES
from .tasks import TASK_NAMES


class Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        # Ctrl-C, SIGTERM and a closed terminal (SIGHUP) end the run the same way: staging removed, nothing
        # half-published, even when the signal lands inside a __del__ (exporter/interrupts.py).
        interrupts.install()
        try:
            return super().invoke(ctx)
        except ParityError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(EXIT_PARITY)
        except ExporterError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except BrokenPipeError:
            # The reader of stdout went away (`verify B | head`): nothing to report to anyone. Point stdout at
            # /dev/null so the interpreter's final flush does not raise again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(EXIT_ERROR)
        except OSError as e:
            # The system refused a read or write the library did not expect to fail (an unreadable bundle file,
            # a folder made read-only mid-run): one line naming the path and the fix, never a traceback.
            click.echo(f"error: {describe_os_error(e)}", err=True)
            ctx.exit(EXIT_ERROR)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was published", err=True)
            ctx.exit(EXIT_SIGINT)
        except interrupts.Terminated:
            click.echo("terminated: nothing was published", err=True)
            ctx.exit(EXIT_SIGTERM)


def _progress(quiet: bool):
    if quiet:
        return lambda msg: None
    return lambda msg: click.echo(f"[export-adapter] {msg}", err=True)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="export-adapter")
def cli() -> None:
    """Take a LoRA-fine-tuned Hugging Face model to a verified ONNX bundle, and check or run bundles.

    \b
    Full toolkit (torch):      run, finetune, export, add-adapter, recipe
    Device profile (no torch): verify, infer, generate, inspect, keygen (needs cryptography)
    Exit codes: 0 ok, 1 error, 2 usage, 3 parity/verification failed, 130/143 interrupted.
    """


@cli.command()
@click.option("--adapter", "adapters", required=True, multiple=True,
              help="peft adapter folder (adapter_config.json + adapter_model.safetensors). With --keep-adapters: "
                   "repeatable, as PATH or NAME=PATH (NAME defaults to the folder's name).")
@click.option("--keep-adapters", is_flag=True,
              help="Keep LoRA swappable instead of merging: one base graph with LoRA inputs plus "
                   "adapters/NAME.onnx_adapter per adapter, activated at run time (infer/generate --adapter).")
@click.option("--base", default=None,
              help="Base model: a local folder, a hub id, embedded:all-MiniLM-L6-v2 or "
                   "embedded:SmolLM2-135M-Instruct. "
                   "Default: base_model_name_or_path recorded in the adapter.")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) of the base; recorded.")
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path),
              help="Bundle folder to write (published atomically when every gate passes).")
@click.option("--task", type=click.Choice(TASK_NAMES),
              default=None, help="Pipeline task. Default: from the adapter's task_type, else the base config.")
@click.option("--labels", default=None,
              help="Comma-separated label names, in head order. Default: the adapter's export_adapter.json, "
                   "else the base's id2label.")
@click.option("--quantize", "quantize", multiple=True, type=click.Choice([*QUANTIZE_MODES, "none"]),
              help="Extra variant(s) beside the fp32 reference; repeatable. Default: int8. Encoders: int8 is "
                   "dynamic per-channel (see --int8-weights). Decoders: int8 and int4 are weight-only (MatMulNBits, int8 "
                   "compute); int4 is for text-generation models only.")
@click.option("--int8-weights", type=click.Choice(INT8_WEIGHTS), default="auto", show_default=True,
              help="Encoder int8 weight format, both exact on every CPU. signed7: 7-bit signed, on the fast "
                   "u8 x s8 kernels (VNNI/AMX: ~2x faster than unsigned). unsigned: 8-bit with a zero point, "
                   "twice the resolution. auto: signed7, and unsigned where signed7 fails its gate.")
@click.option("--int4-block-size", type=click.Choice(["16", "32", "64", "128"]), default=str(DEFAULT_INT4_BLOCK), show_default=True,
              help="Block size of int4 weight quantization.")
@click.option("--int4-embedding", is_flag=True,
              help="int4: quantize the token embedding and the output projection (lm_head) to 4 bits too "
                   "(default 8 bits: 4 bits measured 17x the mean KL on SmolLM2).")
@click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True, help="ONNX opset of the default domain.")
@click.option("--max-length", type=int, default=DEFAULT_MAX_LENGTH, show_default=True,
              help="Longest probe sequence (tokens); capped by the model's position limit.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (only after every check passed).")
@click.option("--allow-pickle", is_flag=True,
              help="Accept a pickle-only adapter (adapter_model.bin), loaded with weights_only=True. "
                   "Only for files you trust.")
@click.option("--trust-remote-code", is_flag=True, help="Allow a base whose code lives in its hub repo.")
@click.option("--no-tokenizer", is_flag=True,
              help="Export a base that ships no tokenizer (encoders): probes become synthetic token ids.")
@click.option("--probe-texts", type=click.Path(path_type=Path), default=None,
              help="Your own probe inputs for parity: one text (encoders) or prompt (decoders) per line, or JSON "
                   "Lines of strings or {\"text\"|\"prompt\": ...}. Stored in the bundle's reference and re-run "
                   "by verify. At most 64 texts / 16 prompts are used. Default: built-in English probes, or "
                   "texts made from the vocabulary when the tokenizer maps those to <unk>.")
@click.option("--tolerance", "tolerances", multiple=True, callback=lambda c, p, v: _parse_tolerances(v),
              metavar="[VARIANT.]NAME=VALUE",
              help="Override one parity threshold, e.g. int8.max_prob_diff=0.3 (or max_prob_diff=0.3 for every "
                   "variant that has it); repeatable. Recorded in the manifest and shown in parity.md as your "
                   "choice; verify applies it. Names and defaults: docs/bundle.md (Parity gates).")
@click.option("--ort-format", is_flag=True,
              help="Also write every variant in onnxruntime's ORT format (onnx/*.ort, for its minimal and mobile "
                   "builds) with onnx/required_operators_and_types.config for a minimal build; each .ort file is "
                   "verified like its .onnx (merged bundles).")
@click.option("--no-ort-fusions", is_flag=True,
              help="Keep the fp32 graph as torch exports it, in standard ONNX operators, for runtimes other than "
                   "onnxruntime (decoder int8/int4 still use MatMulNBits). Default: tuned for onnxruntime's CPU "
                   "kernels, on the fp32 graph the other variants are made from. Encoders: its transformer fusions "
                   "(BiasGelu), layer norms kept out of its slow fused kernel, attention as one MultiHeadAttention "
                   "where nothing is padded (MiniLM int8 0.31x torch instead of 0.42x at b8 s128); BERT, RoBERTa and "
                   "XLM-RoBERTa written from the merged weights in that form instead of traced (a first MiniLM "
                   "export 7 s, not 13 s). "
                   "Llama, Qwen2 "
                   "and Mistral without sliding windows: written from the merged weights with GroupQueryAttention, "
                   "RotaryEmbedding and SkipSimplifiedLayerNormalization, needing onnxruntime >= 1.22 (SmolLM2 int4 "
                   "decode 0.25x torch instead of 0.35x). All are contrib ops; docs/performance.md.")
@click.option("--sign", "sign", type=click.Path(path_type=Path), default=None, metavar="KEY.pem",
              help="Sign the bundle with this Ed25519 private key (export-adapter keygen): writes manifest.json.sig, "
                   "which verify --trusted-key checks. An encrypted key reads its password from "
                   "EXPORT_ADAPTER_SIGNING_PASSWORD.")
@click.option("--session-config", "session_config", multiple=True, metavar="KEY=VALUE",
              callback=lambda c, p, v: _parse_session_config(v),
              help="An onnxruntime session config entry the bundle carries, repeatable: parity runs with it, and "
                   "infer, generate, verify and bench use it. Allowed: " + ", ".join(
                       f"{k} ({'/'.join(v)})" for k, v in SESSION_CONFIG_VALUES.items()) + ".")
@click.option("--json", "as_json", is_flag=True, help="Print the Report (same object as parity.json) on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
def export(adapters: tuple[str, ...], keep_adapters: bool, base: str | None, revision: str | None, out: Path, task: str | None, labels: str | None,
           quantize: tuple[str, ...], int8_weights: str, int4_block_size: str, int4_embedding: bool, opset: int, max_length: int, overwrite: bool, allow_pickle: bool,
           trust_remote_code: bool, no_tokenizer: bool, probe_texts: Path | None,
           tolerances: tuple[tuple[str, float], ...], ort_format: bool, no_ort_fusions: bool, sign: Path | None,
           session_config: tuple[tuple[str, str], ...], as_json: bool, quiet: bool) -> None:
    """Merge a LoRA adapter into its base, export to ONNX, quantize, and prove parity with PyTorch.

    Writes OUT only when every variant passes its gate; otherwise exits 3 and keeps the diagnostics in
    OUT.rejected. The fp32 model is always produced: it is the reference for the others.

    With --keep-adapters the adapters stay swappable: the base graph takes every LoRA A/B pair as an input
    (zero by default, so no adapter = the base model) and each adapter is checked against its own merged
    PyTorch model, on every variant, and with switching between adapters in one session.
    """
    from .pipeline import ExportSpec, run_pipeline
    from .swap_build import parse_adapter_arg

    if max_length < 8:
        raise click.BadParameter("must be at least 8", param_hint="--max-length")
    if len(adapters) > 1 and not keep_adapters:
        raise click.UsageError("several --adapter options need --keep-adapters (a merged export takes one adapter)")
    pairs = tuple(parse_adapter_arg(a) for a in adapters) if keep_adapters else ((None, Path(adapters[0])),)
    spec = ExportSpec(
        adapter=pairs[0][1], out=out, keep_adapters=keep_adapters,
        adapters=tuple((n, p) for n, p in pairs if n is not None), base=base, revision=revision, task=task,
        labels=tuple(x.strip() for x in labels.split(",")) if labels else None,
        quantize=quantize or ("int8",), opset=opset, overwrite=overwrite, allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code, max_length=max_length, int4_block_size=int(int4_block_size),
        int4_embedding=int4_embedding, int8_weights=int8_weights, no_tokenizer=no_tokenizer, probe_texts=probe_texts, tolerances=tolerances,
        sign=sign, ort_format=ort_format, ort_fusions=not no_ort_fusions, session_config=session_config,
    )
    _show_report(lambda: run_pipeline(spec, _progress(quiet)), out, as_json)


def _parse_session_config(values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """--session-config KEY=VALUE, each checked against the entries a bundle may carry."""
    entries = dict(parse_config_entry(text) for text in values)
    try:
        check_session_config(entries)
    except UserInputError as e:
        raise click.BadParameter(str(e), param_hint="--session-config") from None
    return tuple(entries.items())


def _parse_tolerances(values: tuple[str, ...]) -> tuple[tuple[str, float], ...]:
    """--tolerance [VARIANT.]NAME=VALUE; the names are checked against the export's gates once the task is known."""
    out = []
    for v in values:
        name, sep, number = v.partition("=")
        try:
            value = float(number)
        except ValueError:
            value = None
        if not sep or not name.strip() or value is None:
            raise click.BadParameter(f"{v!r}: expected [VARIANT.]NAME=NUMBER, e.g. int8.max_prob_diff=0.3",
                                     param_hint="--tolerance")
        out.append((name.strip(), value))
    return tuple(out)


def _show_report(produce, out: Path, as_json: bool) -> None:
    """Run an export; print its Report (also the failed one with --json) or the human summary."""
    try:
        report = produce()
    except ParityError as e:
        if as_json and e.report is not None:
            emit_json(e.report)
        raise
    if as_json:
        emit_json(report.data)
    else:
        print_summary(report.data, out)


@cli.command("add-adapter")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--adapter", "adapter", required=True,
              help="peft adapter folder to add, as PATH or NAME=PATH (NAME defaults to the folder's name).")
@click.option("--base", default=None,
              help="Base model folder or hub id. Default: the bundle's base (needed when it was a local folder).")
@click.option("--allow-pickle", is_flag=True,
              help="Accept a pickle-only adapter (adapter_model.bin), loaded with weights_only=True.")
@click.option("--trust-remote-code", is_flag=True, help="Allow a base whose code lives in its hub repo.")
@click.option("--sign", "sign", type=click.Path(path_type=Path), default=None, metavar="KEY.pem",
              help="Re-sign the updated manifest (a signed bundle's old signature is removed: it no longer matches).")
@click.option("--json", "as_json", is_flag=True, help="Print the updated Report on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
def add_adapter_cmd(bundle: Path, adapter: str, base: str | None, allow_pickle: bool, trust_remote_code: bool,
                    sign: Path | None, as_json: bool, quiet: bool) -> None:
    """Convert one more peft adapter for a bundle exported with --keep-adapters (no base re-export).

    Refuses an adapter trained for another base or targeting modules the graph does not expose. The bundle is
    updated with the same staged, atomic publish as export: on any failure it is left untouched.
    """
    from .swap_add import add_adapter
    from .swap_build import parse_adapter_arg

    name, path = parse_adapter_arg(adapter)
    _show_report(lambda: add_adapter(bundle, path, name, base=base, allow_pickle=allow_pickle,
                                     trust_remote_code=trust_remote_code, progress=_progress(quiet), sign=sign),
                 bundle, as_json)


def _overrides(epochs: float | None, max_steps: int | None, learning_rate: float | None, batch_size: int | None,
               seed: int | None, quantize: tuple[str, ...] = (), int8_weights: str | None = None) -> dict[str, Any]:
    """CLI flags that override recipe values, as dotted recipe keys."""
    pairs = {"training.epochs": epochs, "training.max_steps": max_steps, "training.learning_rate": learning_rate,
             "training.batch_size": batch_size, "training.seed": seed,
             "export.quantize": list(quantize) if quantize else None, "export.int8_weights": int8_weights}
    return {k: v for k, v in pairs.items() if v is not None}


def _training_options(f):
    for opt in reversed([
        click.option("--epochs", type=float, default=None, help="Override training.epochs."),
        click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Override training.max_steps."),
        click.option("--learning-rate", type=float, default=None, help="Override training.learning_rate."),
        click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Override training.batch_size."),
        click.option("--seed", type=int, default=None, help="Override training.seed."),
        click.option("--work-dir", type=click.Path(path_type=Path), default=None,
                     help="Checkpoint folder. Default: .OUT.work beside the output (kept if the run stops early)."),
        click.option("--resume", is_flag=True, help="Continue from the last checkpoint in the work folder."),
    ]):
        f = opt(f)
    return f


@cli.group()
def recipe() -> None:
    """Validate recipes and print their JSON Schema."""


@recipe.command("check")
@click.argument("file", type=click.Path(path_type=Path))
def recipe_check(file: Path) -> None:
    """Validate a recipe: keys, types, and that its data files exist. Exit 0 when valid, 1 otherwise."""
    require_full("recipe check", RECIPE_MODULES)
    from .recipes import load_recipe

    r = load_recipe(file)
    click.echo(f"{file}: ok ({r.task} on {r.base}, LoRA r={r.lora.r}, quantize {', '.join(r.export.quantize)})")


@recipe.command("schema")
def recipe_schema_cmd() -> None:
    """Print the recipe JSON Schema (point your editor's YAML support at it)."""
    require_full("recipe schema", RECIPE_MODULES)
    from .recipes import recipe_schema

    emit_json(recipe_schema())


@cli.command()
@click.argument("recipe_file", metavar="RECIPE", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path),
              help="Adapter folder to write (safetensors, labels, training_metrics.json); published atomically.")
@_training_options
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the training metrics as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def finetune(recipe_file: Path, out: Path, epochs, max_steps, learning_rate, batch_size, seed, work_dir, resume,
             overwrite: bool, as_json: bool, quiet: bool) -> None:
    """Train a LoRA adapter from a recipe (peft + transformers Trainer, CPU).

    Runs unchanged under torchrun / accelerate launch (DDP with gloo); only rank 0 writes OUT.
    """
    require_full("finetune", FULL_MODULES + RECIPE_MODULES)
    from .finetune import finetune as run_finetune
    from .recipes import load_recipe

    r = load_recipe(recipe_file, _overrides(epochs, max_steps, learning_rate, batch_size, seed))
    result = run_finetune(r, out, work_dir=work_dir, resume=resume, overwrite=overwrite, quiet=quiet)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    metrics = {k: v for k, v in result.metrics.items() if k != "log_history"}
    if as_json:
        emit_json(metrics)
    else:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics["eval"].items()
                          if k in ("accuracy", "macro_f1", "entity_f1", "loss", "perplexity"))
        click.echo(f"adapter: {out}  ({metrics['global_step']} steps; eval {shown})")


@cli.command()
@click.argument("recipe_file", metavar="RECIPE", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Bundle folder to write.")
@_training_options
@click.option("--quantize", "quantize", multiple=True, type=click.Choice([*QUANTIZE_MODES, "none"]),
              help="Override export.quantize; repeatable (int4: text-generation recipes).")
@click.option("--int8-weights", type=click.Choice(INT8_WEIGHTS), default=None,
              help="Override export.int8_weights (encoders): auto, signed7 or unsigned; see export --help.")
@click.option("--tolerance", "tolerances", multiple=True, callback=lambda c, p, v: _parse_tolerances(v),
              metavar="[VARIANT.]NAME=VALUE",
              help="Override one parity threshold (adds to or replaces the recipe's tolerances.gates); repeatable.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (only after every check passed).")
@click.option("--json", "as_json", is_flag=True, help="Print the Report (same object as parity.json) on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
def run(recipe_file: Path, out: Path, epochs, max_steps, learning_rate, batch_size, seed, work_dir, resume,
        quantize: tuple[str, ...], int8_weights: str | None, tolerances: tuple[tuple[str, float], ...],
        overwrite: bool, as_json: bool, quiet: bool) -> None:
    """Fine-tune, merge, export, quantize and verify in one go: a recipe to a verified bundle.

    The report adds task-level parity: the task metric (accuracy, entity F1; for text-generation the token
    accuracy and perplexity of the reference responses) of PyTorch next to each ONNX variant on the recipe's
    eval data, gated by tolerances.max_metric_drop. Exit 3 when a gate fails.
    """
    require_full("run", FULL_MODULES + RECIPE_MODULES)
    from .recipes import load_recipe
    from .run import run_recipe

    r = load_recipe(recipe_file, _overrides(epochs, max_steps, learning_rate, batch_size, seed, quantize, int8_weights))
    if tolerances:
        gates = {**r.tolerances.gates, **dict(tolerances)}
        r = r.model_copy(update={"tolerances": r.tolerances.model_copy(update={"gates": gates})})
    _show_report(lambda: run_recipe(r, out, overwrite=overwrite, quiet=quiet, progress=_progress(quiet),
                                    work_dir=work_dir, resume=resume), out, as_json)


for _command in (keygen, verify, infer, generate, inspect, bench):
    cli.add_command(_command)


def main() -> None:
    try:
        cli(prog_name="export-adapter")
    finally:
        # The interpreter's collections at exit walk every object torch and transformers made (~360k):
        # 1.8 s of a 2.2 s exit on an AVX2 EPYC. Frozen objects are skipped; the process ends anyway.
        gc.freeze()


if __name__ == "__main__":
    main()
