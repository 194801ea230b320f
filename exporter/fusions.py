"""onnxruntime's transformer fusions on an exported encoder graph (build side).

Measured for issue 15 on MiniLM + LoRA (x86 AVX2 without VNNI, 1 thread, ``benchmarks/bench_routes.py``): the
dynamo graph with eager attention, fused by onnxruntime's transformer optimizer (SkipLayerNormalization 12,
BiasGelu 6: 187 nodes instead of 241), runs fp32 at 0.91x / 0.94x / 0.89x the unfused graph's latency at
b1 s16 / b1 s128 / b8 s128 and int8 at ~0.98x. Its attention is not fused into one Attention op (the
optimizer's patterns match the TorchScript exporter's graph, which runs ~5% faster still, but traces
transformers' masks into shape-specialised Python branches). The fusions are plain pattern rewrites (no
onnxruntime session optimizations baked in, so nothing depends on the exporting CPU); the fused ops are
onnxruntime contrib ops (com.microsoft), which onnxruntime, onnxruntime-web and onnxruntime-node run.

Layer norms are then written out as primitive ops (``decompose_layer_norms``): onnxruntime's CPU kernels for
LayerNormalization and SkipLayerNormalization are scalar loops. Measured on one thread of an AVX-512 Xeon
(issue 15, session 10): 2.06 ms for an [8, 128, 384] SkipLayerNormalization against 0.90 ms for Add +
ReduceMean/Sub/Mul/ReduceMean/Add/Sqrt/Reciprocal/Mul/Mul/Add on the same tensor (0.25 vs 0.055 ms at
[1, 128, 384], 0.036 vs 0.015 ms at [1, 16, 384]); max difference 2.4e-6. Reciprocal + Mul, not Div, and
Mul(c, c), not Pow, so that onnxruntime's own LayerNormFusion does not fold the pattern back into the slow
kernel at session load.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np

from .errors import ExporterError

MS_DOMAIN = "com.microsoft"
# Marks the nodes of a decomposed layer norm, so that the float16 variant can put them back together.
DECOMPOSED_LN_TAG = "/ln_decomposed/"


def fuse_transformer(path: Path, model_type: str, decompose: bool = False) -> dict[str, int]:
    """Rewrite the graph at ``path`` in place with onnxruntime's fusions for ``model_type`` (its optimizer's
    name: "bert" also matches RoBERTa/DistilBERT layers), then, with ``decompose``, its layer norms as
    primitive ops (one save for both); the contrib op counts left (empty: nothing matched)."""
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    # The optimizer logs every fusion it tries at INFO/WARNING on its own loggers.
    quiet = [logging.getLogger(n) for n in ("onnxruntime.transformers", "fusion_base", "onnx_model", "")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    # It also print()s ("failed in shape inference ...") where stdout belongs to the CLI's results (--json).
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            optimized = optimize_model(str(path), model_type=model_type, num_heads=0, hidden_size=0, opt_level=0)
    except Exception as e:  # noqa: BLE001 - the optimizer raises plain exceptions on patterns it misreads
        raise ExporterError(f"onnxruntime's transformer fusions failed on {path.name}: {type(e).__name__}: "
                            f"{str(e)[:160]}") from None
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    decomposed = _decompose(optimized.model) if decompose else 0
    fused: dict[str, int] = {}
    for node in optimized.model.graph.node:
        if node.domain == MS_DOMAIN:
            fused[node.op_type] = fused.get(node.op_type, 0) + 1
    if fused or decomposed:
        # save_model_to_file adds the com.microsoft opset import the fused nodes need.
        optimized.save_model_to_file(str(path), use_external_data_format=False)
        onnx.checker.check_model(str(path))
    return fused


def uses_contrib_ops(path: Path) -> bool:
    import onnx

    return any(n.domain == MS_DOMAIN for n in onnx.load(str(path), load_external_data=False).graph.node)


def decompose_layer_norms(path: Path) -> int:
    """Rewrite, in place, every LayerNormalization (last axis) and SkipLayerNormalization of the graph at
    ``path`` as primitive ops; the number rewritten. A node whose mean or inverse-std outputs are used is kept."""
    import onnx

    model = onnx.load(str(path))
    count = _decompose(model)
    if count:
        onnx.save(model, str(path))
        onnx.checker.check_model(str(path))
    return count


def _decompose(model) -> int:
    """decompose_layer_norms on a loaded ModelProto, in memory."""
    from onnx import helper, numpy_helper

    g = model.graph
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    taken = {i.name for i in g.initializer} | {o for n in g.node for o in n.output} | {i.name for i in g.input}
    consts: dict[tuple, str] = {}

    def const(kind: str, value) -> str:
        key = (kind, float(value) if kind == "eps" else int(value))
        if key not in consts:
            name, k = f"ln_decomposed_{kind}", 0
            while name in taken:
                k += 1
                name = f"ln_decomposed_{kind}_{k}"
            taken.add(name)
            array = np.array(value, np.float32) if kind == "eps" else np.array([value], np.int64)
            g.initializer.append(numpy_helper.from_array(array, name))
            consts[key] = name
        return consts[key]

    def reduce_mean(x: str, y: str, name: str):
        if opset >= 18:
            return helper.make_node("ReduceMean", [x, const("axes", -1)], [y], keepdims=1, name=name)
        return helper.make_node("ReduceMean", [x], [y], axes=[-1], keepdims=1, name=name)

    nodes, count, groups = [], 0, set()
    for node in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "LayerNormalization" and node.domain in ("", "ai.onnx"):
            ok = attrs.get("axis", -1) == -1 and attrs.get("stash_type", 1) == 1
            x, gamma, beta = node.input[0], node.input[1], node.input[2] if len(node.input) > 2 else ""
            adds, eps = [], attrs.get("epsilon", 1e-5)
        elif node.op_type == "SkipLayerNormalization" and node.domain == MS_DOMAIN:
            ok = True
            ins = list(node.input) + [""] * (5 - len(node.input))
            gamma, beta, bias = ins[2], ins[3], ins[4]
            eps = attrs.get("epsilon", 1e-12)
            summed = node.output[3] if len(node.output) > 3 and node.output[3] else ""
            adds = [(ins[0], ins[1])] + ([("", bias)] if bias else [])
            x = ""
        else:
            nodes.append(node)
            continue
        if not ok or any(o and o in used for o in node.output[1:3]):
            nodes.append(node)
            continue
        # ONNX does not require unique node names: a repeated one gets a suffix, so that no two groups share
        # tensor names (and recompose_layer_norms cannot merge them).
        stem, k = node.name or node.output[0], 0
        while (stem if not k else f"{stem}_{k}") in groups:
            k += 1
        stem = stem if not k else f"{stem}_{k}"
        groups.add(stem)
        base = stem + DECOMPOSED_LN_TAG

        def t(suffix: str, base: str = base) -> str:
            return base + suffix

        out: list = []
        for i, (a, b) in enumerate(adds):
            last = i == len(adds) - 1
            y = (summed or t("sum")) if last else t(f"sum{i}")
            out.append(helper.make_node("Add", [a or x, b], [y], name=t(f"Add{i}")))
            x = y
        out += [
            reduce_mean(x, t("mean"), t("ReduceMean0")),
            helper.make_node("Sub", [x, t("mean")], [t("centred")], name=t("Sub")),
            helper.make_node("Mul", [t("centred"), t("centred")], [t("square")], name=t("Square")),
            reduce_mean(t("square"), t("var"), t("ReduceMean1")),
            helper.make_node("Add", [t("var"), const("eps", eps)], [t("var_eps")], name=t("AddEps")),
            helper.make_node("Sqrt", [t("var_eps")], [t("std")], name=t("Sqrt")),
            helper.make_node("Reciprocal", [t("std")], [t("inv_std")], name=t("Reciprocal")),
            helper.make_node("Mul", [t("centred"), t("inv_std")], [t("normed")], name=t("Normalize")),
            helper.make_node("Mul", [t("normed"), gamma], [t("scaled") if beta else node.output[0]], name=t("Scale")),
        ]
        if beta:
            out.append(helper.make_node("Add", [t("scaled"), beta], [node.output[0]], name=t("Shift")))
        nodes += out
        count += 1
    if count:
        del g.node[:]
        g.node.extend(nodes)
        if not any(n.domain == MS_DOMAIN for n in g.node):
            keep = [o for o in model.opset_import if o.domain != MS_DOMAIN]
            del model.opset_import[:]
            model.opset_import.extend(keep)
    return count


def recompose_layer_norms(model) -> int:
    """Undo ``decompose_layer_norms`` on a loaded ModelProto, in memory: each decomposed group becomes its Adds
    plus one LayerNormalization again; the number of groups. For the float16 variant, whose converter would
    otherwise cast around every node of every group (27 Casts per layer norm)."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    groups: dict[str, dict[str, object]] = {}
    for node in g.node:
        if DECOMPOSED_LN_TAG in node.name:
            base, part = node.name.split(DECOMPOSED_LN_TAG, 1)
            groups.setdefault(base, {})[part] = node
    nodes, done = [], set()
    for node in g.node:
        if DECOMPOSED_LN_TAG not in node.name:
            nodes.append(node)
            continue
        base, part = node.name.split(DECOMPOSED_LN_TAG, 1)
        if part.startswith("Add") and part != "AddEps":
            nodes.append(node)  # the residual (and bias) Adds stay
            continue
        if base in done:
            continue
        done.add(base)
        grp = groups[base]
        scale, shift = grp["Scale"], grp.get("Shift")
        eps = float(numpy_helper.to_array(inits[grp["AddEps"].input[1]]))
        last = shift if shift is not None else scale
        nodes.append(helper.make_node(
            "LayerNormalization", [grp["ReduceMean0"].input[0], scale.input[1]] + ([shift.input[1]] if shift else []),
            [last.output[0]], axis=-1, epsilon=eps, name=base))
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name in used or not t.name.startswith("ln_decomposed_")]
    del g.initializer[:]
    g.initializer.extend(keep)  # the eps and axes constants only the decomposed nodes read
    return len(done)
