"""exporter/encoder_graph.py: BERT graphs written from the weights compute what the PyTorch model does in every
encoder task and pooling, padded batches included, have the tuned graph's structure, and the exporter traces
whatever the writer does not cover."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from exporter.fusions import _nodes
from exporter.tasks import TASKS


def _model(factory, task: str, arch: str = "bert", **config):
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    cfg = AutoConfig.from_pretrained(factory.base(arch))
    for k, v in config.items():
        setattr(cfg, k, v)
    cls = {"text-classification": AutoModelForSequenceClassification,
           "token-classification": AutoModelForTokenClassification, "feature-extraction": AutoModel}[task]
    if task != "feature-extraction":
        cfg.num_labels = 3
    torch.manual_seed(5)
    model = cls.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # no weight left at its init value (biases are zeros), so a wrong wire shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _feeds(names, vocab: int) -> list[dict[str, np.ndarray]]:
    """A padded batch (one row padded by 4, one by 7) and a single unpadded row: both If branches."""
    rng = np.random.default_rng(0)
    ids = rng.integers(5, vocab, (3, 11))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    types = np.zeros_like(ids)
    types[:, 6:] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return [{n: batch[n] for n in names}, {n: batch[n][:1] for n in names}]


@pytest.mark.parametrize("arch, task, pooling, opset, config", [
    ("bert", "text-classification", None, 20, {}),
    ("bert", "text-classification", None, 20, {"type_vocab_size": 1}),  # no token_type_ids: the zero type's row
    ("bert", "token-classification", None, 17, {}),
    ("bert", "feature-extraction", {"mode": "mean", "normalize": False}, 20, {}),
    ("bert", "feature-extraction", {"mode": "max", "normalize": True}, 17, {}),  # Reduce* axes as attributes
    ("bert", "feature-extraction", {"mode": "cls", "normalize": True}, 20, {}),
    ("roberta", "text-classification", None, 20, {}),  # positions counted after the padding index; dense+out_proj
    ("xlm-roberta", "token-classification", None, 20, {}),
    ("roberta", "feature-extraction", {"mode": "mean", "normalize": True}, 20, {}),
], ids=["seq-cls", "seq-cls-one-type", "token-cls-opset17", "mean", "max-normalized-opset17", "cls-normalized",
        "roberta-seq-cls", "xlm-roberta-token-cls", "roberta-mean"])
def test_written_graph_equals_pytorch_and_has_the_tuned_structure(factory, tmp_path, arch, task, pooling, opset,
                                                                  config):
    import onnxruntime as ort

    from exporter.encoder_graph import export_encoder_graph, unsupported_reason
    from exporter.onnx_export import make_wrapper, run_torch
    from exporter.tasks import ARCHITECTURES, input_names

    model = _model(factory, task, arch, **config)
    spec = TASKS[task]
    assert unsupported_reason(model, spec) is None
    names = input_names(ARCHITECTURES[arch], model.config.type_vocab_size)
    assert ("token_type_ids" in names) == (model.config.type_vocab_size > 1)
    path = tmp_path / "model.onnx"
    art, fused = export_encoder_graph(model, spec, names, pooling, path, opset)
    layers = model.config.num_hidden_layers
    assert fused == {"BiasGelu": layers, "MultiHeadAttention": layers}
    proto = onnx.load(str(path))
    ops = [n.op_type for n in _nodes(proto.graph)]
    # Each attention is If(nothing padded) then MultiHeadAttention else the exported chain (fusions.py), every
    # layer norm one LayerNormalization on a 2-D view; no shape arithmetic but the layer norms' and one Range.
    assert ops.count("If") == layers and ops.count("MultiHeadAttention") == layers and ops.count("Softmax") == layers
    assert ops.count("LayerNormalization") == ops.count("Flatten") == 2 * layers + 1
    ranged = arch == "bert"  # BERT's positions are a Range; RoBERTa's count the tokens that are not padding
    assert ops.count("Shape") == 2 * layers + 1 + ranged and ops.count("Range") == ranged, ops
    assert ops.count("CumSum") == (not ranged), ops
    assert [i.name for i in proto.graph.input] == list(names) and list(art.output_names) == [o.name for o in
                                                                                             spec.outputs]
    axes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in proto.graph.output}
    assert all(dims[0] == "batch_size" for dims in axes.values()), axes
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wrapper = make_wrapper(model, spec, names, pooling)
    for feeds in _feeds(names, model.config.vocab_size):
        got = dict(zip(art.output_names, session.run(None, feeds)))
        want = run_torch(wrapper, feeds, art.output_names)
        for name in art.output_names:
            valid = feeds["attention_mask"].astype(bool) if got[name].ndim == 3 else slice(None)
            # float32 kernels in another order than torch's, on values of magnitude ~0.1-3 (random weights)
            assert np.abs(got[name] - want[name])[valid].max() < 1e-5, (name, feeds["input_ids"].shape)


def test_bert_bundles_are_written_and_the_rest_traced(factory, tmp_path):
    from exporter.encoder_graph import unsupported_reason
    from exporter.pipeline import ExportSpec, run_pipeline

    out, report = factory.bundle("bert", "text-classification")
    assert report.passed
    assert onnx.load(str(out / "onnx/model.onnx"), load_external_data=False).producer_name == "export-adapter"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["onnxruntime_fusions"] is True
    # --no-ort-fusions: the traced graph, standard ONNX.
    plain = tmp_path / "plain"
    assert run_pipeline(ExportSpec(adapter=factory.adapter("bert", "text-classification"), out=plain, quantize=(),
                                   ort_fusions=False)).passed
    proto = onnx.load(str(plain / "onnx/model.onnx"), load_external_data=False)
    assert proto.producer_name != "export-adapter" and {n.domain for n in _nodes(proto.graph)} <= {"", "ai.onnx"}
    # What the writer does not cover is traced (and passes its gates as before).
    assert "not gelu" in unsupported_reason(_model(factory, "text-classification", hidden_act="gelu_new"),
                                            TASKS["text-classification"])
    assert "not one of" in unsupported_reason(_model_of(factory, "distilbert"), TASKS["text-classification"])
    # An unmerged LoRA layer still has a .weight (its base's): refused, not written without its delta.
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(_model(factory, "text-classification"), LoraConfig(r=2, target_modules=["query"]))
    assert "not a plain layer" in unsupported_reason(wrapped.base_model.model, TASKS["text-classification"])
    traced, report = factory.bundle("distilbert", "text-classification")
    assert report.passed
    assert onnx.load(str(traced / "onnx/model.onnx"), load_external_data=False).producer_name != "export-adapter"


def _model_of(factory, arch: str):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(factory.base(arch), num_labels=2).eval()
