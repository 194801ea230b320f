"""exporter/graph_cache.py: a graph reused for another adapter of the same base is the graph a fresh export
writes, and a cache entry that does not fit is never used. On DistilBERT: BERT and RoBERTa graphs are written
from the weights (encoder_graph.py), not traced, so they never reach the cache."""

from __future__ import annotations

import logging

import onnx
import pytest

from exporter import graph_cache
from exporter.pipeline import ExportSpec, run_pipeline


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "graphs"
    monkeypatch.setenv(graph_cache.ENV, str(folder))
    return folder


def _export(adapter, out, **kw):
    return run_pipeline(ExportSpec(adapter=adapter, out=out, quantize=("int8",), **kw))


def _second_adapter(factory, tmp_path):
    from helpers import make_adapter

    return make_adapter(factory.base("distilbert"), "distilbert", "text-classification", tmp_path / "other", r=8, seed=7)


def test_a_reused_graph_is_the_fresh_graph_byte_for_byte(factory, tmp_path, cache, monkeypatch, caplog):
    first, second = factory.adapter("distilbert", "text-classification"), _second_adapter(factory, tmp_path)
    assert _export(first, tmp_path / "a").passed
    entries = list(cache.glob("*.onnx"))
    assert len(entries) == 1
    # The entry holds the graph, not the weights: the module's tensors (named model.*) are empty.
    weights = [i for i in onnx.load(str(entries[0])).graph.initializer if i.name.startswith("model.")]
    assert len(weights) > 10 and not any(i.raw_data for i in weights)

    with caplog.at_level(logging.INFO, logger="exporter.graph_cache"):
        assert _export(second, tmp_path / "b").passed
    assert "graph cache: reusing" in caplog.text
    assert list(cache.glob("*.onnx")) == entries  # the same key: one entry for the base

    monkeypatch.setenv(graph_cache.ENV, "off")
    assert _export(second, tmp_path / "fresh").passed
    assert (tmp_path / "b/onnx/model.onnx").read_bytes() == (tmp_path / "fresh/onnx/model.onnx").read_bytes()
    assert (tmp_path / "b/onnx/model_quantized.onnx").read_bytes() == \
        (tmp_path / "fresh/onnx/model_quantized.onnx").read_bytes()
    # The two adapters' graphs differ in their weights (the cache did not hand back the first one's).
    assert (tmp_path / "a/onnx/model.onnx").read_bytes() != (tmp_path / "b/onnx/model.onnx").read_bytes()


@pytest.fixture(scope="module")
def fresh_entry(factory, tmp_path_factory):
    """One export's cache entry and fp32 graph, made once for the damage cases."""
    root = tmp_path_factory.mktemp("graph-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv(graph_cache.ENV, str(root / "graphs"))
    try:
        assert _export(factory.adapter("distilbert", "text-classification"), root / "a").passed
    finally:
        mp.undo()
    (entry,) = (root / "graphs").glob("*.onnx")
    return entry, (root / "a/onnx/model.onnx").read_bytes()


@pytest.mark.parametrize("damage", ["garbage", "marker", "shape"])
def test_an_entry_that_does_not_fit_is_not_used(factory, tmp_path, cache, caplog, fresh_entry, damage):
    source, fp32 = fresh_entry
    entry = cache / source.name
    cache.mkdir()
    if damage == "garbage":
        entry.write_bytes(b"\x00not a graph" * 10)
    else:
        model = onnx.load(str(source))
        if damage == "marker":  # one tensor fewer emptied than the entry says
            model.metadata_props[0].value = str(int(model.metadata_props[0].value) + 1)
        else:  # a weight of another shape under the same name
            init = next(i for i in model.graph.initializer if i.name.endswith("q_lin.weight"))
            init.dims[0] += 1
        onnx.save(model, str(entry))
    with caplog.at_level(logging.WARNING, logger="exporter.graph_cache"):
        report = _export(factory.adapter("distilbert", "text-classification"), tmp_path / "b")
    assert report.passed
    assert "exporting afresh" in caplog.text
    assert (tmp_path / "b/onnx/model.onnx").read_bytes() == fp32


def test_the_key_follows_what_the_trace_depends_on(factory):
    import torch
    from transformers import AutoModelForSequenceClassification

    base = factory.base("distilbert")
    two = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2).eval()
    again = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2).eval()
    three = AutoModelForSequenceClassification.from_pretrained(base, num_labels=3).eval()
    with torch.no_grad():
        again.classifier.weight.add_(1.0)  # other values, same structure
    args = (torch.ones(2, 5, dtype=torch.int64),)

    def key(model, args=args, opset=20):
        return graph_cache.graph_key(model, args, ("input_ids",), ("logits",), opset, "dims")

    assert key(two) == key(again)
    assert len({key(two), key(three), key(two, opset=18), key(two, args=(torch.ones(2, 6, dtype=torch.int64),))}) == 4
