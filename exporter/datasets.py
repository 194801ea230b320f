"""Local data files -> rows, and the task metrics (accuracy, macro-F1, seqeval-style entity F1).

Stdlib readers for JSON Lines, JSON and CSV; Parquet through pyarrow when it is installed. Torch-free.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any

from .errors import UserInputError


def read_rows(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = []
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserInputError(f"{path}:{n}: not valid JSON ({e.msg}); one JSON object per line") from None
        elif suffix == ".json":
            try:
                rows = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise UserInputError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rows, list):
                raise UserInputError(f"{path}: a .json data file must hold a list of objects")
        elif suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        elif suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise UserInputError(f"{path}: reading Parquet needs pyarrow; pip install pyarrow") from None
            rows = pq.read_table(path).to_pylist()
        else:
            raise UserInputError(f"{path}: unknown data format {suffix!r}; use .jsonl, .json, .csv or .parquet")
    except FileNotFoundError:
        raise UserInputError(f"{path}: data file not found") from None
    except UnicodeDecodeError:
        raise UserInputError(f"{path}: not UTF-8 text; re-save it as UTF-8") from None
    if not rows:
        raise UserInputError(f"{path}: no rows")
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise UserInputError(f"{path}: row {n} is not an object with named columns")
    return rows


def require_columns(rows: list[dict[str, Any]], columns: list[str], path: Path) -> None:
    for n, row in enumerate(rows, 1):
        missing = [c for c in columns if c not in row or row[c] in (None, "")]
        if missing:
            have = ", ".join(sorted(row)) or "none"
            raise UserInputError(
                f"{path}: row {n} has no {missing[0]!r} column (columns: {have}); set data.*_column in the recipe"
            )


def split_rows(rows: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list, list]:
    """A seeded hold-out split; the eval side always gets at least one row."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(rows) * fraction))
    if n_eval >= len(rows):
        raise UserInputError(f"only {len(rows)} training rows: too few to hold out an eval split; give data.eval")
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def accuracy_f1(pred: list[int], gold: list[int], n_labels: int) -> dict[str, float]:
    acc = sum(p == g for p, g in zip(pred, gold)) / max(1, len(gold))
    f1s = []
    for c in range(n_labels):
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        fp = sum(p == c and g != c for p, g in zip(pred, gold))
        fn = sum(p != c and g == c for p, g in zip(pred, gold))
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": acc, "macro_f1": sum(f1s) / max(1, len(f1s))}


def entity_spans(tags: list[str]) -> set[tuple[int, int, str]]:
    """BIO tags -> (start, end, type) spans, as seqeval's default (IOB2, lenient on a stray I-)."""
    spans, start, kind = set(), None, None
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, t = tag.partition("-")
        if start is not None and (prefix in ("O", "B") or t != kind):
            spans.add((start, i, kind))
            start, kind = None, None
        if prefix == "B" or (prefix == "I" and start is None):
            start, kind = i, t
    return spans


def entity_f1(pred: list[list[str]], gold: list[list[str]]) -> dict[str, float]:
    tp = n_pred = n_gold = 0
    correct = total = 0
    for p, g in zip(pred, gold):
        ps, gs = entity_spans(p), entity_spans(g)
        tp += len(ps & gs)
        n_pred += len(ps)
        n_gold += len(gs)
        correct += sum(a == b for a, b in zip(p, g))
        total += len(g)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"entity_f1": f1, "entity_precision": precision, "entity_recall": recall,
            "token_accuracy": correct / max(1, total)}
