"""exporter/fusions.py's rewrites for onnxruntime's CPU kernels: layer norms as Adds + one LayerNormalization on a
2-D view (same numbers as onnxruntime's kernels, never fused back into SkipLayerNormalization at session load),
and attention without the mask where the mask is all zeros (the same outputs, padded or not, and the branch that
ran is the one the mask calls for)."""

from __future__ import annotations

import json

import numpy as np
import pytest

H = 48


def _graph(path, mean_used: bool = False, opset: int = 20, affine_only: bool = False, same_names: bool = False,
           matmul_skip: bool = False):
    """A SkipLayerNormalization (bias, and its input+skip+bias sum used downstream) feeding an ai.onnx
    LayerNormalization, with random gamma/beta. ``affine_only``: no bias on the first, no beta on either;
    ``same_names``: both nodes named alike (ONNX allows it); ``matmul_skip``: its skip input, not its first
    input, is a MatMul's output."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in [
        ("g1", rng.uniform(0.5, 1.5, H)), ("b1", rng.normal(0, 1, H)), ("bias", rng.normal(0, 1, H)),
        ("g2", rng.uniform(0.5, 1.5, H)), ("b2", rng.normal(0, 1, H)), ("w", rng.normal(0, 0.2, (H, H)))]]
    skip_outputs = ["s", "m" if mean_used else "", "", "sum"]
    skip_inputs, ln_inputs = (["x", "r", "g1"], ["t", "g2"]) if affine_only else (["x", "r", "g1", "b1", "bias"],
                                                                                  ["t", "g2", "b2"])
    nodes = [helper.make_node("MatMul", ["r_in", "w"], ["r"], name="dense")] if matmul_skip else []
    nodes += [
        helper.make_node("SkipLayerNormalization", skip_inputs, skip_outputs, domain="com.microsoft",
                         epsilon=1e-12, name="ln" if same_names else "skip_ln"),
        helper.make_node("Add", ["s", "sum"], ["t"], name="mix"),
        helper.make_node("LayerNormalization", ln_inputs, ["y"], axis=-1, epsilon=1e-5, name="ln"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", H])]
    if mean_used:
        outputs.append(helper.make_tensor_value_info("m", TensorProto.FLOAT, ["b", "s", 1]))
    inputs = ("x", "r_in") if matmul_skip else ("x", "r")
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "s", H])
                                       for n in inputs], outputs, inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(path))


def _session(path, optimized=None, profile: bool = False):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    so.enable_profiling = profile
    so.profile_file_prefix = str(path.parent / "profile")  # beside the graph (tmp_path), not in the cwd
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run(path, feeds, optimized=None):
    return _session(path, optimized).run(None, feeds)


def _reference(tmp_path, form):
    """The graph before the rewrite, as onnxruntime runs it (it refuses repeated node names, so that form's
    reference is the same graph with distinct names)."""
    ref = tmp_path / "reference.onnx"
    _graph(ref, **{k: v for k, v in form.items() if k != "same_names"})
    return ref


def _feeds(matmul_skip: bool = False):
    rng = np.random.default_rng(0)
    # An offset and scale like a transformer's residual stream with an outlier channel.
    x = rng.normal(30, 8, (2, 5, H)).astype(np.float32)
    x[..., 7] += 400
    return {"x": x, "r_in" if matmul_skip else "r": rng.normal(0, 3, (2, 5, H)).astype(np.float32)}


def _unfused(tmp_path, form):
    """The form's graph with its two layer norms unfused (saved), the feeds, and onnxruntime's kernels' output."""
    import onnx

    from exporter.fusions import unfuse_layer_norms

    path = tmp_path / "m.onnx"
    _graph(path, **form)
    feeds = _feeds(form.get("matmul_skip", False))
    want = _run(_reference(tmp_path, form), feeds)[0]
    model = onnx.load(str(path))
    assert unfuse_layer_norms(model) == 2
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path, feeds, want


FORMS = [{}, {"opset": 17}, {"affine_only": True}, {"same_names": True}, {"matmul_skip": True}]


@pytest.mark.parametrize("form", FORMS, ids=["opset20", "opset17", "no-bias-no-beta", "same-node-names", "matmul-skip"])
def test_unfused_layer_norms_match_onnxruntime_kernels_and_are_not_fused_back(tmp_path, form):
    import onnx

    path, feeds, want = _unfused(tmp_path, form)
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("LayerNormalization") == 2 == ops.count("Flatten") and "SkipLayerNormalization" not in ops, ops
    assert all(o.domain != "com.microsoft" for o in model.opset_import)  # nothing contrib is left
    optimized = tmp_path / "opt.onnx"
    got = _run(path, feeds, optimized)[0]
    # Both layer norms' outputs are ~N(beta, gamma): 2e-5 is ~20 float32 ulps of their magnitude.
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    # onnxruntime's session-load fusions turn Add + a 3-D LayerNormalization into its scalar SkipLayerNormalization
    # kernel (2.1 ms against 0.25 ms at [8, 128, 384]); the 2-D view is what keeps them apart.
    loaded = [n.op_type for n in onnx.load(str(optimized)).graph.node]
    assert loaded.count("LayerNormalization") == 2 and "SkipLayerNormalization" not in loaded, loaded


def test_the_bias_is_added_on_the_matmul_side_first(tmp_path):
    """Torch's order, (x @ W + b) + residual: int8 fuses that first Add into the quantized MatMul."""
    import onnx

    for form, matmul_input in [({"matmul_skip": True}, "r"), ({}, "x")]:
        path, _, _ = _unfused(tmp_path, form)
        first_add = next(n for n in onnx.load(str(path)).graph.node if n.op_type == "Add")
        assert list(first_add.input) == [matmul_input, "bias"], (form, first_add.input)


def test_a_layer_norm_whose_mean_output_is_used_is_kept(tmp_path):
    import onnx

    from exporter.fusions import unfuse_layer_norms

    path = tmp_path / "m.onnx"
    _graph(path, mean_used=True)
    model = onnx.load(str(path))
    assert unfuse_layer_norms(model) == 1
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("SkipLayerNormalization") == 1 and ops.count("Flatten") == 1, ops


def test_opsets_without_layer_normalization_are_left_alone(tmp_path):
    import onnx

    from exporter.fusions import unfuse_layer_norms

    path = tmp_path / "m.onnx"
    _graph(path, opset=16)
    model = onnx.load(str(path))
    before = model.SerializeToString()
    assert unfuse_layer_norms(model) == 0 and model.SerializeToString() == before


# --- attention without the mask where nothing is masked ----------------------------------------------------------

HEADS, HEAD_DIM = 4, 8
D = HEADS * HEAD_DIM


def _attention_graph(path, mask_shape: str = "b11s", constant_mask: bool = False, div_scale: bool = False):
    """One self-attention as torch's exporter writes it (heads split by Reshape + Transpose, scale * QK^T +
    additive mask, Softmax, merged back), Q/K/V from MatMuls of the input, the additive mask computed from an
    int64 attention_mask (1 kept, 0 padded -> -10000). ``mask_shape`` "b11s": [B, 1, 1, S]; "b1ss": [B, 1, S, S];
    "unknown": expanded to the scores' runtime shape, which shape inference cannot tell; "scores_small": scores of
    batch 1 against a mask of batch B (broadcasts to a larger result). The last two must be left alone. ``constant_mask``: an initializer. ``div_scale``: Div by sqrt(d)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (D, D)).astype(np.float32), n) for n in ("wq", "wk", "wv")]
    inits += [numpy_helper.from_array(np.array(v, dtype), n) for n, v, dtype in [
        ("split", [0, 0, HEADS, HEAD_DIM], np.int64), ("merge", [0, 0, D], np.int64), ("one", 1.0, np.float32),
        ("neg", -10000.0, np.float32), ("axes12", [1, 2], np.int64),
        ("scale", HEAD_DIM ** 0.5 if div_scale else HEAD_DIM ** -0.5, np.float32)]]
    n = helper.make_node
    nodes = [n("MatMul", ["x", w], [o]) for w, o in (("wq", "q"), ("wk", "k"), ("wv", "v"))]
    nodes += [n("Reshape", [t, "split"], [t + "4"]) for t in "qkv"]
    nodes += [n("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3]), n("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
              n("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3]), n("MatMul", ["qt", "kt"], ["qk"]),
              n("Div" if div_scale else "Mul", ["qk", "scale"], ["scores"])]
    if constant_mask:
        inits.append(numpy_helper.from_array(np.zeros((1, 1, 1, 6), np.float32), "additive"))
    else:
        nodes += [n("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT), n("Sub", ["one", "maskf"], ["inv"]),
                  n("Mul", ["inv", "neg"], ["neg_mask"]), n("Unsqueeze", ["neg_mask", "axes12"], ["additive"])]
    if mask_shape == "b1ss":  # padded rows and columns both masked, as transformers' 4-D masks do
        nodes += [n("Unsqueeze", ["neg_mask", "axes13"], ["column"]), n("Add", ["additive", "column"], ["additive_big"])]
        inits.append(numpy_helper.from_array(np.array([1, 3], np.int64), "axes13"))
    elif mask_shape == "unknown":
        nodes += [n("Shape", ["qk"], ["expand_to"]), n("Expand", ["additive", "expand_to"], ["additive_big"])]
    mask = "additive_big" if mask_shape in ("b1ss", "unknown") else "additive"
    scores = "scores"
    if mask_shape == "scores_small":
        nodes += [n("ReduceMean", ["scores", "axes0"], ["scores_mean"], keepdims=1)]
        inits.append(numpy_helper.from_array(np.array([0], np.int64), "axes0"))
        scores = "scores_mean"
    nodes += [n("Add", [scores, mask], ["masked"]), n("Softmax", ["masked"], ["p"], axis=-1),
              n("MatMul", ["p", "vt"], ["ctx"]), n("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
              n("Reshape", ["ctx_t", "merge"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", D])]
    if not constant_mask:
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"]))
    g = helper.make_graph(nodes, "attention", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          inits)
    model = onnx.shape_inference.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)]))
    onnx.save(model, str(path))


def _attention_feeds(padded: bool, constant_mask: bool = False):
    rng = np.random.default_rng(1)
    mask = np.ones((3, 6), np.int64)
    if padded:
        mask[1, 4:] = 0
    feeds = {"x": rng.normal(0, 1, (3, 6, D)).astype(np.float32)}
    return feeds if constant_mask else {**feeds, "attention_mask": mask}


def _rewrite(tmp_path, fused_attention: bool, **form):
    import onnx

    from exporter.fusions import skip_zero_masks

    ref = tmp_path / "ref.onnx"
    _attention_graph(ref, **form)
    model = onnx.load(str(ref))
    counts = skip_zero_masks(model, fused_attention)
    onnx.checker.check_model(model)
    path = tmp_path / "rewritten.onnx"
    onnx.save(model, str(path))
    return ref, path, model, counts


def _ran(session, feeds) -> set[str]:
    """The op types of the nodes a session ran for ``feeds``, subgraph nodes included (from its profile)."""
    session.run(None, feeds)
    with open(session.end_profiling()) as f:
        events = json.load(f)
    return {e["args"]["op_name"] for e in events if e.get("cat") == "Node" and "op_name" in e.get("args", {})}


@pytest.mark.parametrize("form", [{}, {"div_scale": True}, {"mask_shape": "b1ss"}], ids=["mul-scale", "div-scale",
                                                                                            "4d-mask"])
def test_attention_runs_fused_and_unmasked_only_where_nothing_is_padded(tmp_path, form):
    ref, path, model, counts = _rewrite(tmp_path, True, **form)
    assert counts == {"masks_skipped": 1, "attention_fused": 1}
    assert [n.op_type for n in model.graph.node if n.op_type in ("If", "Softmax", "MultiHeadAttention")] == ["If"]
    for padded in (False, True):
        feeds = _attention_feeds(padded)
        want = _run(ref, feeds)[0]
        session = _session(path, profile=True)
        got = session.run(None, feeds)[0]
        ran = _ran(session, feeds)
        if padded:  # the exported chain, the same ops in the same order: the same bits
            np.testing.assert_array_equal(got, want)
            assert "Softmax" in ran and "MultiHeadAttention" not in ran, ran
        else:  # one kernel instead of the chain: float32 rounding apart, on outputs of magnitude ~1
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
            assert "MultiHeadAttention" in ran and "Softmax" not in ran, ran


def test_without_fused_attention_only_the_mask_add_is_skipped_in_standard_onnx(tmp_path):
    ref, path, model, counts = _rewrite(tmp_path, False)
    assert counts == {"masks_skipped": 1, "attention_fused": 0}
    ifs = [n for n in model.graph.node if n.op_type == "If"]
    assert len(ifs) == 1 and {o.domain for o in model.opset_import} == {""}
    then = next(a.g for a in ifs[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in then.node] == ["Softmax"]
    for padded in (False, True):
        feeds = _attention_feeds(padded)
        session = _session(path, profile=True)
        np.testing.assert_array_equal(session.run(None, feeds)[0], _run(ref, feeds)[0])  # x + 0 is x
        assert ("Add" in _ran(session, feeds)) == padded


@pytest.mark.parametrize("form", [{"constant_mask": True}, {"mask_shape": "scores_small"}, {"mask_shape": "unknown"}],
                         ids=["constant-mask", "mask-broadcasts-the-scores-larger", "mask-shape-unknown"])
def test_masks_that_cannot_be_skipped_exactly_are_left_alone(tmp_path, form):
    import onnx

    from exporter.fusions import skip_zero_masks

    ref = tmp_path / "ref.onnx"
    _attention_graph(ref, **form)
    model = onnx.load(str(ref))
    before = model.SerializeToString()
    assert skip_zero_masks(model, fused_attention=True) == {"masks_skipped": 0, "attention_fused": 0}
    assert model.SerializeToString() == before
