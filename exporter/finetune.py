"""LoRA fine-tuning with peft + the transformers Trainer -> a published adapter folder.

Runs unchanged under ``torchrun`` / ``accelerate launch`` (DDP, gloo on CPU): the Trainer shards the data,
all-reduces the gradients, and only rank 0 writes. Checkpoints live in a work folder beside the output so an
interrupted run can ``--resume``; the finished adapter is published by rename.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .bundle import check_out, output_lock, publish
from .datasets import accuracy_f1, entity_f1, read_rows, require_columns, split_rows
from .errors import UnsupportedError, UserInputError, require_full
from .formats import ADAPTER_SIDECAR
from .loading import resolve_base_name
from .recipes import Recipe, effective_yaml
from .tasks import get_task, is_decoder_task

METRICS_FILE = "training_metrics.json"


@dataclass(frozen=True)
class FinetuneResult:
    adapter: Path
    metrics: dict[str, Any]


@dataclass(frozen=True)
class TaskData:
    """Rows of one split, checked, with the label vocabulary of the run."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    labels: list[str] | None
    # Held out of train to choose the checkpoint (training.select_best); empty otherwise.
    validation: list[dict[str, Any]] = field(default_factory=list)


def load_task_data(recipe: Recipe) -> TaskData:
    d = recipe.data
    train = read_rows(d.train)
    if d.eval is not None:
        eval_rows = read_rows(d.eval)
    else:
        train, eval_rows = split_rows(train, d.eval_fraction, recipe.training.seed)
    cols = {"text-classification": [d.text_column, d.label_column],
            "token-classification": [d.text_column, d.label_column],
            "text-generation": [d.prompt_column, d.response_column]}.get(recipe.task)
    if cols is None:
        raise UnsupportedError(f"fine-tuning for task {recipe.task} is not supported; use text-classification, "
                               "token-classification or text-generation")
    require_columns(train, cols, d.train)
    require_columns(eval_rows, cols, d.eval or d.train)
    labels = None
    if recipe.task == "text-classification":
        seen = sorted({str(r[d.label_column]) for r in train})
        labels = d.labels or seen
        _check_labels(labels, {str(r[d.label_column]) for r in train + eval_rows}, recipe)
    elif recipe.task == "token-classification":
        for rows, path in ((train, d.train), (eval_rows, d.eval or d.train)):
            for n, r in enumerate(rows, 1):
                toks, tags = r[d.text_column], r[d.label_column]
                if not isinstance(toks, list) or not isinstance(tags, list) or len(toks) != len(tags):
                    raise UserInputError(f"{path}: row {n}: {d.text_column} and {d.label_column} must be lists of "
                                         "equal length (tokens and their BIO tags)")
        seen = sorted({t for r in train for t in r[d.label_column]}, key=lambda t: (t != "O", t[2:], t))
        labels = d.labels or seen
        _check_labels(labels, {t for r in train + eval_rows for t in r[d.label_column]}, recipe)
    validation: list[dict[str, Any]] = []
    if recipe.training.select_best:
        # A different seed from the eval split's so the two hold-outs are not the same rows.
        train, validation = split_rows(train, recipe.training.validation_fraction, recipe.training.seed + 1)
    return TaskData(train, eval_rows, labels, validation)


def _check_labels(labels: list[str], used: set[str], recipe: Recipe) -> None:
    unknown = sorted(used - set(labels))
    if unknown:
        raise UserInputError(
            f"label {unknown[0]!r} appears in the data but not in data.labels ({', '.join(labels)}); add it"
        )
    if len(labels) < 2:
        raise UserInputError(f"{recipe.task} needs at least 2 labels, the data has {len(labels)}")


def encode_rows(recipe: Recipe, rows: list[dict[str, Any]], tok, labels: list[str] | None) -> list[dict[str, Any]]:
    d, max_len = recipe.data, recipe.training.max_length
    out = []
    if recipe.task == "text-classification":
        index = {name: i for i, name in enumerate(labels or [])}
        for r in rows:
            enc = tok(str(r[d.text_column]), truncation=True, max_length=max_len)
            out.append({**enc, "labels": index[str(r[d.label_column])]})
    elif recipe.task == "token-classification":
        index = {name: i for i, name in enumerate(labels or [])}
        for r in rows:
            enc = tok(r[d.text_column], is_split_into_words=True, truncation=True, max_length=max_len)
            word_ids, prev, tags = enc.word_ids(), None, []
            for w in word_ids:
                # Only a word's first sub-token carries its tag; the rest are ignored by the loss.
                tags.append(-100 if w is None or w == prev else index[r[d.label_column][w]])
                prev = w
            out.append({**enc, "labels": tags})
    else:
        eos = tok.eos_token or ""
        for r in rows:
            prompt_ids = tok(format_prompt(tok, str(r[d.prompt_column])), add_special_tokens=True)["input_ids"]
            resp_ids = tok(str(r[d.response_column]) + eos, add_special_tokens=False)["input_ids"]
            ids = (prompt_ids + resp_ids)[:max_len]
            labels_ = ([-100] * len(prompt_ids) + resp_ids)[:max_len]
            out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels_})
    return out


def format_prompt(tok, prompt: str) -> str:
    """The tokenizer's chat template when it has one, else a plain prompt + newline: the one formatter that
    task-level parity and ``generate --chat`` use too (sandboxed; identical to transformers' rendering on the
    244 instruction rows with SmolLM2's template)."""
    from .runtime import chat_prompt

    return chat_prompt(getattr(tok, "chat_template", None), prompt, tok.bos_token or "", tok.eos_token or "")


class _SFTCollator:
    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: list[dict[str, Any]]):
        import torch

        n = max(len(b["input_ids"]) for b in batch)
        def pad(key: str, value: int):
            return torch.tensor([b[key] + [value] * (n - len(b[key])) for b in batch])
        return {"input_ids": pad("input_ids", self.pad_id), "attention_mask": pad("attention_mask", 0),
                "labels": pad("labels", -100)}


def _metrics_fn(task: str, labels: list[str] | None) -> Callable | None:
    import numpy as np

    if task == "text-classification":
        def compute(p):
            return accuracy_f1(np.argmax(p.predictions, -1).tolist(), p.label_ids.tolist(), len(labels))
        return compute
    if task == "token-classification":
        def compute(p):
            pred = np.argmax(p.predictions, -1)
            pt, gt = [], []
            for pr, gl in zip(pred, p.label_ids):
                keep = gl != -100
                pt.append([labels[i] for i in pr[keep]])
                gt.append([labels[i] for i in gl[keep]])
            return entity_f1(pt, gt)
        return compute
    return None


def lora_config(recipe: Recipe, model_type: str):
    from peft import LoraConfig

    from .tasks import get_arch

    arch = get_arch(model_type) if not is_decoder_task(recipe.task) else None
    targets = recipe.lora.target_modules or (list(arch.default_lora_targets) if arch else None)
    if not targets:
        raise UserInputError(f"lora.target_modules is required for {model_type} (no default registered)")
    to_save = recipe.lora.modules_to_save
    if to_save is None and arch is not None:
        to_save = list(arch.seq_cls_modules) if recipe.task == "text-classification" else ["classifier"]
    return LoraConfig(task_type=get_task(recipe.task).peft_task_types[0], r=recipe.lora.r, lora_alpha=recipe.lora.alpha,
                      lora_dropout=recipe.lora.dropout, target_modules=targets, modules_to_save=to_save,
                      use_rslora=recipe.lora.use_rslora, use_dora=recipe.lora.use_dora)


def _adapter_digest(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def finetune(recipe: Recipe, out: Path, *, work_dir: Path | None = None, resume: bool = False,
             overwrite: bool = False, quiet: bool = False, callbacks: list | None = None) -> FinetuneResult:
    """Train a LoRA adapter for the recipe and publish it at ``out`` (rank 0 only under DDP)."""
    require_full("finetune")
    import torch
    import transformers
    from peft import get_peft_model
    from transformers import (
        AutoTokenizer,
        DataCollatorForTokenClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    out = Path(out)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        check_out(out, overwrite)
    work_dir = Path(work_dir) if work_dir else out.parent / f".{out.name}.work"
    if resume and not _last_checkpoint(work_dir):
        raise UserInputError(f"--resume: no checkpoint in {work_dir}; run without --resume to start fresh")
    data = load_task_data(recipe)
    base = resolve_base_name(recipe.base, recipe.revision)
    transformers.set_seed(recipe.training.seed)
    tok = AutoTokenizer.from_pretrained(base.location, revision=base.revision,
                                        trust_remote_code=recipe.trust_remote_code)
    if is_decoder_task(recipe.task) and tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model_kwargs: dict[str, Any] = {"revision": base.revision, "trust_remote_code": recipe.trust_remote_code,
                                    "dtype": torch.float32}
    if data.labels:
        model_kwargs.update(num_labels=len(data.labels), id2label=dict(enumerate(data.labels)),
                            label2id={x: i for i, x in enumerate(data.labels)})
    from .stages import quiet_libraries

    with quiet_libraries():
        model = getattr(transformers, get_task(recipe.task).model_class).from_pretrained(base.location, **model_kwargs)
    if is_decoder_task(recipe.task) and model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    peft_model = get_peft_model(model, lora_config(recipe, base.model_type))
    train_set = encode_rows(recipe, data.train, tok, data.labels)
    eval_set = encode_rows(recipe, data.eval, tok, data.labels)
    # With select_best the Trainer scores checkpoints on the validation rows; eval is only reported.
    watch_set = encode_rows(recipe, data.validation, tok, data.labels) if data.validation else eval_set
    collator = {"text-classification": DataCollatorWithPadding(tok),
                "token-classification": DataCollatorForTokenClassification(tok)}.get(recipe.task,
                                                                                    _SFTCollator(tok.pad_token_id))
    t = recipe.training
    eval_steps = t.eval_steps
    if t.select_best and t.max_steps is not None and eval_steps is None:
        eval_steps = max(1, t.max_steps // 4)  # a few checkpoints to choose from
    strategy = "steps" if eval_steps else ("epoch" if t.max_steps is None else "no")
    best_metric = {"text-classification": "accuracy", "token-classification": "f1"}.get(recipe.task, "loss")
    args = TrainingArguments(
        output_dir=str(work_dir), per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=32,
        num_train_epochs=t.epochs, max_steps=t.max_steps or -1, learning_rate=t.learning_rate,
        weight_decay=t.weight_decay, warmup_steps=float(t.warmup_ratio), seed=t.seed, data_seed=t.seed,
        eval_strategy=strategy, save_strategy=strategy, eval_steps=eval_steps, save_steps=eval_steps,
        save_total_limit=2, logging_steps=max(1, eval_steps or 10), report_to=[], use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=quiet, ddp_backend="gloo" if world > 1 else None,
        remove_unused_columns=False, load_best_model_at_end=t.select_best,
        metric_for_best_model=f"validation_{best_metric}" if t.select_best else None,
        greater_is_better=best_metric != "loss" if t.select_best else None,
    )
    # Named, so the progress log says eval_validation_* for the rows that choose the checkpoint.
    trainer = Trainer(model=peft_model, args=args, train_dataset=train_set,
                      eval_dataset={"validation": watch_set} if data.validation else eval_set,
                      data_collator=collator, compute_metrics=_metrics_fn(recipe.task, data.labels),
                      callbacks=callbacks)
    if quiet:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # with the bar disabled it would print every log dict
    checkpoint = _last_checkpoint(work_dir) if resume else None
    # The Trainer prints its log lines on stdout, which belongs to our results.
    with contextlib.redirect_stdout(sys.stderr):
        train_out = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        final_eval = trainer.evaluate(eval_set)
        validation = trainer.evaluate(watch_set, metric_key_prefix="validation") if data.validation else None
    digest = _adapter_digest(peft_model)
    digests = [digest]
    if world > 1 and torch.distributed.is_initialized():
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, digest)
        digests = gathered
    metrics = {
        "task": recipe.task, "base": recipe.base, "labels": data.labels,
        "train_rows": len(data.train), "eval_rows": len(data.eval), "validation_rows": len(data.validation),
        "best_checkpoint": Path(trainer.state.best_model_checkpoint).name if t.select_best
        and trainer.state.best_model_checkpoint else None,
        "validation": {k.removeprefix("validation_"): v for k, v in validation.items()} if validation else None,
        "global_step": train_out.global_step, "train_loss": train_out.training_loss,
        "eval": {k.removeprefix("eval_"): v for k, v in final_eval.items()},
        "resumed_from": checkpoint.name if checkpoint else None,
        "world_size": world, "adapter_sha256_per_rank": digests,
        "log_history": trainer.state.log_history,
    }
    if is_decoder_task(recipe.task) and "loss" in metrics["eval"]:
        metrics["eval"]["perplexity"] = math.exp(min(50.0, metrics["eval"]["loss"]))
    if trainer.is_world_process_zero():
        _publish_adapter(peft_model, recipe, data, metrics, out, overwrite)
        shutil.rmtree(work_dir, ignore_errors=True)
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()
        # Free DDP's Reducer while the process group is still registered, and give gloo's worker thread the
        # GIL to finish destroying completed work (it decrefs Python tensors). Otherwise the last reference to
        # the group can drop in the Reducer's destructor, which joins that thread while holding the GIL: a
        # deadlock (measured: rank 1 hung in ~ProcessGroupGloo after rank 0 had exited).
        del trainer
        gc.collect()
        time.sleep(0.2)
        # Left alive, gloo's threads are torn down at interpreter exit and a rank can die with SIGABRT
        # ("terminate called without an active exception"), failing the whole torchrun (measured, flaky).
        torch.distributed.destroy_process_group()
    return FinetuneResult(out, metrics)


def _last_checkpoint(work_dir: Path) -> Path | None:
    if not work_dir.is_dir():
        return None
    points = [p for p in work_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return max(points, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _publish_adapter(peft_model, recipe: Recipe, data: TaskData, metrics: dict, out: Path, overwrite: bool) -> None:
    from .loading import public_base_name

    with output_lock(out):
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
        try:
            peft_model.peft_config["default"].base_model_name_or_path = public_base_name(recipe.base)
            with warnings.catch_warnings():
                # peft looks for a config at the (embedded:/local:) base name to detect vocabulary changes;
                # save_embedding_layers is decided by modules_to_save instead.
                warnings.filterwarnings("ignore", message="Could not find a config file")
                peft_model.save_pretrained(str(staging), safe_serialization=True)
            sidecar = {"labels": data.labels, "task": recipe.task}
            (staging / ADAPTER_SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
            (staging / METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=str) + "\n")
            (staging / "recipe.yaml").write_text(effective_yaml(recipe))
            publish(staging, out, overwrite)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
