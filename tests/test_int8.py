"""exporter/int8.py: the encoder int8 variant, against onnxruntime's quantize_dynamic as the oracle."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporter.errors import ExporterError
from exporter.int8 import S7, quantize_dynamic_int8, quantize_s7, quantize_u8


def _ort_quantize(src, dst):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QUInt8,
                     extra_options={"DefaultTensorType": TensorProto.FLOAT})


def _inits(path):
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def test_int8_graph_and_weights_are_onnxruntimes(factory, tmp_path):
    """Unsigned weights: the same operators (BiasGelu split), the same bytes in every initializer, the same outputs as quantize_dynamic's graph."""
    out, _ = factory.bundle("bert", "text-classification")
    src = out / "onnx/model.onnx"
    ours, theirs = tmp_path / "ours.onnx", tmp_path / "theirs.onnx"
    counts = quantize_dynamic_int8(src, ours, external=False, weights="unsigned")
    _ort_quantize(src, theirs)

    a, b = onnx.load(str(ours)), onnx.load(str(theirs))
    expected = Counter(n.op_type for n in b.graph.node)
    # The one planned difference: a BiasGelu after a quantized MatMul becomes Add (fused into the MatMul's bias
    # at session load) + Gelu; the outputs below still match quantize_dynamic's within 1e-6.
    split = expected.pop("BiasGelu", 0)
    assert split >= 2
    expected.update({"Add": split, "Gelu": split})
    assert Counter(n.op_type for n in a.graph.node) == expected
    assert counts["matmul"] == sum(n.op_type == "MatMulInteger" for n in a.graph.node) >= 4
    assert counts["gather"] >= 1
    mine, oracle = _inits(ours), _inits(theirs)
    assert set(mine) == set(oracle)
    for name in oracle:
        assert mine[name].dtype == oracle[name].dtype and np.array_equal(mine[name], oracle[name]), name

    feeds = dict(np.load(out / "reference/inputs.npz"))
    prefixes = sorted({k.split(".", 1)[0] for k in feeds})
    s_ours, s_theirs = ort.InferenceSession(str(ours)), ort.InferenceSession(str(theirs))
    for p in prefixes:
        f = {k.split(".", 1)[1]: v for k, v in feeds.items() if k.startswith(p + ".")}
        for x, y in zip(s_ours.run(None, f), s_theirs.run(None, f)):
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)


def test_quantize_u8_matches_onnxruntime_per_channel_and_edge_columns():
    from onnxruntime.quantization.quant_utils import compute_scale_zp, quantize_nparray

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 6)).astype(np.float32)
    w[:, 0] = 0.0  # a constant-zero column: scale 1, zero point 0
    w[:, 1] = np.abs(w[:, 1])  # positive only: zero point 0
    w[:, 2] = -np.abs(w[:, 2])  # negative only: zero point 255
    w[:, 3] = np.linspace(-1.0, 1.0, 64, dtype=np.float32) * 1e-3  # small range, many rounding ties nearby
    q = quantize_u8(w, axis=1)
    assert q.data.dtype == np.uint8 and q.scale.dtype == np.float32 and q.scale.shape == (6,)
    assert (q.scale[0], q.zero_point[0], int(q.data[:, 0].max())) == (1.0, 0, 0)
    assert q.zero_point[1] == 0 and q.zero_point[2] == 255
    for c in range(w.shape[1]):
        col = w[:, c]
        zp, scale = compute_scale_zp(np.array(col.min()), np.array(col.max()), np.array(0, np.uint8),
                                     np.array(255, np.uint8))
        assert np.float32(scale) == q.scale[c] and int(zp) == int(q.zero_point[c])
        assert np.array_equal(quantize_nparray(TensorProto.UINT8, col, np.float32(scale), zp), q.data[:, c])
    # Each weight is within half a step of its dequantised value (the range includes 0, so nothing clips).
    back = (q.data.astype(np.float32) - q.zero_point.astype(np.float32)) * q.scale
    assert np.all(np.abs(back - w) <= q.scale / 2 * (1 + 1e-5))

    table = quantize_u8(w, axis=None)
    assert table.scale.shape == () and table.zero_point.shape == ()


def _graph(nodes, inits, inputs, outputs, tmp_path, name="g.onnx"):
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def test_int8_quantizes_constant_weights_once_and_leaves_the_rest(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 5)).astype(np.float32)
    gw = rng.standard_normal((3, 8)).astype(np.float32)  # Gemm weight, transB=1
    bias = rng.standard_normal(3).astype(np.float32)
    table = rng.standard_normal((10, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"]),
        helper.make_node("Add", ["x", "emb"], ["h"]),
        helper.make_node("MatMul", ["h", "w"], ["m1"]),
        helper.make_node("MatMul", ["x", "w"], ["m2"]),  # the same weight again: one quantized copy
        helper.make_node("MatMul", ["h", "xt"], ["hh"]),  # two activations: stays float
        helper.make_node("Gemm", ["h", "gw", "bias"], ["g1"], transB=1),
        helper.make_node("Gemm", ["h", "gw"], ["g2"], transB=1, alpha=0.5),  # alpha: stays float
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8]),
              helper.make_tensor_value_info("ids", TensorProto.INT64, [4]),
              helper.make_tensor_value_info("xt", TensorProto.FLOAT, [8, 4])]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("m1", "m2", "hh", "g1", "g2")]
    src = _graph(nodes, {"w": w, "gw": gw, "bias": bias, "table": table}, inputs, outputs, tmp_path)
    dst = tmp_path / "q.onnx"
    assert quantize_dynamic_int8(src, dst, external=False, weights="unsigned") == {"matmul": 3, "gather": 1}

    model = onnx.load(str(dst))
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["MatMulInteger"] == 3 and ops["DynamicQuantizeLinear"] == 2 and ops["MatMul"] == 1
    assert ops["Gemm"] == 1 and ops["DequantizeLinear"] == 1
    inits = {i.name for i in model.graph.initializer}
    assert "w" not in inits and "table" not in inits and "gw" in inits  # gw is still read by the alpha Gemm
    assert sum(n.endswith("_quantized") for n in inits) == 3  # w, gw^T and the table, each once

    feeds = {"x": rng.standard_normal((4, 8)).astype(np.float32), "ids": np.array([0, 3, 9, 3]),
             "xt": rng.standard_normal((8, 4)).astype(np.float32)}
    want = dict(zip(("m1", "m2", "hh", "g1", "g2"), ort.InferenceSession(str(src)).run(None, feeds)))
    got = dict(zip(("m1", "m2", "hh", "g1", "g2"), ort.InferenceSession(str(dst)).run(None, feeds)))
    for k in want:  # int8 error (hh and g2 through the int8 table): some, and within 5% of the output's scale
        assert 0 < np.abs(got[k] - want[k]).max() <= 0.05 * np.abs(want[k]).max(), k


def test_int8_refuses_a_graph_that_already_uses_its_names(tmp_path):
    w = np.ones((4, 4), np.float32)
    nodes = [helper.make_node("Relu", ["x"], ["x_quantized"]), helper.make_node("MatMul", ["x", "w"], ["y"]),
             helper.make_node("Add", ["y", "x_quantized"], ["z"])]
    src = _graph(nodes, {"w": w}, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                 [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], tmp_path)
    with pytest.raises(ExporterError, match="'x_quantized' twice"):
        quantize_dynamic_int8(src, tmp_path / "q.onnx", external=False)
    assert not (tmp_path / "q.onnx").exists()


def test_signed7_matmuls_are_onnxruntimes_reduce_range_int8_and_tables_stay_unsigned(factory, tmp_path):
    """signed7: every MatMul weight is the bytes of quantize_dynamic(per_channel, QInt8, reduce_range), within
    +-64 with zero point 0; embedding tables are the unsigned variant's; outputs match onnxruntime's graph."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out, _ = factory.bundle("bert", "text-classification")
    src = out / "onnx/model.onnx"
    ours, theirs, unsigned = tmp_path / "ours.onnx", tmp_path / "theirs.onnx", tmp_path / "u.onnx"
    counts = quantize_dynamic_int8(src, ours, external=False, weights="signed7")
    quantize_dynamic_int8(src, unsigned, external=False, weights="unsigned")
    quantize_dynamic(str(src), str(theirs), per_channel=True, weight_type=QuantType.QInt8, reduce_range=True,
                     op_types_to_quantize=["MatMul", "Gemm"], extra_options={"DefaultTensorType": TensorProto.FLOAT})
    mine, oracle, u = _inits(ours), _inits(theirs), _inits(unsigned)
    model = onnx.load(str(ours))
    matmul_weights = [n.input[1] for n in model.graph.node if n.op_type == "MatMulInteger"]
    assert len(matmul_weights) == counts["matmul"] >= 4
    for name in matmul_weights:
        q = mine[name]
        assert q.dtype == np.int8 and np.abs(q.astype(np.int32)).max() <= S7, name
        assert np.array_equal(q, oracle[name]), name
        for suffix in ("_scale", "_zero_point"):
            key = name.removesuffix("_quantized") + suffix
            assert mine[key].dtype == oracle[key].dtype and np.array_equal(mine[key], oracle[key]), key
    tables = [n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in mine]
    assert tables and all(mine[t].dtype == np.uint8 and np.array_equal(mine[t], u[t]) for t in tables)

    feeds = dict(np.load(out / "reference/inputs.npz"))
    p = sorted({k.split(".", 1)[0] for k in feeds})[0]
    f = {k.split(".", 1)[1]: v for k, v in feeds.items() if k.startswith(p + ".")}
    s_ours = ort.InferenceSession(str(ours))
    # onnxruntime's graph quantized no table (MatMul/Gemm only): the same up to the tables' int8 error.
    for x, y in zip(s_ours.run(None, f), ort.InferenceSession(str(theirs)).run(None, f)):
        np.testing.assert_allclose(x, y, rtol=0, atol=0.05 * float(np.abs(y).max()))


def test_quantize_s7_matches_onnxruntime_column_by_column():
    from onnxruntime.quantization.quant_utils import (
        compute_scale_zp,
        get_qmin_qmax_for_qType,
        quantize_nparray,
    )

    rng = np.random.default_rng(2)
    w = rng.standard_normal((64, 5)).astype(np.float32)
    w[:, 0] = 0.0  # constant zero: scale 1
    w[:, 1] = np.abs(w[:, 1])  # positive only
    w[:, 2] = -np.abs(w[:, 2]) * 1e-3  # negative only, small
    q = quantize_s7(w)
    qmin, qmax = get_qmin_qmax_for_qType(TensorProto.INT8, reduce_range=True, symmetric=True)
    assert (int(qmin), int(qmax)) == (-S7, S7)
    assert q.scale[0] == 1.0 and not q.data[:, 0].any() and q.zero_point.dtype == np.int8 and not q.zero_point.any()
    for c in range(w.shape[1]):
        col = w[:, c]
        zp, scale = compute_scale_zp(np.array(col.min()), np.array(col.max()), qmin, qmax, symmetric=True)
        assert np.float32(scale) == q.scale[c] and int(zp) == 0
        assert np.array_equal(quantize_nparray(TensorProto.INT8, col, np.float32(scale), zp, low=qmin, high=qmax),
                              q.data[:, c])
    back = q.data.astype(np.float32) * q.scale
    assert np.all(np.abs(back - w) <= q.scale / 2 * (1 + 1e-5))


def test_int8_leaves_initializers_that_are_graph_inputs_float(tmp_path):
    """A swappable graph's adapter inputs have default initializers: overridable, so never quantized."""
    rng = np.random.default_rng(3)
    w, lora = rng.standard_normal((8, 4)).astype(np.float32), np.zeros((8, 4), np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("MatMul", ["x", "lora"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8]),
              helper.make_tensor_value_info("lora", TensorProto.FLOAT, [8, 4])]
    src = _graph(nodes, {"w": w, "lora": lora}, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                 tmp_path)
    dst = tmp_path / "q.onnx"
    assert quantize_dynamic_int8(src, dst, external=False)["matmul"] == 1
    model = onnx.load(str(dst))
    assert [n.input[1] for n in model.graph.node if n.op_type == "MatMul"] == ["lora"]
    x = rng.standard_normal((2, 8)).astype(np.float32)
    extra = rng.standard_normal((8, 4)).astype(np.float32)
    got = ort.InferenceSession(str(dst)).run(None, {"x": x, "lora": extra})[0]
    np.testing.assert_allclose(got, x @ w + x @ extra, atol=0.05 * float(np.abs(x @ w).max()))
