"""onnxruntime's transformer fusions on an exported encoder graph, and the rewrites that make onnxruntime's
CPU kernels run it faster (build side).

Measured for issue 15 on MiniLM + LoRA (x86 AVX2 without VNNI, 1 thread, ``benchmarks/bench_routes.py``): the
dynamo graph with eager attention, fused by onnxruntime's transformer optimizer (SkipLayerNormalization 12,
BiasGelu 6: 187 nodes instead of 241), runs fp32 at 0.91x / 0.94x / 0.89x the unfused graph's latency at
b1 s16 / b1 s128 / b8 s128 and int8 at ~0.98x. Its attention is not fused into one Attention op (the
optimizer's patterns match the TorchScript exporter's graph, which runs ~5% faster still, but traces
transformers' masks into shape-specialised Python branches). The fusions are plain pattern rewrites (no
onnxruntime session optimizations baked in, so nothing depends on the exporting CPU); the fused ops are
onnxruntime contrib ops (com.microsoft), which onnxruntime, onnxruntime-web and onnxruntime-node run.

Then ``tune_for_cpu`` (both measured on one thread of an AVX-512 Xeon with onnxruntime 1.32, issue 15):
- Layer norms (``unfuse_layer_norms``): onnxruntime's SkipLayerNormalization kernel is a scalar loop (2.08 ms
  at [8, 128, 384]) and its session-load fusions turn any Add + LayerNormalization on a 3-D tensor into one
  (2.12 ms), while LayerNormalization alone is vectorised (0.25 ms). So each becomes its Adds, then one
  LayerNormalization on a 2-D view (Flatten, and Reshape back), which no fusion matches: 0.66 ms in all, against
  0.87-0.98 ms for the primitive ops (ReduceMean, Sub, Mul, ...) written out before (session 10), and 2.1 ms
  fused. Float16 keeps the same form: LayerNormalization accumulates in float32 there, where float16 primitive
  ops would overflow on the square of a hidden state past 256.
- Masks (``skip_zero_masks``): attention is computed without the mask when it is all zeros (nothing padded),
  as one MultiHeadAttention where the exported chain is recognised.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np

from .errors import ExporterError

MS_DOMAIN = "com.microsoft"
# Encoder graphs whose attention became MultiHeadAttention (its `scale` attribute, inside an If): onnxruntime 1.20.1
# and 1.32.0 run MiniLM's within 3.4e-6 of each other (issue 15, session 12). 1.17-1.19 were not tried (their
# wheels need numpy 1), so bundles with it ask for 1.20 rather than their opset's minimum.
ATTENTION_MIN_ONNXRUNTIME = "1.20"
# Marks the nodes a rewritten layer norm becomes.
UNFUSED_LN_TAG = "/ln_unfused/"
MATMULS = ("MatMul", "Gemm", "FusedMatMul")


def fuse_transformer(path: Path, model_type: str, tune: bool = False) -> dict[str, int]:
    """Rewrite the graph at ``path`` in place with onnxruntime's fusions for ``model_type`` (its optimizer's
    name: "bert" also matches RoBERTa/DistilBERT layers), then, with ``tune``, ``tune_for_cpu`` with fused
    attention (one save for both); the contrib op counts, subgraphs included (empty: nothing matched)."""
    from onnxruntime.transformers.optimizer import optimize_model

    # The optimizer logs every fusion it tries at INFO/WARNING on its own loggers, and print()s ("failed in shape
    # inference ...") where stdout belongs to the CLI's results (--json). It runs with its symbolic shape
    # inference, which its SkipLayerNormalization and EmbedLayerNormalization fusions read: skipping it saved
    # 0.5 s of MiniLM's export (issue 15, session 13) before BERT graphs were written from the weights
    # (encoder_graph.py); the encoders still traced (DistilBERT) fuse EmbedLayerNormalization, so it stays.
    quiet = [logging.getLogger(n) for n in ("onnxruntime.transformers", "fusion_base", "onnx_model", "")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            optimized = optimize_model(str(path), model_type=model_type, num_heads=0, hidden_size=0, opt_level=0)
    except Exception as e:  # noqa: BLE001 - the optimizer raises plain exceptions on patterns it misreads
        raise ExporterError(f"onnxruntime's transformer fusions failed on {path.name}: {type(e).__name__}: "
                            f"{str(e)[:160]}") from None
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    tuned = sum(tune_for_cpu(optimized.model, fused_attention=True).values()) if tune else 0
    fused = contrib_op_counts(optimized.model.graph)
    if fused or tuned:
        # save_model_to_file adds the com.microsoft opset import the fused nodes need.
        optimized.save_model_to_file(str(path), use_external_data_format=False)
        _check(path)
    return fused


def contrib_op_counts(graph) -> dict[str, int]:
    """How many of each onnxruntime contrib op ``graph`` has, its subgraphs included (MultiHeadAttention sits in
    If branches)."""
    counts: dict[str, int] = {}
    for node in _nodes(graph):
        if node.domain == MS_DOMAIN:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def uses_contrib_ops(path: Path) -> bool:
    """Whether any node of the graph at ``path``, or of its subgraphs, is an onnxruntime contrib op."""
    import onnx

    return MS_DOMAIN in _domains(onnx.load(str(path), load_external_data=False).graph)


def _nodes(g):
    """Every node of ``g`` and of its subgraphs (If, Loop, Scan), depth first."""
    from onnx import AttributeProto

    for n in g.node:
        yield n
        for a in n.attribute:
            for sub in [a.g] if a.type == AttributeProto.GRAPH else list(a.graphs):
                yield from _nodes(sub)


def _domains(g) -> set[str]:
    return {n.domain for n in _nodes(g)}


def tune_file_for_cpu(path: Path, fused_attention: bool = False) -> dict[str, int]:
    """``tune_for_cpu`` on the graph at ``path``, in place (for graphs onnxruntime's optimizer does not fuse)."""
    import onnx

    model = onnx.load(str(path))
    counts = tune_for_cpu(model, fused_attention)
    if any(counts.values()):
        onnx.save(model, str(path))
        _check(path)
    return counts


def tune_for_cpu(model, fused_attention: bool = False) -> dict[str, int]:
    """The rewrites the module docstring measures, on a loaded ModelProto in memory: layer norms, then masks
    (``fused_attention``: MultiHeadAttention, a contrib op, where nothing is masked). How many of each."""
    return {"layer_norms": unfuse_layer_norms(model), **skip_zero_masks(model, fused_attention)}


def _check(path: Path) -> None:
    import onnx

    onnx.checker.check_model(str(path))


def unfuse_layer_norms(model) -> int:
    """Rewrite every LayerNormalization (last axis) and SkipLayerNormalization of a loaded ModelProto, in memory,
    as its Adds, then one LayerNormalization on a 2-D view (Flatten, and Reshape back); the number rewritten.
    Nothing before opset 17, which has no LayerNormalization (the exporter writes 17 and later). A node whose
    mean or inverse-std outputs are used is kept."""
    from onnx import helper

    g = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 17:
        return 0
    used = set(_all_inputs(g)) | {o.name for o in g.output}
    producers = {o: n.op_type for n in g.node for o in n.output}
    nodes, count, groups = [], 0, set()
    for node in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "LayerNormalization" and node.domain in ("", "ai.onnx"):
            ok = attrs.get("axis", -1) == -1 and attrs.get("stash_type", 1) == 1
            x, gamma, beta = node.input[0], node.input[1], node.input[2] if len(node.input) > 2 else ""
            adds, eps, summed = [], attrs.get("epsilon", 1e-5), ""
        elif node.op_type == "SkipLayerNormalization" and node.domain == MS_DOMAIN:
            ok = True
            ins = list(node.input) + [""] * (5 - len(node.input))
            gamma, beta, bias = ins[2], ins[3], ins[4]
            eps = attrs.get("epsilon", 1e-12)
            summed = node.output[3] if len(node.output) > 3 and node.output[3] else ""
            # The bias goes on the MatMul's side first, torch's order ((x @ W + b) + residual): in int8 that
            # Add fuses into the quantized MatMul before it (DynamicQuantizeMatMul's bias input), 12 Adds fewer
            # for MiniLM; fp32 outputs move by ~1e-7 (rounding order only).
            main, skip = ins[0], ins[1]
            if producers.get(skip) in MATMULS and producers.get(main) not in MATMULS:
                main, skip = skip, main
            adds = [(main, bias), ("", skip)] if bias else [(main, skip)]
            x = ""
        else:
            nodes.append(node)
            continue
        if not ok or any(o and o in used for o in node.output[1:3]):
            nodes.append(node)
            continue
        # ONNX does not require unique node names: a repeated one gets a suffix, so that no two groups share
        # tensor names.
        stem, k = node.name or node.output[0], 0
        while (stem if not k else f"{stem}_{k}") in groups:
            k += 1
        stem = stem if not k else f"{stem}_{k}"
        groups.add(stem)
        base = stem + UNFUSED_LN_TAG
        for i, (a, b) in enumerate(adds):
            y = (summed or base + "sum") if i == len(adds) - 1 else base + f"sum{i}"
            nodes.append(helper.make_node("Add", [a or x, b], [y], name=base + f"Add{i}"))
            x = y
        nodes += [
            helper.make_node("Shape", [x], [base + "shape"], name=base + "Shape"),
            helper.make_node("Flatten", [x], [base + "rows"], axis=-1, name=base + "Flatten"),
            helper.make_node("LayerNormalization", [base + "rows", gamma] + ([beta] if beta else []),
                             [base + "normed_rows"], axis=-1, epsilon=float(eps), name=base + "LayerNormalization"),
            # allowzero: the shape is the input's own, so a 0 in it is a length, not "copy this dim"
            helper.make_node("Reshape", [base + "normed_rows", base + "shape"], [node.output[0]], name=base + "Reshape",
                             allowzero=1),
        ]
        count += 1
    if count:
        del g.node[:]
        g.node.extend(nodes)
        if MS_DOMAIN not in _domains(g):
            keep = [o for o in model.opset_import if o.domain != MS_DOMAIN]
            del model.opset_import[:]
            model.opset_import.extend(keep)
    return count


MASK_SKIP_TAG = "/mask_skip/"
# onnxruntime's MultiHeadAttention on one thread of an AVX-512 Xeon (issue 15, session 12), [8, 128, 384] with 12
# heads: 2.88 ms against 3.29 ms for the exported Reshape/Transpose/MatMul/Softmax chain without a mask (outputs
# 6e-7 apart); with the mask as its attention_bias 4.09 ms against 3.82 ms. So it runs only where nothing is masked.
ATTENTION_PERMS = {"q": [0, 2, 1, 3], "k": [0, 2, 3, 1], "v": [0, 2, 1, 3], "out": [0, 2, 1, 3]}


def _shapes(g) -> dict[str, list | None]:
    """Each value's inferred dims (an int, a symbol, or None where unknown), from the graph's value_info."""
    out: dict[str, list | None] = {}
    for v in list(g.value_info) + list(g.input) + list(g.output):
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
        out[v.name] = dims if t.HasField("shape") else None
    return out


def _broadcasts_into(small: list | None, big: list | None) -> bool:
    """Whether a tensor of dims ``small`` added to one of dims ``big`` leaves the result ``big``'s shape."""
    if small is None or big is None or len(small) > len(big) or any(b is None for b in big):
        return False
    return all(s == 1 or (s is not None and s == b) for s, b in zip(reversed(small), reversed(big)))


def _all_inputs(g) -> list[str]:
    """Every name the graph's nodes read, those of their subgraphs (If, Loop, Scan) included."""
    return [i for n in _nodes(g) for i in n.input]


class _Graph:
    """Lookups over a graph's top-level nodes for the attention rewrite."""

    def __init__(self, model) -> None:
        from onnx import numpy_helper

        g = self.g = model.graph
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumer = {i: n for n in g.node for i in n.input}  # meaningful where only_reader() holds
        read = _all_inputs(g)
        self.readers: dict[str, int] = {}
        for name in read:
            self.readers[name] = self.readers.get(name, 0) + 1
        for o in g.output:
            self.readers[o.name] = self.readers.get(o.name, 0) + 1  # a graph output is never an intermediate
        self.shapes = _shapes(g)
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.consts = {i.name: numpy_helper.to_array(i) for i in g.initializer if len(i.dims) == 0}
        for n in g.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value" and not n.attribute[0].t.dims:
                self.consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        self.taken = ({o for n in g.node for o in n.output} | {i.name for i in g.initializer}
                      | {i.name for i in g.input} | set(read))

    def fresh(self, name: str) -> str:
        k = 0
        while (name if not k else f"{name}_{k}") in self.taken:
            k += 1
        name = name if not k else f"{name}_{k}"
        self.taken.add(name)
        return name

    def only_reader(self, name: str) -> bool:
        return self.readers.get(name, 0) == 1

    def made_by(self, name: str, op: str, perm: list[int] | None = None):
        """The node of type ``op`` (default domain) making ``name``, read once; with ``perm``, a Transpose's."""
        node = self.producer.get(name)
        return node if self.only_reader(name) and self._is(node, op, perm) else None

    def read_by(self, name: str, op: str, perm: list[int] | None = None):
        """The one node reading ``name``, where it is of type ``op`` (with ``perm``: a Transpose's)."""
        node = self.consumer.get(name) if self.only_reader(name) else None
        return node if self._is(node, op, perm) else None

    @staticmethod
    def _is(node, op: str, perm: list[int] | None) -> bool:
        if node is None or node.op_type != op or node.domain not in ("", "ai.onnx"):
            return False
        if perm is not None:
            from onnx import helper

            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            return list(attrs.get("perm", [])) == perm
        return True


def _split_heads(gr: _Graph, name: str, perm: list[int]) -> tuple[object, object, str, int] | None:
    """Transpose(Reshape(x [B, S, D] -> [B, S, N, D/N]), perm): (the Transpose, the Reshape, x, N)."""
    tr = gr.made_by(name, "Transpose", perm)
    rs = gr.made_by(tr.input[0], "Reshape") if tr is not None else None
    if rs is None:
        return None
    x, split = gr.shapes.get(rs.input[0]), gr.shapes.get(rs.output[0])
    if not x or not split or len(x) != 3 or len(split) != 4 or split[:2] != x[:2]:
        return None
    if not all(isinstance(d, int) and d > 0 for d in (x[2], split[2], split[3])) or split[2] * split[3] != x[2]:
        return None
    return tr, rs, rs.input[0], split[2]


def _attention(gr: _Graph, softmax, add, scores: str) -> dict | None:
    """The exported self-attention around ``softmax`` (``softmax(scale * Q K^T + mask) V``, heads split by
    Reshape + Transpose and merged back): its nodes in order, Q/K/V as [B, S, D], heads, scale, output."""
    scaled = gr.producer.get(scores)
    if scaled is None or not gr.only_reader(scores):
        return None
    scale, mm = 1.0, scaled
    if scaled.op_type in ("Mul", "Div") and scaled.domain in ("", "ai.onnx"):
        const = [i for i in scaled.input if i in gr.consts and gr.consts[i].size == 1]
        other = [i for i in scaled.input if i not in const]
        if len(const) != 1 or len(other) != 1 or (scaled.op_type == "Div" and scaled.input[1] != const[0]):
            return None
        c = float(gr.consts[const[0]])
        if not np.isfinite(c) or c == 0:
            return None
        scale = c if scaled.op_type == "Mul" else 1.0 / c
        mm = gr.made_by(other[0], "MatMul")
    elif mm.op_type != "MatMul":
        return None
    if mm is None or mm.op_type != "MatMul":
        return None
    q, k = _split_heads(gr, mm.input[0], ATTENTION_PERMS["q"]), _split_heads(gr, mm.input[1], ATTENTION_PERMS["k"])
    pv = gr.read_by(softmax.output[0], "MatMul")
    if q is None or k is None or pv is None or pv.input[0] != softmax.output[0]:
        return None
    v = _split_heads(gr, pv.input[1], ATTENTION_PERMS["v"])
    tr_out = gr.read_by(pv.output[0], "Transpose", ATTENTION_PERMS["out"])
    reshape_out = gr.read_by(tr_out.output[0], "Reshape") if tr_out is not None else None
    if v is None or reshape_out is None or reshape_out.input[0] != tr_out.output[0]:
        return None
    out = reshape_out.output[0]
    heads = q[3]
    if k[3] != heads or v[3] != heads or gr.shapes.get(out) != gr.shapes.get(q[2]):
        return None
    axis = next((a.i for a in softmax.attribute if a.name == "axis"), None)
    if axis not in (-1, 3) and not (axis is None and gr.opset >= 13):  # before 13 the default was 1, flattened
        return None
    chain = [q[1], q[0], k[1], k[0], v[1], v[0], mm] + ([scaled] if scaled is not mm else []) + [add, softmax, pv,
                                                                                              tr_out, reshape_out]
    return {"nodes": chain, "q": q[2], "k": k[2], "v": v[2], "heads": heads, "scale": scale, "out": out}


def skip_zero_masks(model, fused_attention: bool = False) -> dict[str, int]:
    """Each ``Softmax(Add(scores, mask))`` whose mask is computed (not a constant) and broadcasts into the
    scores becomes ``If(mask is all zeros) then <unmasked> else <as exported>``, on a loaded ModelProto in
    memory. Exact: x + 0 is x, and a mask with anything else in it (a padded position, -inf, NaN) takes the
    exported branch. It is what transformers does in torch, which hands SDPA no mask when nothing is padded.
    With ``fused_attention``, where the whole self-attention around the Softmax is the exported chain
    (``_attention``), the unmasked branch is one onnxruntime MultiHeadAttention (a contrib op). The condition is
    computed once per mask. Returns how many Softmaxes were rewritten and how many of them as attention."""
    from onnx import TensorProto, helper

    g = model.graph
    gr = _Graph(model)
    constant = {i.name for i in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    elem = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    conditions: dict[str, tuple[str, list]] = {}  # mask -> (its condition, the nodes computing it)
    moved: set[int] = set()  # id() of top-level nodes that move into an If's exported branch
    placed_at: dict[int, object] = {}  # id() of the node an If takes the place of -> the If
    counts = {"masks_skipped": 0, "attention_fused": 0}
    for node in list(g.node):
        if node.op_type != "Softmax" or node.domain not in ("", "ai.onnx") or id(node) in moved:
            continue
        add = gr.producer.get(node.input[0])
        if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.input) != 2:
            continue
        if not gr.only_reader(add.output[0]) or elem.get(add.output[0]) != TensorProto.FLOAT:
            continue
        scores, mask = add.input
        # The mask is the side that broadcasts into the other; where both do (a mask as big as the scores),
        # the scores are the side a MatMul (or its scaling) makes.
        made_by_matmul = gr.producer.get(mask) is not None and gr.producer[mask].op_type in (*MATMULS, "Mul", "Div")
        if not _broadcasts_into(gr.shapes.get(mask), gr.shapes.get(scores)) or (
                made_by_matmul and _broadcasts_into(gr.shapes.get(scores), gr.shapes.get(mask))):
            scores, mask = mask, scores
        if mask in constant or not _broadcasts_into(gr.shapes.get(mask), gr.shapes.get(scores)):
            continue
        attention = _attention(gr, node, add, scores) if fused_attention else None
        if attention is not None and any(id(n) in moved for n in attention["nodes"]):
            attention = None
        if mask not in conditions:
            l1 = gr.fresh(mask + MASK_SKIP_TAG + "l1")
            zero = gr.fresh(mask + MASK_SKIP_TAG + "zero")
            cond = gr.fresh(mask + MASK_SKIP_TAG + "is_zero")
            conditions[mask] = (cond, [
                helper.make_node("ReduceL1", [mask], [l1], keepdims=0, name=l1),
                helper.make_node("Constant", [], [zero], name=zero,
                                 value=helper.make_tensor(zero, TensorProto.FLOAT, [], [0.0])),
                helper.make_node("Equal", [l1, zero], [cond], name=cond),
            ])
        base = (node.name or node.output[0]) + MASK_SKIP_TAG
        chain = attention["nodes"] if attention else [add, node]
        out = chain[-1].output[0]
        masked = [_copy(n) for n in chain]
        masked_out = gr.fresh(base + "masked")
        masked[-1].output[0] = masked_out
        unmasked_out = gr.fresh(base + "unmasked")
        if attention:
            unmasked = helper.make_node("MultiHeadAttention", [attention["q"], attention["k"], attention["v"]],
                                        [unmasked_out], domain=MS_DOMAIN, num_heads=attention["heads"],
                                        scale=attention["scale"], name=base + "MultiHeadAttention")
        else:
            unmasked = helper.make_node("Softmax", [scores], [unmasked_out], name=base + "Softmax")
            unmasked.attribute.extend(node.attribute)
        branch = {"then": ([unmasked], unmasked_out), "else": (masked, masked_out)}
        graphs = {k: helper.make_graph(nodes, base + k, [], [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)])
                  for k, (nodes, o) in branch.items()}
        moved.update(id(n) for n in chain)
        placed_at[id(chain[-1])] = helper.make_node("If", [conditions[mask][0]], [out], name=base + "If",
                                                    then_branch=graphs["then"], else_branch=graphs["else"])
        counts["masks_skipped"] += 1
        counts["attention_fused"] += attention is not None
    if not conditions:
        return counts
    nodes, placed = [], set()
    by_cond = {cond: mask for mask, (cond, _) in conditions.items()}
    for node in g.node:
        new = placed_at.get(id(node))
        if new is not None:
            mask = by_cond[new.input[0]]
            if mask not in placed:  # before the first If that reads it, after the mask is made
                nodes += conditions[mask][1]
                placed.add(mask)
            nodes.append(new)
        elif id(node) not in moved:
            nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)
    if counts["attention_fused"] and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return counts


def _copy(node):
    from onnx import NodeProto

    c = NodeProto()
    c.CopyFrom(node)
    return c
