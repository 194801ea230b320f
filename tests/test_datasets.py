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


def _scored(acc_units: list[bool], **metrics):
    import numpy as np

    from exporter.taskeval import Scored

    return Scored({"accuracy": float(np.mean(acc_units)), **metrics}, np.array(acc_units, dtype=bool))


def test_judge_fails_a_real_drop_and_passes_noise():
    torch = _scored([True] * 190 + [False] * 10)
    # 3 sentences lost, 0 gained: a 0.015 drop, but p = 0.125 (3 coin flips): noise, passes.
    noisy = _scored([True] * 187 + [False] * 13)
    # 12 lost, 2 gained: drop 0.05 with p = 0.0065: a real drop, fails.
    real = _scored([True] * 178 + [False] * 12 + [True] * 2 + [False] * 8)
    same = _scored([True] * 190 + [False] * 10)
    j = judge("text-classification", torch, {"fp32": same, "int8": noisy, "fp16": real}, 0.01, 200)
    v = j["variants"]
    assert v["fp32"]["passed"] and v["fp32"]["worse"] == v["fp32"]["better"] == 0
    assert v["int8"]["passed"] and v["int8"]["drop"] == pytest.approx(0.015) and v["int8"]["worse"] == 3
    assert v["int8"]["p_value"] == pytest.approx(0.125)
    assert not v["fp16"]["passed"] and (v["fp16"]["worse"], v["fp16"]["better"]) == (12, 2)
    assert v["fp16"]["p_value"] == pytest.approx(sum(__import__("math").comb(14, k) for k in range(12, 15)) / 2**14)
    # A significant drop within the tolerance passes too: the recipe allows it.
    small = judge("text-classification", torch, {"int8": real}, 0.06, 200)
    assert small["variants"]["int8"]["passed"]


def test_task_metric_drop_fails_the_export(factory, tmp_path, monkeypatch):
    """Wiring: a variant whose task metric drops past the tolerance is failed, and nothing is published."""
    from exporter import pipeline
    from exporter.errors import ParityError
    from exporter.pipeline import ExportSpec, run_pipeline
    from exporter.taskeval import TaskEvalSpec

    calls = []

    def fake_engine(ev, fn):
        calls.append(1)
        # PyTorch first (all 40 right), then each ONNX variant (half of them wrong): a real drop.
        return _scored([True] * 40 if len(calls) == 1 else [True, False] * 20, macro_f1=0.5)

    monkeypatch.setattr(pipeline, "run_engine", fake_engine)
    rows = tuple({"text": t, "label": "positive"} for t in ("good", "great", "fine"))
    spec = ExportSpec(adapter=factory.adapter("bert", "text-classification"), out=tmp_path / "b",
                      task_eval=TaskEvalSpec(rows, "text", "label", 0.01))
    with pytest.raises(ParityError) as e:
        run_pipeline(spec)
    assert "task metric accuracy 0.5000 vs PyTorch 1.0000" in str(e.value)
    assert "20 sentences got worse, 0 better" in str(e.value)
    assert not (tmp_path / "b").exists() and (tmp_path / "b.rejected" / "parity.json").exists()
