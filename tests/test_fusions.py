"""Layer norms written out as primitive ops (exporter/fusions.py): same numbers as onnxruntime's kernels, not
folded back into them at session load, and put back together for the float16 variant."""

from __future__ import annotations

import numpy as np
import pytest

H = 48


def _graph(path, mean_used: bool = False, opset: int = 20, affine_only: bool = False, same_names: bool = False):
    """A SkipLayerNormalization (bias, and its input+skip+bias sum used downstream) feeding an ai.onnx
    LayerNormalization, with random gamma/beta. ``affine_only``: no bias on the first, no beta on either;
    ``same_names``: both nodes named alike (ONNX allows it)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in [
        ("g1", rng.uniform(0.5, 1.5, H)), ("b1", rng.normal(0, 1, H)), ("bias", rng.normal(0, 1, H)),
        ("g2", rng.uniform(0.5, 1.5, H)), ("b2", rng.normal(0, 1, H))]]
    skip_outputs = ["s", "m" if mean_used else "", "", "sum"]
    skip_inputs, ln_inputs = (["x", "r", "g1"], ["t", "g2"]) if affine_only else (["x", "r", "g1", "b1", "bias"],
                                                                                  ["t", "g2", "b2"])
    nodes = [
        helper.make_node("SkipLayerNormalization", skip_inputs, skip_outputs, domain="com.microsoft",
                         epsilon=1e-12, name="ln" if same_names else "skip_ln"),
        helper.make_node("Add", ["s", "sum"], ["t"], name="mix"),
        helper.make_node("LayerNormalization", ln_inputs, ["y"], axis=-1, epsilon=1e-5, name="ln"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", H])]
    if mean_used:
        outputs.append(helper.make_tensor_value_info("m", TensorProto.FLOAT, ["b", "s", 1]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "s", H])
                                       for n in ("x", "r")], outputs, inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(path))


def _run(path, feeds, optimized=None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _reference(tmp_path, form):
    """The graph before decomposition, as onnxruntime runs it (it refuses repeated node names, so that form's
    reference is the same graph with distinct names)."""
    ref = tmp_path / "reference.onnx"
    _graph(ref, **{k: v for k, v in form.items() if k != "same_names"})
    return ref


def _feeds():
    rng = np.random.default_rng(0)
    # An offset and scale like a transformer's residual stream with an outlier channel.
    x = rng.normal(30, 8, (2, 5, H)).astype(np.float32)
    x[..., 7] += 400
    return {"x": x, "r": rng.normal(0, 3, (2, 5, H)).astype(np.float32)}


def _decomposed(tmp_path, form):
    """The form's graph with its two layer norms decomposed, the feeds, and onnxruntime's kernels' output."""
    from exporter.fusions import decompose_layer_norms

    path = tmp_path / "m.onnx"
    _graph(path, **form)
    feeds = _feeds()
    want = _run(_reference(tmp_path, form), feeds)[0]
    assert decompose_layer_norms(path) == 2
    return path, feeds, want


FORMS = [{}, {"opset": 17}, {"affine_only": True}, {"same_names": True}]  # opset 17: ReduceMean's axes attribute


@pytest.mark.parametrize("form", FORMS, ids=["opset20", "opset17", "no-bias-no-beta", "same-node-names"])
def test_decomposed_layer_norms_match_onnxruntime_kernels_and_stay_decomposed(tmp_path, form):
    import onnx

    path, feeds, want = _decomposed(tmp_path, form)
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert "LayerNormalization" not in ops and "SkipLayerNormalization" not in ops, ops
    assert all(o.domain != "com.microsoft" for o in model.opset_import)  # nothing contrib is left
    optimized = tmp_path / "opt.onnx"
    got = _run(path, feeds, optimized)[0]
    # Both layer norms' outputs are ~N(beta, gamma): 2e-5 is ~20 float32 ulps of their magnitude.
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    # onnxruntime's LayerNormFusion would fold Pow/Div patterns back into its (slow, scalar) kernel.
    fused = {n.op_type for n in onnx.load(str(optimized)).graph.node}
    assert not fused & {"LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization"}, fused


@pytest.mark.parametrize("form", FORMS, ids=["opset20", "opset17", "no-bias-no-beta", "same-node-names"])
def test_recomposed_layer_norms_are_one_node_each_with_the_same_output(tmp_path, form):
    import onnx

    from exporter.fusions import recompose_layer_norms

    path, feeds, want = _decomposed(tmp_path, form)
    model = onnx.load(str(path))
    assert recompose_layer_norms(model) == 2
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("LayerNormalization") == 2 and "ReduceMean" not in ops, ops
    assert not [t.name for t in model.graph.initializer if t.name.startswith("ln_decomposed_")]
    eps = sorted(a.f for n in model.graph.node if n.op_type == "LayerNormalization" for a in n.attribute
                 if a.name == "epsilon")
    assert eps == pytest.approx([1e-12, 1e-5])
    back = tmp_path / "back.onnx"
    onnx.checker.check_model(model)
    onnx.save(model, str(back))
    np.testing.assert_allclose(_run(back, feeds)[0], want, rtol=0, atol=2e-5)


def test_a_layer_norm_whose_mean_output_is_used_is_kept(tmp_path):
    import onnx

    from exporter.fusions import decompose_layer_norms

    path = tmp_path / "m.onnx"
    _graph(path, mean_used=True)
    assert decompose_layer_norms(path) == 1
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("SkipLayerNormalization") == 1 and "LayerNormalization" not in ops, ops
