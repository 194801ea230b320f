"""Negative tests: the parity gates must fail an export that lost the adapter or has a perturbed weight."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from exporter.bundle import MANIFEST, read_manifest
from exporter.verify import evaluate_variants, verify_bundle


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_export_without_the_adapter_fails_fp32_gate(factory, tmp_path):
    """Swap in the ONNX export of the *base* model (adapter dropped): the stored merged reference must reject it."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from exporter.onnx_export import export_onnx, make_wrapper
    from exporter.tasks import TASKS

    out, _ = factory.bundle("bert", "text-classification")
    bad = _copy(out, tmp_path / "dropped")
    manifest = read_manifest(bad)
    adapter_dir = factory.adapter("bert", "text-classification")
    # The base with the adapter's trained head but no LoRA deltas: exactly "the adapter was dropped".
    from safetensors.torch import load_file

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(factory.base("bert"), num_labels=3).eval()
    head = {k.removeprefix("base_model.model."): v for k, v in
            load_file(adapter_dir / "adapter_model.safetensors").items() if ".lora_" not in k}
    base.load_state_dict(head, strict=False)
    names = tuple(i["name"] for i in manifest["inputs"])
    wrapper = make_wrapper(base, TASKS["text-classification"], names, None)
    feeds = {n: np.ones((2, 5), dtype=np.int64) for n in names}
    (bad / "onnx/model.onnx").unlink()
    export_onnx(wrapper, feeds, bad / "onnx/model.onnx", TASKS["text-classification"])
    result = evaluate_variants(bad, manifest, ["fp32"])["fp32"]
    assert not result["passed"]
    assert result["outputs"]["logits"]["n_over_tolerance"] > 0
    assert "logits" in result["failures"][0] and "exceed" in result["failures"][0]


@pytest.mark.parametrize("scale", [0.05])
def test_perturbed_weight_fails_fp32_gate(factory, tmp_path, scale):
    out, _ = factory.bundle("bert", "text-classification")
    bad = _copy(out, tmp_path / "perturbed")
    model = onnx.load(str(bad / "onnx/model.onnx"))
    # Perturb one weight matrix that a MatMul consumes (a projection, not the embedding table) by 5% noise: the
    # largest, an MLP projection (a random tiny model's attention is near uniform, so its query moves little).
    matmul_inputs = {x for n in model.graph.node if n.op_type in ("MatMul", "Gemm") for x in n.input}
    init = max((i for i in model.graph.initializer if len(i.dims) == 2 and i.name in matmul_inputs),
               key=lambda i: (int(np.prod(i.dims)), i.name))
    w = numpy_helper.to_array(init).copy()
    rng = np.random.default_rng(0)
    w += scale * np.abs(w).mean() * rng.standard_normal(w.shape).astype(w.dtype)
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(bad / "onnx/model.onnx"))
    manifest = read_manifest(bad)
    result = evaluate_variants(bad, manifest, ["fp32"])["fp32"]
    assert not result["passed"], result["outputs"]
    # verify also flags the file itself as modified, independently of the numbers.
    report = verify_bundle(bad, ["fp32"])
    assert not report["passed"]
    assert any(p.startswith("onnx/model.onnx:") for p in report["integrity"]["problems"])


def test_gate_rejects_non_finite_outputs():
    from exporter.parity import OutputInfo, compare_variant
    from exporter.tolerances import thresholds_for

    ref = [{"logits": np.array([[1.0, 2.0]], dtype=np.float32)}]
    got = [{"logits": np.array([[np.nan, 2.0]], dtype=np.float32)}]
    masks = [np.ones((1, 3), dtype=np.int64)]
    for variant in ("fp32", "int8", "fp16"):
        r = compare_variant(got, ref, masks, [OutputInfo("logits", False, True)], thresholds_for(variant))
        assert not r["passed"] and "NaN" in r["failures"][0]


def test_int8_argmax_flip_on_clear_margin_fails_but_near_tie_does_not():
    from exporter.parity import OutputInfo, compare_variant
    from exporter.tolerances import INT8_CLEAR_MARGIN_REL, thresholds_for

    info = [OutputInfo("logits", False, True)]
    masks = [np.ones((2, 3), dtype=np.int64)]
    tie = INT8_CLEAR_MARGIN_REL / 10  # far below the clear margin (rms of these logits is ~2.1)
    ref = [{"logits": np.array([[1.0, 1.0 + tie], [3.0, -3.0]], dtype=np.float32)}]
    near_tie_flip = [{"logits": np.array([[1.0 + tie, 1.0], [3.0, -3.0]], dtype=np.float32)}]
    clear_flip = [{"logits": np.array([[1.0, 1.0 + tie], [-3.0, 3.0]], dtype=np.float32)}]
    r = compare_variant(near_tie_flip, ref, masks, info, thresholds_for("int8"))
    assert r["passed"] and r["outputs"]["logits"]["argmax_agreement"] == 0.5
    assert r["outputs"]["logits"]["n_clear"] == 1
    r = compare_variant(clear_flip, ref, masks, info, thresholds_for("int8"))
    assert not r["passed"] and any("argmax" in f for f in r["failures"])


def test_padded_positions_are_excluded_from_token_parity():
    from exporter.parity import OutputInfo, compare_variant
    from exporter.tolerances import thresholds_for

    ref = np.zeros((1, 3, 2), dtype=np.float32)
    ref[..., 0] = 1.0
    got = ref.copy()
    got[0, 2] = [100.0, -100.0]  # garbage at a padded position
    masks = [np.array([[1, 1, 0]])]
    info = [OutputInfo("logits", True, True)]
    assert compare_variant([{"logits": got}], [{"logits": ref}], masks, info, thresholds_for("fp32"))["passed"]
    masks = [np.array([[1, 1, 1]])]
    assert not compare_variant([{"logits": got}], [{"logits": ref}], masks, info, thresholds_for("fp32"))["passed"]


def test_manifest_thresholds_are_what_verify_applies(factory, tmp_path):
    """verify uses the thresholds stored in the bundle, not this version's module constants."""
    import json

    out, _ = factory.bundle("bert", "text-classification")
    b = _copy(out, tmp_path / "strict")
    manifest = json.loads((b / MANIFEST).read_text())
    manifest["variants"]["fp32"]["thresholds"] = {"atol": 0.0, "rtol": 0.0}
    result = evaluate_variants(b, manifest, ["fp32"])["fp32"]
    # fp32 is close but not bit-identical to PyTorch, so a zero tolerance must fail.
    assert result["outputs"]["logits"]["max_abs_diff"] > 0
    assert not result["passed"]
