"""Task-level parity: the task metric of PyTorch next to each ONNX variant on the user's eval data.

The eval rows are tokenized once with the bundle's tokenizer so every engine sees the same ids; only the
metrics reach the bundle, never the data. Torch-free: the PyTorch side is passed in as a callable.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .datasets import accuracy_f1, entity_f1
from .tasks import TASKS, is_decoder_task

BATCH = 32
# Decoders score every response token of every row; their logits are (batch, sequence, vocab), so smaller batches.
DECODER_BATCH = 8
PRIMARY_METRIC = {name: spec.metric for name, spec in TASKS.items() if spec.metric}


@dataclass(frozen=True)
class EvalSet:
    task: str
    labels: tuple[str, ...]
    feeds: tuple[dict[str, np.ndarray], ...]
    gold: tuple[Any, ...]  # label index per row, or the gold tag list per row
    # token-classification: per row, the (batch, row-in-batch, position) of each word's first sub-token
    word_positions: tuple[tuple[tuple[int, int, int], ...], ...] = ()


@dataclass(frozen=True)
class TaskEvalSpec:
    rows: tuple[dict[str, Any], ...]
    text_column: str  # text-generation: the prompt column
    label_column: str  # text-generation: the response column
    max_metric_drop: float
    max_length: int = 512  # text-generation: longest prompt + response scored (the training max_length)


def prepare_decoder(spec: TaskEvalSpec, tok, format_prompt: Callable[[str], str], eos_token: str,
                    max_length: int) -> EvalSet:
    """Prompt + reference response + EOS per row, left-padded in batches; ``gold`` holds, per batch, the next
    token each position must predict (-1 where nothing is scored: the prompt and the padding).

    ``format_prompt`` is what fine-tuning used (the chat template with the generation prompt), so every engine
    is scored on the exact sequences the adapter was trained on.
    """
    rows = list(spec.rows)
    feeds, gold = [], []
    for start in range(0, len(rows), DECODER_BATCH):
        seqs, targets = [], []
        for r in rows[start:start + DECODER_BATCH]:
            prompt = tok.encode(format_prompt(str(r[spec.text_column])), add_special_tokens=True).ids
            response = tok.encode(str(r[spec.label_column]) + eos_token, add_special_tokens=False).ids
            ids = (prompt + response)[:max_length]
            seqs.append(ids)
            # Position i predicts ids[i + 1]: score the positions whose next token is a response token.
            targets.append([ids[i + 1] if i + 1 >= len(prompt) else -1 for i in range(len(ids) - 1)] + [-1])
        width = max(len(x) for x in seqs)
        feeds.append({"input_ids": _left_pad(seqs, width, 0), "attention_mask": _left_pad([[1] * len(x) for x in seqs],
                                                                                      width, 0)})
        gold.append(_left_pad(targets, width, -1))
    return EvalSet("text-generation", (), tuple(feeds), tuple(gold))


def _left_pad(rows: list[list[int]], width: int, value: int) -> np.ndarray:
    """Left padding, as generate() pads a decoder's batch."""
    return np.array([[value] * (width - len(r)) + r for r in rows], dtype=np.int64)


def score_decoder(ev: EvalSet, logits: list[np.ndarray]) -> Scored:
    """Token accuracy, mean NLL and perplexity of the reference responses (teacher forcing)."""
    hits = total = 0
    nll = 0.0
    correct = []
    for lg, target in zip(logits, ev.gold):
        keep = target >= 0
        rows = lg[keep].astype(np.float64)
        want = target[keep]
        z = rows - rows.max(axis=1, keepdims=True)
        logp = z[np.arange(len(want)), want] - np.log(np.exp(z).sum(axis=1))
        right = rows.argmax(axis=1) == want
        correct.append(right)
        hits += int(right.sum())
        nll -= float(logp.sum())
        total += int(keep.sum())
    mean_nll = nll / max(total, 1)
    metrics = {"token_accuracy": hits / max(total, 1), "nll": mean_nll,
               "perplexity": float(np.exp(min(mean_nll, 50.0))), "tokens": total}
    return Scored(metrics, np.concatenate(correct) if correct else np.zeros(0, dtype=bool))


def prepare(task: str, spec: TaskEvalSpec, labels: tuple[str, ...], tok, input_names: tuple[str, ...]) -> EvalSet:
    from .probes import encode

    index = {name: i for i, name in enumerate(labels)}
    feeds, gold, positions = [], [], []
    rows = list(spec.rows)
    for b, start in enumerate(range(0, len(rows), BATCH)):
        chunk = rows[start:start + BATCH]
        if task == "text-classification":
            feeds.append(encode(tok, [str(r[spec.text_column]) for r in chunk], input_names))
            gold += [index[str(r[spec.label_column])] for r in chunk]
            continue
        encs = tok.encode_batch([list(r[spec.text_column]) for r in chunk], is_pretokenized=True)
        batch = {"input_ids": np.array([e.ids for e in encs], dtype=np.int64),
                 "attention_mask": np.array([e.attention_mask for e in encs], dtype=np.int64),
                 "token_type_ids": np.array([e.type_ids for e in encs], dtype=np.int64)}
        feeds.append({n: batch[n] for n in input_names})
        for j, (r, e) in enumerate(zip(chunk, encs)):
            first: dict[int, int] = {}
            for pos, w in enumerate(e.word_ids):
                if w is not None and w not in first:
                    first[w] = pos
            # Words cut off by truncation are scored as "O" predictions, as a deployed model would emit none.
            positions.append(tuple((b, j, first.get(w, -1)) for w in range(len(r[spec.label_column]))))
            gold.append(list(r[spec.label_column]))
    return EvalSet(task, labels, tuple(feeds), tuple(gold), tuple(positions))


@dataclass(frozen=True)
class Scored:
    """One engine's task metrics on the eval set, and per scored unit whether its prediction was right.

    Units: sentences (text-classification), words (token-classification: the word's tag), response tokens
    (text-generation: the reference token is the top-1). Pairing the units of two engines tells how many
    examples a variant changed, and in which direction.
    """

    metrics: dict[str, float]
    correct: np.ndarray


UNITS = {name: spec.metric_units for name, spec in TASKS.items() if spec.metric_units}


def score(ev: EvalSet, logits: list[np.ndarray]) -> Scored:
    if is_decoder_task(ev.task):
        return score_decoder(ev, logits)
    if ev.task == "text-classification":
        pred = np.concatenate([x.argmax(-1) for x in logits])
        return Scored(accuracy_f1(pred.tolist(), list(ev.gold), len(ev.labels)), pred == np.array(ev.gold))
    argmax = [x.argmax(-1) for x in logits]
    pred = [[ev.labels[argmax[b][j][p]] if p >= 0 else "O" for b, j, p in row] for row in ev.word_positions]
    correct = np.array([p == g for pr, gr in zip(pred, ev.gold) for p, g in zip(pr, gr)], dtype=bool)
    return Scored(entity_f1(pred, list(ev.gold)), correct)


def run_engine(ev: EvalSet, fn: Callable[[dict[str, np.ndarray]], np.ndarray]) -> Scored:
    return score(ev, [fn(f) for f in ev.feeds])


def mcnemar_p(worse: int, better: int) -> float:
    """Exact one-sided McNemar test: P(at least ``worse`` of the changed units got worse | no real difference)."""
    n = worse + better
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(worse, n + 1)) / 2**n


def judge(task: str, torch: Scored, variants: dict[str, Scored], max_drop: float, n_rows: int) -> dict[str, Any]:
    """A variant fails when its metric drops by more than ``max_drop`` *and* the paired units show the drop is
    real: significantly more units got worse than better (exact McNemar, p < TASK_METRIC_SIGNIFICANCE).

    A drop of two sentences in 192 that the variant also gains back elsewhere is noise, not damage.
    """
    from .tolerances import TASK_METRIC_SIGNIFICANCE

    key = PRIMARY_METRIC[task]
    ref = torch.metrics[key]
    out = {}
    for name, v in variants.items():
        drop = ref - v.metrics[key]
        worse = int((torch.correct & ~v.correct).sum())
        better = int((~torch.correct & v.correct).sum())
        p = mcnemar_p(worse, better)
        real = p < TASK_METRIC_SIGNIFICANCE
        out[name] = {"value": v.metrics[key], "drop": drop, "worse": worse, "better": better, "p_value": p,
                     "passed": drop <= max_drop + 1e-12 or not real, "all": v.metrics}
    return {"metric": key, "n_examples": n_rows, "units": UNITS[task], "n_units": int(len(torch.correct)),
            "max_drop": max_drop, "significance": TASK_METRIC_SIGNIFICANCE, "torch": ref, "torch_all": torch.metrics,
            "variants": out}
