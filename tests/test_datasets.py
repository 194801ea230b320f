"""Data readers, the seeded split, and the metrics (checked against hand-computed values)."""

from __future__ import annotations

import json

import pytest

from exporter.datasets import accuracy_f1, entity_f1, entity_spans, read_rows, split_rows
from exporter.errors import UserInputError
from exporter.taskeval import judge


def test_readers_agree_across_formats(tmp_path):
    rows = [{"text": "good, really", "label": "pos"}, {"text": 'said "bad"', "label": "neg"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text('text,label\n"good, really",pos\n"said ""bad""",neg\n')
    for ext in ("jsonl", "json", "csv"):
        assert read_rows(tmp_path / f"d.{ext}") == rows, ext


def test_reader_errors_name_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(UserInputError, match=r"bad.jsonl:2: not valid JSON"):
        read_rows(tmp_path / "bad.jsonl")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(UserInputError, match="unknown data format"):
        read_rows(tmp_path / "x.txt")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserInputError, match="no rows"):
        read_rows(tmp_path / "empty.jsonl")


def test_split_is_seeded_and_disjoint():
    rows = [{"i": i} for i in range(50)]
    a_train, a_eval = split_rows(rows, 0.2, seed=3)
    b_train, b_eval = split_rows(rows, 0.2, seed=3)
    assert a_eval == b_eval and len(a_eval) == 10 and len(a_train) == 40
    assert not {r["i"] for r in a_train} & {r["i"] for r in a_eval}
    assert split_rows(rows, 0.2, seed=4)[1] != a_eval


def test_accuracy_and_macro_f1_by_hand():
    m = accuracy_f1([0, 0, 1, 1], [0, 1, 1, 1], 2)
    assert m["accuracy"] == 0.75
    # class 0: tp1 fp1 fn0 -> 2/3; class 1: tp2 fp0 fn1 -> 4/5
    assert m["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)


def test_entity_f1_seqeval_style():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "I-ORG", "I-ORG"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "I-ORG", "O"]]
    assert entity_spans(gold[0]) == {(0, 2, "PER"), (3, 4, "LOC")}
    assert entity_spans(["I-LOC", "I-LOC"]) == {(0, 2, "LOC")}  # a stray I- starts an entity, as in seqeval
    m = entity_f1(pred, gold)
    # gold 3 entities, pred 3, correct 1 (PER) -> P = R = F1 = 1/3
    assert m["entity_f1"] == pytest.approx(1 / 3) and m["entity_precision"] == pytest.approx(1 / 3)


def test_judge_gates_the_drop():
    j = judge("text-classification", {"accuracy": 0.95},
              {"fp32": {"accuracy": 0.95}, "int8": {"accuracy": 0.935}, "fp16": {"accuracy": 0.94}}, 0.01, 200)
    assert j["variants"]["fp32"]["passed"] and j["variants"]["fp16"]["passed"]
    assert not j["variants"]["int8"]["passed"] and j["variants"]["int8"]["drop"] == pytest.approx(0.015)


def test_task_metric_drop_fails_the_export(factory, tmp_path, monkeypatch):
    """Wiring: a variant whose task metric drops past the tolerance is failed, and nothing is published."""
    from exporter import pipeline
    from exporter.errors import ParityError
    from exporter.pipeline import ExportSpec, run_pipeline
    from exporter.taskeval import TaskEvalSpec

    calls = []

    def fake_engine(ev, fn):
        calls.append(1)
        return {"accuracy": 1.0 if len(calls) == 1 else 0.5, "macro_f1": 0.5}  # PyTorch first, then ONNX

    monkeypatch.setattr(pipeline, "run_engine", fake_engine)
    rows = tuple({"text": t, "label": "positive"} for t in ("good", "great", "fine"))
    spec = ExportSpec(adapter=factory.adapter("bert", "text-classification"), out=tmp_path / "b",
                      task_eval=TaskEvalSpec(rows, "text", "label", 0.01))
    with pytest.raises(ParityError) as e:
        run_pipeline(spec)
    assert "task metric accuracy 0.5000 vs PyTorch 1.0000" in str(e.value)
    assert not (tmp_path / "b").exists() and (tmp_path / "b.rejected" / "parity.json").exists()
