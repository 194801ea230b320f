"""The integer kernels our quantized variants use compute exact integers on this CPU, whatever its ISA.

Run on other x86 ISA levels with qemu-user: `qemu-x86_64 -cpu Nehalem|Haswell|max .venv/bin/python -m pytest
tests/test_quant_numerics.py` (CI does, see .ci/run).

A variant's numbers must not depend on the CPU that made or runs it. onnxruntime picks kernels by ISA (AVX2,
AVX-512 VNNI, AMX, NEON dot product); the ones we ship must agree with an exact integer emulation on every one
of them, including the worst case for int16 saturation (extreme codes whose products all add up). On a CPU
without VNNI, onnxruntime's default signed-weight int8 (U8S8) fails exactly this check, which is why it is
not used (see quantize.py).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporter.weightonly import ACCURACY_LEVEL, quantize_min_offset, quantize_symmetric


def _session(nodes, inputs, outputs, inits):
    graph = helper.make_graph(nodes, "t", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_u8u8_matmulinteger_is_exact_at_saturation_extremes():
    rng = np.random.default_rng(0)
    m, k, n = 8, 384, 64
    a = rng.integers(200, 256, (m, k)).astype(np.uint8)  # large activations, every product positive
    b = rng.choice(np.array([0, 255], np.uint8), (k, n))
    zp = np.full((n,), 3, np.uint8)
    sess = _session([helper.make_node("MatMulInteger", ["A", "B", "az", "bz"], ["Y"])],
                    [helper.make_tensor_value_info("A", TensorProto.UINT8, [m, k])],
                    [helper.make_tensor_value_info("Y", TensorProto.INT32, None)],
                    {"B": b, "az": np.array(0, np.uint8), "bz": zp})
    y = sess.run(None, {"A": a})[0]
    exact = a.astype(np.int64) @ (b.astype(np.int64) - zp.astype(np.int64))
    np.testing.assert_array_equal(y, exact)


def test_u8s8_matmulinteger_with_7_bit_weights_is_exact_at_saturation_extremes():
    """7-bit signed weights (what issue 15 weighed for encoders, see quantize.py): u8 activations, weights within
    +-64. Every pair of products is as large as it can get (255 * 64 twice = 32640), one step below int16
    saturation on vpmaddubsw."""
    rng = np.random.default_rng(0)
    m, k, n = 8, 384, 64
    a = rng.integers(250, 256, (m, k)).astype(np.uint8)
    b = (rng.choice(np.array([-64, 64], np.int8), (1, n)) * np.ones((k, 1), np.int8)).astype(np.int8)
    b[::7] = rng.choice(np.array([-64, 63, 64], np.int8), (b[::7].shape))  # and some mixed columns
    sess = _session([helper.make_node("MatMulInteger", ["A", "B", "az", "bz"], ["Y"])],
                    [helper.make_tensor_value_info("A", TensorProto.UINT8, [m, k])],
                    [helper.make_tensor_value_info("Y", TensorProto.INT32, None)],
                    {"B": b, "az": np.array(0, np.uint8), "bz": np.zeros((n,), np.int8)})
    y = sess.run(None, {"A": a})[0]
    np.testing.assert_array_equal(y, a.astype(np.int64) @ b.astype(np.int64))


@pytest.mark.parametrize("bits", [8, 4])
def test_matmulnbits_computes_one_of_its_two_exact_definitions(bits):
    """accuracy_level 4 quantizes activations to int8 per row and block; the integer dot products must be exact.

    x86 CPUs without AVX2 have no int8 kernel for it: onnxruntime computes with float activations instead
    (measured under qemu-x86_64 -cpu Nehalem). Either way the result is one exact definition, never a
    saturated one; the manifest records the CPU a bundle was verified on and verify reports the device's.
    """
    rng = np.random.default_rng(bits)
    k, n, bs, m = 256, 96, 32, 7
    w = rng.standard_normal((k, n)).astype(np.float32)
    wb = w.reshape(k // bs, bs, n).transpose(2, 0, 1)  # (n, k_blocks, bs)
    if bits == 8:
        q, scale = quantize_symmetric(np.sign(wb) * 9.0, 8)  # every code at +-127: the saturation worst case
    else:
        q, scale, _ = quantize_min_offset(wb)
    packed = q if bits == 8 else (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    codes = q.astype(np.int64) - 2 ** (bits - 1)
    # Activations whose signs follow the weights' (row 0): all products of a block add up.
    x = (np.abs(rng.standard_normal((m, k))) * np.sign(w[:, 0])[None] * 3).astype(np.float32)
    sess = _session([helper.make_node("MatMulNBits", ["x", "B", "s"], ["y"], domain="com.microsoft", K=k, N=n,
                                      bits=bits, block_size=bs, accuracy_level=ACCURACY_LEVEL)],
                    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                    {"B": np.ascontiguousarray(packed), "s": scale.reshape(-1).copy()})
    y = sess.run(None, {"x": x})[0].astype(np.float64)
    xb = x.reshape(m, k // bs, bs).astype(np.float64)
    xs = np.abs(xb).max(-1) / 127.0
    xq = np.rint(xb / xs[..., None])
    emulated = (np.einsum("mkb,nkb->mnk", xq, codes) * xs[:, None, :] * scale[None].astype(np.float64)).sum(-1)
    dequantized = x.astype(np.float64) @ (codes * scale[..., None].astype(np.float64)).reshape(n, k).T
    scale_of_y = np.abs(emulated).max()
    # Float rounding of the per-block sums only: a saturated int16 pair would be off by >= 1% of the output.
    off_int8 = np.abs(y - emulated).max() / scale_of_y
    off_float = np.abs(y - dequantized).max() / scale_of_y
    assert min(off_int8, off_float) <= 1e-5, (off_int8, off_float)
    # The two definitions differ by far more than that, so the check tells them apart.
    assert np.abs(emulated - dequantized).max() / scale_of_y > 1e-4


def test_weight_codes_cannot_overflow_any_integer_kernel():
    w = np.random.default_rng(1).standard_normal((4, 3, 32)).astype(np.float32) * 50
    q8, _ = quantize_symmetric(w, 8)
    assert q8.min() >= 1 and q8.max() <= 255  # |code - 128| <= 127
    q4, s4, off = quantize_min_offset(w)
    assert q4.min() == 0 and q4.max() == 15
    deq = (q4.astype(np.float32) - 8) * s4[..., None] + off[..., None]
    assert np.abs(deq - w).max() <= 0.5 * s4.max() + 1e-4  # round to nearest on a grid spanning [min, max]
