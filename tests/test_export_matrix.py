"""Every registered encoder architecture x every task: export, gates, bundle contract, verify."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import TINY_ARCHS

from exporter.bundle import MANIFEST, MANIFEST_SHA
from exporter.formats import sha256_file
from exporter.tasks import ARCHITECTURES, ENCODER_TASKS, TASKS
from exporter.tolerances import FP32_ATOL, FP32_RTOL
from exporter.verify import verify_bundle

CASES = [(a, t) for a in TINY_ARCHS for t in ENCODER_TASKS]


def test_every_registered_architecture_is_tested():
    assert set(ARCHITECTURES) == set(TINY_ARCHS), "a registered architecture has no tiny test config"


@pytest.mark.parametrize("arch,task", CASES)
def test_export_passes_gates_and_writes_contract(factory, arch, task):
    out, report = factory.bundle(arch, task)
    data = report.data
    assert data["passed"], data["variants"]
    assert set(data["variants"]) == {"fp32", "int8", "fp16"}
    # The adapter must really change the model, or parity proves nothing.
    assert data["adapter_effect"]["meaningful"]
    assert min(data["adapter_effect"]["max_abs_diff"].values()) > 10 * FP32_ATOL
    fp32 = data["variants"]["fp32"]["outputs"]
    for m in fp32.values():
        assert m["n_over_tolerance"] == 0 and m["max_abs_diff"] <= FP32_ATOL + FP32_RTOL * 10
    for name in ("onnx/model.onnx", "onnx/model_quantized.onnx", "onnx/model_fp16.onnx", "tokenizer.json", "config.json",
                 "parity.json", "parity.md", MANIFEST, MANIFEST_SHA, "reference/probes.json",
                 "reference/inputs.npz", "reference/outputs.npz"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["task"] == task
    assert manifest["versions"]["torch"] and manifest["versions"]["onnxruntime"]
    for rel, digest in manifest["files"].items():
        assert sha256_file(out / rel) == digest
    assert (out / MANIFEST_SHA).read_text().split()[0] == sha256_file(out / MANIFEST)
    expected_outputs = [o.name for o in TASKS[task].outputs]
    assert [o["name"] for o in manifest["outputs"]] == expected_outputs
    inputs = [i["name"] for i in manifest["inputs"]]
    assert inputs[:2] == ["input_ids", "attention_mask"]
    assert ("token_type_ids" in inputs) == (arch == "bert")
    # No machine path of the test's temporary folders may leak into the bundle's metadata.
    for f in list(out.glob("*.json")) + list(out.glob("*.md")) + [out / "reference/probes.json"]:
        assert str(factory.root_dir) not in f.read_text(), f.name


@pytest.mark.parametrize("arch,task", CASES[:3] + [("distilbert", "token-classification")])
def test_published_bundle_verifies_with_stored_thresholds(factory, arch, task):
    out, _ = factory.bundle(arch, task)
    report = verify_bundle(out)
    assert report["passed"], report
    assert report["integrity"] == {"passed": True, "problems": []}
    assert set(report["variants"]) == {"fp32", "int8", "fp16"}


def test_onnx_graph_has_dynamic_axes_and_onnxruntime_fusions(factory):
    import onnx

    from exporter.fusions import ATTENTION_MIN_ONNXRUNTIME

    out, _ = factory.bundle("bert", "text-classification")
    model = onnx.load(str(out / "onnx/model.onnx"))
    fused = {n.op_type for n in model.graph.node if n.domain == "com.microsoft"}
    # 2 layers of a tiny bert, each fully fused; the SkipLayerNormalizations then unfused (fusions.py)
    assert fused == {"BiasGelu"}, fused
    assert {n.domain for n in model.graph.node} == {"", "com.microsoft"}
    for variant in ("model.onnx", "model_quantized.onnx", "model_fp16.onnx"):
        graph = onnx.load(str(out / "onnx" / variant)).graph
        ops = [n.op_type for n in graph.node]
        # 5 layer norms (embeddings, 2 per layer), each one LayerNormalization on a 2-D view
        assert ops.count("LayerNormalization") == 5 == ops.count("Flatten"), variant
        assert "SkipLayerNormalization" not in ops, variant
        # int8: each BiasGelu's bias moves into the quantized MatMul before it, and Gelu runs alone
        assert (ops.count("BiasGelu"), ops.count("Gelu")) == ((0, 2) if "quantized" in variant else (2, 0)), variant
        # Each layer's attention: If(mask all zeros) then MultiHeadAttention else the exported chain.
        ifs = [n for n in graph.node if n.op_type == "If"]
        assert len(ifs) == 2 and "Softmax" not in ops, variant
        for node in ifs:
            then, other = (next(a.g for a in node.attribute if a.name == k) for k in ("then_branch", "else_branch"))
            assert [n.op_type for n in then.node] == ["MultiHeadAttention"], variant
            assert {"Softmax", "MatMul", "Add"} <= {n.op_type for n in other.node}, variant
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["onnxruntime_fusions"] is True
    assert manifest["min_onnxruntime"] == ATTENTION_MIN_ONNXRUNTIME  # MultiHeadAttention, tried from 1.20
    for inp in model.graph.input:
        dims = [d.dim_param for d in inp.type.tensor_type.shape.dim]
        assert dims == ["batch_size", "sequence"], (inp.name, dims)
    assert [o.name for o in model.graph.output] == ["logits"]


def test_runtime_handles_unseen_batch_and_length(factory):
    from exporter.runtime import BundleModel

    out, _ = factory.bundle("roberta", "token-classification")
    model = BundleModel(out, "fp32")
    texts = ["a b c d e f g h i j k l m n o p q r s t u v w x y z " * 3, "hi", "ok then", "x", "the end"]
    results = model.infer(texts)
    assert len(results) == 5
    assert all(t["label"] in model.labels for r in results for t in r["tokens"])
    assert len(results[1]["tokens"]) == 2  # "hi" -> h, ##i (specials and padding excluded)


def test_feature_extraction_embedding_is_mean_pooled_hidden_state(factory):
    from exporter.runtime import BundleModel

    out, _ = factory.bundle("bert", "feature-extraction")
    model = BundleModel(out, "fp32")
    feeds = model.encode(["Great.", "The battery died after two days."])
    res = model.run(feeds)
    mask = feeds["attention_mask"][..., None]
    mean = (res["last_hidden_state"] * mask).sum(1) / mask.sum(1)
    np.testing.assert_allclose(res["sentence_embedding"], mean, rtol=1e-5, atol=1e-6)


def test_adapter_that_grew_the_vocabulary_is_carried_over(factory, tmp_path):
    """modules_to_save with a resized embedding matrix and the adapter's own tokenizer (added tokens)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from exporter.pipeline import ExportSpec, run_pipeline
    from exporter.runtime import BundleModel

    base = factory.base("bert")
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_tokens(["<product>", "<brand>"])
    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    model.resize_token_embeddings(len(tok))
    pm = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"],
                                          modules_to_save=["classifier", "word_embeddings"], init_lora_weights=False))
    with torch.no_grad():  # the new tokens' embeddings are "trained": make them distinctive
        pm.base_model.model.bert.embeddings.word_embeddings.modules_to_save["default"].weight[-2:] += 1.0
    adapter = tmp_path / "grown"
    pm.save_pretrained(adapter)
    tok.save_pretrained(adapter)
    report = run_pipeline(ExportSpec(adapter=adapter, out=tmp_path / "b", base=str(base), labels=("no", "yes")))
    assert report.passed, report.data["variants"]
    bundle = BundleModel(tmp_path / "b", "fp32")
    ids = bundle.encode(["<product> is great"])["input_ids"][0]
    assert len(tok) - 2 in ids  # the added token survives into the bundle's tokenizer.json
    # The exported model uses the adapter's trained rows for the new tokens: compare with PyTorch.
    merged = pm.merge_and_unload().eval()
    enc = {k: torch.from_numpy(v) for k, v in bundle.encode(["<product> <brand> ok"]).items()}
    with torch.no_grad():
        ref = merged(**enc).logits.numpy()
    got = bundle.run({k: v.numpy() for k, v in enc.items()})["logits"]
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-3)


def test_adapter_with_extra_modules_to_save_and_overlapping_target(factory, tmp_path):
    """modules_to_save=[classifier, pooler] while 'dense' is a LoRA target: peft keeps pooler.dense whole."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from exporter.pipeline import ExportSpec, run_pipeline

    base = factory.base("bert")
    torch.manual_seed(4)
    pm = get_peft_model(AutoModelForSequenceClassification.from_pretrained(base, num_labels=2),
                        LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "dense"],
                                   modules_to_save=["classifier", "pooler"], init_lora_weights=False))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".modules_to_save." in name:
                p.mul_(5.0)  # "trained": the head and pooler differ from the base
    adapter = tmp_path / "pooler"
    pm.save_pretrained(adapter)
    report = run_pipeline(ExportSpec(adapter=adapter, out=tmp_path / "b", base=str(base), labels=("a", "b")))
    assert report.passed, report.data["variants"]
    merged = pm.merge_and_unload().eval()
    from exporter.runtime import BundleModel

    bundle = BundleModel(tmp_path / "b", "fp32")
    feeds = bundle.encode(["great", "the battery died"])
    with torch.no_grad():
        ref = merged(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    np.testing.assert_allclose(bundle.run(feeds)["logits"], ref, atol=1e-4, rtol=1e-3)


def _int8_weights(out):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(out / "onnx" / "model_quantized.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return [inits[n.input[1]] for n in model.graph.node if n.op_type == "MatMulInteger" and n.input[1] in inits]


@pytest.mark.parametrize("arch,task", CASES)
def test_the_encoder_int8_weights_are_the_format_the_manifest_records(factory, arch, task):
    """Both formats are exact on every ISA (tests/test_quant_numerics.py): int8 within +-64 (signed7) or uint8;
    auto falls back to unsigned only after signed7 failed its gate, and the report says so."""
    out, report = factory.bundle(arch, task)
    dtype = json.loads((out / MANIFEST).read_text())["variants"]["int8"]["dtype"]
    weights = _int8_weights(out)
    fell_back = [w for w in report.data["warnings"] if "7-bit signed weights (the fast kernel) failed" in w]
    assert len(weights) >= 4
    if dtype == "int8-dynamic-per-channel-u8s7":
        assert all(w.dtype == np.int8 and np.abs(w.astype(np.int32)).max() <= 64 for w in weights)
        assert not fell_back
    else:
        assert dtype == "int8-dynamic-per-channel-u8u8" and all(w.dtype == np.uint8 for w in weights)
        assert len(fell_back) == 1


def test_int8_auto_falls_back_to_unsigned_weights_where_signed7_fails_the_gate(factory, tmp_path):
    """A user's int8 tolerance between what the two formats reach: auto keeps the one that passes and says so;
    forcing signed7 fails the gate instead."""
    from exporter.errors import ParityError
    from exporter.pipeline import ExportSpec, run_pipeline

    adapter = factory.adapter("bert", "text-classification")

    def export(name, weights, tolerances=()):
        return run_pipeline(ExportSpec(adapter=adapter, out=tmp_path / name, quantize=("int8",), int8_weights=weights,
                                       tolerances=tolerances))

    def kl(report):
        return report.data["variants"]["int8"]["outputs"]["logits"]["mean_kl"]

    s7, unsigned = export("s7", "signed7"), export("u", "unsigned")
    assert kl(s7) > 1.5 * kl(unsigned) > 0  # half the weight resolution: visibly more error
    between = (("int8.max_mean_kl", float(np.sqrt(kl(s7) * kl(unsigned)))),)
    report = export("auto", "auto", between)
    assert report.passed
    manifest = json.loads((tmp_path / "auto" / MANIFEST).read_text())
    assert manifest["variants"]["int8"]["dtype"] == "int8-dynamic-per-channel-u8u8"
    assert all(w.dtype == np.uint8 for w in _int8_weights(tmp_path / "auto"))
    assert [w for w in report.data["warnings"] if "failed the gate (logits: mean KL" in w and "it passed" in w]
    assert verify_bundle(tmp_path / "auto")["passed"]
    with pytest.raises(ParityError, match="mean KL"):
        export("forced", "signed7", between)
    assert not (tmp_path / "forced").exists()


def test_no_ort_fusions_keeps_standard_onnx_operators(factory, tmp_path):
    import onnx

    from exporter.onnx_export import MIN_ORT_FOR_OPSET
    from exporter.pipeline import ExportSpec, run_pipeline

    out = tmp_path / "plain"
    report = run_pipeline(ExportSpec(adapter=factory.adapter("bert", "text-classification"), out=out,
                                     quantize=("int8", "fp16"), ort_fusions=False))
    assert report.passed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["onnxruntime_fusions"] is False and manifest["spec"]["ort_fusions"] is False
    assert manifest["min_onnxruntime"] == MIN_ORT_FOR_OPSET[manifest["opset"]]
    for v in manifest["variants"].values():
        domains = {n.domain for n in onnx.load(str(out / v["file"])).graph.node}
        assert domains <= {"", "ai.onnx"}, (v["file"], domains)


def test_fusions_keep_stdout_for_the_cli_results(factory, tmp_path, monkeypatch, capfd):
    """onnxruntime's optimizer print()s on graphs its shape inference fails on (seen on MiniLM's NER export);
    stdout carries `export --json`, so nothing of that may reach it."""
    import onnx
    import onnxruntime.transformers.optimizer as optimizer

    from exporter import ExportSpec, run_pipeline
    from exporter.fusions import fuse_transformer

    real = optimizer.optimize_model

    def noisy(*args, **kwargs):
        print("failed in shape inference <class 'TypeError'>")
        return real(*args, **kwargs)

    monkeypatch.setattr(optimizer, "optimize_model", noisy)
    # Exported without onnxruntime's fusions: the graph as the optimizer sees it, layer norms as exported.
    plain = tmp_path / "plain"
    run_pipeline(ExportSpec(adapter=factory.adapter("bert", "text-classification"), out=plain, quantize=(),
                            ort_fusions=False))
    graph = plain / "onnx" / "model.onnx"
    ops = [n.op_type for n in onnx.load(str(graph)).graph.node]
    assert ops.count("LayerNormalization") == 5 and "ReduceMean" not in ops, ops
    capfd.readouterr()
    assert set(fuse_transformer(graph, "bert")) == {"SkipLayerNormalization", "BiasGelu"}
    assert capfd.readouterr().out == ""
