"""Our sample data: sizes the README promises, no duplicates, train and eval never share an example."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "samples" / "data"
SETS = {"sentiment": ("text", 800), "ner": ("tokens", 300), "instructions": ("prompt", 200)}


def norm(x) -> str:
    text = " ".join(x) if isinstance(x, list) else str(x)
    return re.sub(r"[\W_]+", "", text.lower())


def rows(name: str, split: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name / f"{split}.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("name", sorted(SETS))
def test_no_duplicates_and_no_leak(name):
    key, minimum = SETS[name]
    train, eval_ = rows(name, "train"), rows(name, "eval")
    assert len(train) + len(eval_) >= minimum
    tn, en = [norm(r[key]) for r in train], [norm(r[key]) for r in eval_]
    assert len(set(tn)) == len(tn), "duplicate in train"
    assert len(set(en)) == len(en), "duplicate in eval"
    assert not set(tn) & set(en), "train and eval share an example"


def test_ner_tags_are_valid_bio():
    for r in rows("ner", "train") + rows("ner", "eval"):
        assert len(r["tokens"]) == len(r["tags"])
        prev = "O"
        for tag in r["tags"]:
            assert tag in {"O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"}
            if tag.startswith("I-"):
                assert prev[2:] == tag[2:], r["tokens"]
            prev = tag


def test_sentiment_labels_balanced():
    labels = [r["label"] for r in rows("sentiment", "train")]
    assert set(labels) == {"negative", "positive"}
    assert 0.4 < labels.count("positive") / len(labels) < 0.6
