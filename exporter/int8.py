"""Dynamic int8 for encoder graphs (weights per output channel), numpy and onnx only (build side).

Two weight formats (``WEIGHTS``), both exact on every x86 ISA (tests/test_quant_numerics.py):
- ``signed7``: int8 weights within +-64, symmetric (zero point 0). The MatMuls are what onnxruntime's
  ``quantize_dynamic(per_channel=True, weight_type=QInt8, reduce_range=True)`` writes, byte for byte. They run
  on onnxruntime's u8 x s8 kernels (VNNI, AMX), 11x the u8 x u8 kernel's peak on an AVX-512 AMX Xeon and 1.5x on
  AVX2; 255 * 64 * 2 = 32640 keeps vpmaddubsw's int16 pair sums from saturating on CPUs without VNNI.
- ``unsigned``: uint8 weights with a zero point (U8U8), what ``quantize_dynamic(per_channel=True,
  weight_type=QUInt8)`` writes: twice the resolution, on the slower kernel.
Embedding tables are uint8 per tensor in both (a Gather's speed does not depend on it).

Each MatMul/Gemm with a constant 2-D weight becomes
DynamicQuantizeLinear (once per activation) -> MatMulInteger -> Cast -> Mul by the product of the two scales,
the chain onnxruntime fuses into DynamicQuantizeMatMul (a BiasGelu after one becomes Add + Gelu, so the bias
fuses into it too); constant embedding tables become a uint8 Gather and a
DequantizeLinear. Which weights a bundle gets: see quantize.py.

Why not onnxruntime's tool: it quantizes a weight one channel at a time in Python, 4.3 s of a MiniLM export's
int8 step (21 125 calls, AVX2 EPYC); here one vectorised pass per weight: 0.8 s for MiniLM's
whole int8 step, load and save included, against 5.6 s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ExporterError
from .fusions import MS_DOMAIN

QMAX = 255  # uint8, not reduced: U8U8 kernels cannot saturate (tests/test_quant_numerics.py)
S7 = 64  # signed7: |q| <= 64, onnxruntime's reduce_range for int8 (-64..64)
WEIGHTS = ("signed7", "unsigned")


@dataclass(frozen=True)
class QuantizedWeight:
    data: np.ndarray  # uint8, the weight's shape
    scale: np.ndarray  # float32: per column (2-D MatMul weights) or a scalar (embedding tables)
    zero_point: np.ndarray  # uint8 (signed7: int8 zeros), the scale's shape


def quantize_u8(w: np.ndarray, axis: int | None) -> QuantizedWeight:
    """Asymmetric uint8 with 0 representable, per slice along ``axis`` (None: the whole tensor), computed as
    onnxruntime's ``compute_scale_zp`` does: the range in float64, the stored scale float32, ties to even."""
    w = np.asarray(w, dtype=np.float32)
    reduce = None if axis is None else tuple(i for i in range(w.ndim) if i != axis)
    rmin = np.minimum(w.min(axis=reduce), np.float32(0))
    rmax = np.maximum(w.max(axis=reduce), np.float32(0))
    scale64 = (rmax.astype(np.float64) - rmin.astype(np.float64)) / float(QMAX)
    flat = scale64 < np.finfo(np.float32).tiny  # a constant-zero slice: scale 1, zero point 0
    safe = np.where(flat, 1.0, scale64)
    zero_point = np.where(flat, 0.0, np.round(-rmin.astype(np.float64) / safe)).astype(np.uint8)
    scale = np.where(flat, np.float32(1.0), scale64.astype(np.float32)).astype(np.float32)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    q = np.round(w / scale.reshape(shape)) + zero_point.reshape(shape).astype(np.float32)
    return QuantizedWeight(np.clip(q, 0, QMAX).astype(np.uint8), scale, zero_point)


def quantize_s7(w: np.ndarray) -> QuantizedWeight:
    """Symmetric int8 within +-64 per column of a [K, N] weight, as onnxruntime's ``compute_scale_zp`` does for
    QInt8 with reduce_range: scale = 2 * absmax / 128 in float64, stored float32; zero point 0."""
    w = np.asarray(w, dtype=np.float32)
    absmax = np.maximum(np.abs(np.minimum(w.min(axis=0), np.float32(0))), np.maximum(w.max(axis=0), np.float32(0)))
    scale64 = 2 * absmax.astype(np.float64) / float(2 * S7)
    flat = scale64 < np.finfo(np.float32).tiny
    scale = np.where(flat, np.float32(1.0), scale64.astype(np.float32)).astype(np.float32)
    q = np.clip(np.round(w / scale.reshape(1, -1)), -S7, S7).astype(np.int8)
    return QuantizedWeight(q, scale, np.zeros(scale.shape, np.int8))


def quantize_dynamic_int8(src: Path, dst: Path, external: bool, weights: str = "signed7") -> dict[str, int]:
    """Write the int8 variant of the fp32 graph at ``src`` to ``dst`` with ``weights`` (one of ``WEIGHTS``); how
    many MatMuls and tables it quantized."""
    import onnx
    from onnx import helper, numpy_helper

    if weights not in WEIGHTS:
        raise ExporterError(f"int8 weights {weights!r}: use one of {', '.join(WEIGHTS)}")
    model = onnx.load(str(src))
    graph = model.graph
    # An initializer that is also a graph input is a default the caller may override (a swappable graph's
    # adapter inputs): not a constant, so never quantized.
    overridable = {i.name for i in graph.input}
    inits = {i.name: i for i in graph.initializer if i.name not in overridable}
    arrays: dict[str, np.ndarray] = {}

    def const(name: str) -> np.ndarray | None:
        init = inits.get(name)
        if init is None or init.data_type != onnx.TensorProto.FLOAT:
            return None
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(init)
        return arrays[name]

    new_inits: list = []
    quantized: dict[str, tuple[str, str, str]] = {}  # a weight's name -> its quantized tensors, made once

    def weight(base: str, w: np.ndarray, axis: int | None) -> tuple[str, str, str]:
        if base not in quantized:
            q = quantize_s7(w) if weights == "signed7" and axis == 1 else quantize_u8(w, axis)
            names = (base + "_quantized", base + "_scale", base + "_zero_point")
            new_inits.extend(numpy_helper.from_array(v, n) for n, v in zip(names, (q.data, q.scale, q.zero_point)))
            quantized[base] = names
        return quantized[base]

    nodes: list = []
    activations: dict[str, tuple[str, str, str]] = {}
    replaced: set[str] = set()  # float initializers some quantized node no longer reads
    counts = {"matmul": 0, "gather": 0}
    quantized_outputs: set[str] = set()  # outputs of quantized MatMuls without a bias of their own
    for index, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{index}"
        plan = _linear_weight(node, const)
        if plan is not None:
            w, base, bias = plan
            if node.op_type == "Gemm":  # onnxruntime's names, which its fusions do not depend on but readers may
                name += "_MatMul"
            if node.input[0] not in activations:
                a = node.input[0]
                activations[a] = (a + "_quantized", a + "_scale", a + "_zero_point")
                nodes.append(helper.make_node("DynamicQuantizeLinear", [a], list(activations[a]),
                                              name=a + "_QuantizeLinear"))
            aq, ascale, azp = activations[node.input[0]]
            wq, wscale, wzp = weight(base, w, axis=1)
            out = node.output[0]
            matmul_out = out + "_MatMul" if bias else out
            scales = f"{name}_quant_scales_mul:0"
            nodes += [
                helper.make_node("Mul", [ascale, wscale], [scales], name=f"{name}_quant_scales_mul"),
                helper.make_node("MatMulInteger", [aq, wq, azp, wzp], [matmul_out + "_output_quantized"],
                                 name=f"{name}_quant"),
                helper.make_node("Cast", [matmul_out + "_output_quantized"],
                                 [matmul_out + "_output_quantized_cast_output"], to=onnx.TensorProto.FLOAT,
                                 name=matmul_out + "_output_quantized_cast"),
                helper.make_node("Mul", [matmul_out + "_output_quantized_cast_output", scales], [matmul_out],
                                 name=f"{name}_quant_output_scale_mul"),
            ]
            if bias:
                nodes.append(helper.make_node("Add", [matmul_out, bias], [out], name=f"{name}_Add"))
            replaced.add(node.input[1])
            if not bias:
                quantized_outputs.add(out)
            counts["matmul"] += 1
            continue
        gelu_bias = const(node.input[1]) if node.op_type == "BiasGelu" and len(node.input) == 2 else None
        if node.domain == MS_DOMAIN and node.input[0] in quantized_outputs and getattr(gelu_bias, "ndim", 0) == 1:
            # The bias goes into the quantized MatMul (onnxruntime fuses the Add into DynamicQuantizeMatMul's
            # bias) and Gelu runs alone: the same outputs, bit for bit, and MiniLM int8 at b8 s128 took
            # 62.4 against 66.9 ms (one thread, AVX-512 Xeon, issue 15 session 11): BiasGelu's kernel is slower
            # than Gelu's on the same tensor (1.29 against 0.92 ms at [8, 128, 1536]).
            mid = node.output[0] + "_biased"
            nodes += [helper.make_node("Add", list(node.input), [mid], name=name + "_Add"),
                      helper.make_node("Gelu", [mid], list(node.output), name=name, domain=MS_DOMAIN)]
            continue
        table = const(node.input[0]) if node.op_type == "Gather" and node.input else None
        if table is not None and _axis(node) == 0 and table.ndim == 2:
            wq, wscale, wzp = weight(node.input[0], table, axis=None)
            out = node.output[0]
            nodes += [
                helper.make_node("Gather", [wq, node.input[1]], [out + "_quantized"], name=name, axis=0),
                helper.make_node("DequantizeLinear", [out + "_quantized", wscale, wzp], [out],
                                 name=out + "_DequantizeLinear"),
            ]
            replaced.add(node.input[0])
            counts["gather"] += 1
            continue
        nodes.append(node)

    still_read = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name not in replaced or i.name in still_read]
    # Every name is defined once; a graph that already used one of the generated names would break that.
    kept = {i.name for i in keep}  # an input with a default initializer is one name, defined once
    defined = ([o for n in nodes for o in n.output] + [i.name for i in keep + new_inits]
               + [i.name for i in graph.input if i.name not in kept])
    if len(defined) != len(set(defined)):
        seen: set[str] = set()
        clash = next(d for d in defined if d in seen or seen.add(d))
        raise ExporterError(f"int8: the quantized graph would define {clash!r} twice (a name the graph already "
                            "uses); export with --quantize none and report this graph")
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(keep + new_inits)
    if external:
        onnx.save(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=dst.name + ".data")
    else:
        onnx.save(model, str(dst))
    return counts


def _axis(node) -> int:
    for a in node.attribute:
        if a.name == "axis":
            return a.i
    return 0


def _linear_weight(node, const) -> tuple[np.ndarray, str, str | None] | None:
    """(the [K, N] weight, the name its quantized tensors take, the bias to add) for a MatMul or Gemm that
    multiplies an activation by a constant 2-D float weight; None for anything else (attention's two
    activations, adapter inputs of swappable graphs, a Gemm with alpha/beta/transA)."""
    if node.op_type == "MatMul" and len(node.input) == 2:
        w = const(node.input[1])
        if w is not None and w.ndim == 2 and const(node.input[0]) is None:
            return w, node.input[1], None
        return None
    if node.op_type != "Gemm" or len(node.input) < 2:
        return None
    attrs = {a.name: (a.f if a.type == a.FLOAT else a.i) for a in node.attribute}
    if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
        return None
    w = const(node.input[1])
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if w is None or w.ndim != 2 or const(node.input[0]) is not None:
        return None
    if bias is not None and (const(bias) is None or const(bias).ndim != 1):
        return None
    if attrs.get("transB", 0):
        return np.ascontiguousarray(w.T), node.input[1] + "_Transposed", bias
    return w, node.input[1], bias
