"""Task-level parity: the task metric of PyTorch next to each ONNX variant on the user's eval data.

The eval rows are tokenized once with the bundle's tokenizer so every engine sees the same ids; only the
metrics reach the bundle, never the data. Torch-free: the PyTorch side is passed in as a callable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .datasets import accuracy_f1, entity_f1

BATCH = 32
PRIMARY_METRIC = {"text-classification": "accuracy", "token-classification": "entity_f1"}


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
    text_column: str
    label_column: str
    max_metric_drop: float


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


def score(ev: EvalSet, logits: list[np.ndarray]) -> dict[str, float]:
    if ev.task == "text-classification":
        pred = np.concatenate([x.argmax(-1) for x in logits]).tolist()
        return accuracy_f1(pred, list(ev.gold), len(ev.labels))
    argmax = [x.argmax(-1) for x in logits]
    pred = [[ev.labels[argmax[b][j][p]] if p >= 0 else "O" for b, j, p in row] for row in ev.word_positions]
    return entity_f1(pred, list(ev.gold))


def run_engine(ev: EvalSet, fn: Callable[[dict[str, np.ndarray]], np.ndarray]) -> dict[str, float]:
    return score(ev, [fn(f) for f in ev.feeds])


def judge(task: str, torch_metrics: dict[str, float], variant_metrics: dict[str, dict[str, float]],
          max_drop: float, n_rows: int) -> dict[str, Any]:
    key = PRIMARY_METRIC[task]
    ref = torch_metrics[key]
    variants = {}
    for name, m in variant_metrics.items():
        drop = ref - m[key]
        variants[name] = {"value": m[key], "drop": drop, "passed": drop <= max_drop + 1e-12, "all": m}
    return {"metric": key, "n_examples": n_rows, "max_drop": max_drop, "torch": ref, "torch_all": torch_metrics,
            "variants": variants}
