"""A BERT-family encoder graph written from the merged model's weights (build side), instead of traced.

For ``tasks.ArchSpec.written_graph`` architectures (BERT, which MiniLM is, RoBERTa and XLM-RoBERTa) when
onnxruntime's fusions are on:
the graph torch's exporter and onnxruntime's optimizer produce for these models, written directly (embeddings,
per layer q/k/v MatMuls, the attention chain, the output and MLP MatMuls with BiasGelu, layer norms, the task's
head), then ``fusions.tune_for_cpu`` as for an exported graph: layer norms on a 2-D view and each attention as
``If(nothing padded) then MultiHeadAttention else <the chain>``. Same inputs, outputs, axes and op counts as
the exported graph; the fp32 parity gate judges it against PyTorch as always.

Why: tracing is what a first export of a base pays for. Measured for issue 15 (session 13, one Xeon core,
MiniLM, ``export --quantize int8``): torch.onnx.export 5.5 s (torch.export 2.1 s, decompositions 2.4 s,
translation 0.4 s) and onnxruntime's optimizer 0.75 s of a 13.3 s first export; the graph cache
(graph_cache.py) only helps the next adapter of the same base. Anything the writer does not cover
(``unsupported_reason``) is traced as before, and ``--no-ort-fusions`` always traces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import UnsupportedError
from .fusions import MS_DOMAIN, contrib_op_counts, tune_for_cpu
from .onnx_export import BATCH_AXIS, OnnxArtifact, check_opset, save_written_graph
from .tasks import TaskSpec

SEQ = "sequence"
WRITTEN = ("bert", "roberta", "xlm-roberta")
# Position ids counted over the tokens that are not padding, after the padding index (create_position_ids_from_
# input_ids); BERT's are 0..S-1.
ROBERTA_POSITIONS = ("roberta", "xlm-roberta")
# transformers' additive mask for a padded key (finfo(float32).min, as the exported graph's Where writes it)
MASKED = float(np.finfo(np.float32).min)


def _core(model):
    return getattr(model, "base_model", model)


def unsupported_reason(model, task: TaskSpec) -> str | None:
    """Why ``model`` cannot be written here (None: it can); the exporter then traces it."""
    import torch

    cfg = model.config
    core = _core(model)
    if getattr(cfg, "model_type", None) not in WRITTEN:
        return f"model type {getattr(cfg, 'model_type', None)!r}, not one of {', '.join(WRITTEN)}"
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        return "a BERT decoder"
    if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        return f"position embeddings {cfg.position_embedding_type!r}, not absolute"
    if getattr(cfg, "hidden_act", None) != "gelu":
        return f"activation {getattr(cfg, 'hidden_act', None)!r}, not gelu"
    if getattr(cfg, "chunk_size_feed_forward", 0):
        return "chunked feed-forward"
    if not all(hasattr(core, a) for a in ("embeddings", "encoder")):
        return "not a BertModel (embeddings, encoder)"
    if cfg.hidden_size % cfg.num_attention_heads:
        return "hidden size not a multiple of the heads"
    # Every module the writer reads weights from must be what it reads them as: a wrapped layer (an unmerged LoRA
    # still has a .weight, its base's) or a custom one would lose what it adds.
    plain = (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.Embedding, torch.nn.Dropout, torch.nn.Tanh)
    odd = next((n for n, m in model.named_modules() if not list(m.children()) and not isinstance(m, plain)
                and type(m).__name__ != "GELUActivation"), None)
    if odd is not None:
        return f"module {odd} is a {type(model.get_submodule(odd)).__name__}, not a plain layer"
    if task.name == "text-classification":
        head = getattr(model, "classifier", None)
        if cfg.model_type in ROBERTA_POSITIONS:  # RobertaClassificationHead: dense, tanh, out_proj on <s>
            if not (_plain_linear(getattr(head, "dense", None)) and _plain_linear(getattr(head, "out_proj", None))):
                return "no dense + out_proj classification head"
        elif getattr(core, "pooler", None) is None or not _plain_linear(head):
            return "no pooler + linear classifier"
    elif task.name == "token-classification":
        if not _plain_linear(getattr(model, "classifier", None)):
            return "no linear classifier"
    elif task.name != "feature-extraction":
        return f"task {task.name!r}"
    return None


def _plain_linear(m) -> bool:
    import torch

    return isinstance(m, torch.nn.Linear)


def export_encoder_graph(model, task: TaskSpec, input_names: tuple[str, ...], pooling: dict | None, path: Path,
                         opset: int) -> tuple[OnnxArtifact, dict[str, int]]:
    """Write ``model`` (merged, float32, ``unsupported_reason`` None) at ``path``, tuned for onnxruntime; the
    artifact and the contrib op counts (as ``fusions.fuse_transformer`` returns them)."""
    from onnx import TensorProto, helper, numpy_helper

    check_opset(opset)
    if opset < 17:  # LayerNormalization
        raise UnsupportedError(f"the written encoder graph needs opset 17 or later, not {opset}")
    reason = unsupported_reason(model, task)
    if reason is not None:
        raise UnsupportedError(f"the written encoder graph does not cover this model: {reason}")
    cfg, core = model.config, _core(model)
    hidden, heads = int(cfg.hidden_size), int(cfg.num_attention_heads)
    head_dim = hidden // heads
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inits: list = []
    named: set[str] = set()
    nodes: list = []
    infos: dict[str, tuple[int, list]] = {}  # value -> (elem type, dims): what fusions.py's matchers read
    b, s = BATCH_AXIS, SEQ

    def init(name: str, array) -> str:
        if name not in named:  # constants are shared by name
            named.add(name)
            a = np.asarray(array)  # not ascontiguousarray: it makes a scalar 1-D (a Gather index must stay 0-D)
            inits.append(numpy_helper.from_array(a if a.flags.c_contiguous else a.copy(), name))
        return name

    def t(param) -> np.ndarray:
        return param.detach().float().numpy()

    def node(op: str, inputs: list[str], output: str, dims: list | None, elem: int = f32, **attrs) -> str:
        domain = MS_DOMAIN if op == "BiasGelu" else ""
        nodes.append(helper.make_node(op, inputs, [output], name=f"/{output}/{op}", domain=domain, **attrs))
        if dims is not None:
            infos[output] = (elem, dims)
        return output

    def linear(x: str, lin, scope: str, dims: list) -> str:
        """x @ W^T, then + b (the bias separate: BiasGelu, int8's bias fusion and the layer norms read it so)."""
        mm = node("MatMul", [x, init(f"{scope}.weight.T", t(lin.weight).T)], f"{scope}/MatMul_output", dims)
        if lin.bias is None:
            return mm
        return node("Add", [mm, init(f"{scope}.bias", t(lin.bias))], f"{scope}/Add_output", dims)

    def layer_norm(x: str, ln, scope: str) -> str:
        return node("LayerNormalization", [x, init(f"{scope}.weight", t(ln.weight)), init(f"{scope}.bias", t(ln.bias))],
                    f"{scope}/output", [b, s, hidden], axis=-1, epsilon=float(ln.eps))

    emb = core.embeddings
    words = node("Gather", [init("embeddings.word_embeddings.weight", t(emb.word_embeddings.weight)), "input_ids"],
                 "embeddings/words", [b, s, hidden], axis=0)
    table = t(emb.token_type_embeddings.weight)
    if "token_type_ids" in input_names:
        types = node("Gather", [init("embeddings.token_type_embeddings.weight", table), "token_type_ids"],
                     "embeddings/token_types", [b, s, hidden], axis=0)
    else:  # transformers adds the zero type's row (its token_type_ids buffer)
        types = init("embeddings.token_type_embeddings.row0", table[0])
    x = node("Add", [words, types], "embeddings/words_types", [b, s, hidden])
    init("const/zero", np.array(0, np.int64))
    if cfg.model_type in ROBERTA_POSITIONS:
        pad = init("const/padding_idx", np.array(int(emb.padding_idx), np.int64))
        is_pad = node("Equal", ["input_ids", pad], "embeddings/is_pad", [b, s], TensorProto.BOOL)
        kept = node("Not", [is_pad], "embeddings/not_pad", [b, s], TensorProto.BOOL)
        kept = node("Cast", [kept], "embeddings/not_pad_count", [b, s], i64, to=i64)
        counted = node("CumSum", [kept, init("const/one", np.array(1, np.int64))], "embeddings/counted", [b, s], i64)
        counted = node("Mul", [counted, kept], "embeddings/counted_kept", [b, s], i64)
        positions = node("Add", [counted, pad], "embeddings/positions", [b, s], i64)
        pos_dims = [b, s, hidden]
    else:
        ids_shape = node("Shape", ["input_ids"], "embeddings/ids_shape", [2], i64)
        seq_len = node("Gather", [ids_shape, init("const/one", np.array(1, np.int64))], "embeddings/seq_len", [],
                       i64, axis=0)
        positions = node("Range", ["const/zero", seq_len, "const/one"], "embeddings/positions", [s], i64)
        pos_dims = [s, hidden]
    pos = node("Gather", [init("embeddings.position_embeddings.weight", t(emb.position_embeddings.weight)), positions],
               "embeddings/positions_embedded", pos_dims, axis=0)
    x = node("Add", [x, pos], "embeddings/sum", [b, s, hidden])
    x = layer_norm(x, emb.LayerNorm, "embeddings.LayerNorm")

    # The additive padding mask [B, 1, 1, S]: 0 where a key is kept, finfo.min where it is padded.
    kept = node("Cast", ["attention_mask"], "mask/kept", [b, s], TensorProto.BOOL, to=TensorProto.BOOL)
    kept4 = node("Unsqueeze", [kept, init("const/axes12", np.array([1, 2], np.int64))], "mask/kept4", [b, 1, 1, s],
                 TensorProto.BOOL)
    mask = node("Where", [kept4, init("const/bias_kept", np.array(0.0, np.float32)),
                          init("const/bias_masked", np.array(MASKED, np.float32))], "mask/bias", [b, 1, 1, s])
    split_shape = init("const/split_heads", np.array([0, 0, heads, head_dim], np.int64))
    merge_shape = init("const/merge_heads", np.array([0, 0, hidden], np.int64))
    scale = init("const/attention_scale", np.array(head_dim ** -0.5, np.float32))

    for i, layer in enumerate(core.encoder.layer):
        p = f"encoder.layer.{i}"
        att = layer.attention.self
        split = {}
        for name, lin, perm in (("query", att.query, [0, 2, 1, 3]), ("key", att.key, [0, 2, 3, 1]),
                                ("value", att.value, [0, 2, 1, 3])):
            y = linear(x, lin, f"{p}.attention.self.{name}", [b, s, hidden])
            y = node("Reshape", [y, split_shape], f"{p}.attention.self.{name}/heads", [b, s, heads, head_dim])
            dims = [b, heads, s, head_dim] if perm[2] == 1 else [b, heads, head_dim, s]
            split[name] = node("Transpose", [y], f"{p}.attention.self.{name}/transposed", dims, perm=perm)
        a = f"{p}.attention.self"
        scores = node("MatMul", [split["query"], split["key"]], f"{a}/scores", [b, heads, s, s])
        scores = node("Mul", [scores, scale], f"{a}/scaled", [b, heads, s, s])
        scores = node("Add", [scores, mask], f"{a}/masked", [b, heads, s, s])
        probs = node("Softmax", [scores], f"{a}/probs", [b, heads, s, s], axis=-1)
        ctx = node("MatMul", [probs, split["value"]], f"{a}/context", [b, heads, s, head_dim])
        ctx = node("Transpose", [ctx], f"{a}/context_transposed", [b, s, heads, head_dim], perm=[0, 2, 1, 3])
        ctx = node("Reshape", [ctx, merge_shape], f"{a}/context_merged", [b, s, hidden])
        out = layer.attention.output
        y = linear(ctx, out.dense, f"{p}.attention.output.dense", [b, s, hidden])
        y = node("Add", [y, x], f"{p}.attention.output/residual", [b, s, hidden])
        x = layer_norm(y, out.LayerNorm, f"{p}.attention.output.LayerNorm")
        inner = layer.intermediate.dense
        width = int(inner.out_features)
        y = node("MatMul", [x, init(f"{p}.intermediate.dense.weight.T", t(inner.weight).T)],
                 f"{p}.intermediate.dense/MatMul_output", [b, s, width])
        y = node("BiasGelu", [y, init(f"{p}.intermediate.dense.bias", t(inner.bias))], f"{p}.intermediate/gelu",
                 [b, s, width])
        y = linear(y, layer.output.dense, f"{p}.output.dense", [b, s, hidden])
        y = node("Add", [y, x], f"{p}.output/residual", [b, s, hidden])
        x = layer_norm(y, layer.output.LayerNorm, f"{p}.output.LayerNorm")

    outputs: list[tuple[str, list]] = []
    if task.name == "text-classification":
        first = node("Gather", [x, "const/zero"], "pooler/first_token", [b, hidden], axis=1)
        roberta_head = cfg.model_type in ROBERTA_POSITIONS
        pooler = model.classifier.dense if roberta_head else core.pooler.dense
        pooled = node("Gemm", [first, init("pooler.dense.weight", t(pooler.weight)), init("pooler.dense.bias",
                                                                                         t(pooler.bias))],
                      "pooler/dense", [b, hidden], transB=1)
        pooled = node("Tanh", [pooled], "pooler/tanh", [b, hidden])
        cls = model.classifier.out_proj if roberta_head else model.classifier
        nodes.append(helper.make_node("Gemm", [pooled, init("classifier.weight", t(cls.weight)),
                                               init("classifier.bias", t(cls.bias))], ["logits"],
                                      name="/classifier/Gemm", transB=1))
        outputs.append(("logits", [b, int(cls.out_features)]))
    elif task.name == "token-classification":
        cls = model.classifier
        mm = node("MatMul", [x, init("classifier.weight.T", t(cls.weight).T)], "classifier/MatMul_output",
                  [b, s, int(cls.out_features)])
        nodes.append(helper.make_node("Add", [mm, init("classifier.bias", t(cls.bias))], ["logits"],
                                      name="/classifier/Add"))
        outputs.append(("logits", [b, s, int(cls.out_features)]))
    else:
        nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="/last_hidden_state/Identity"))
        outputs.append(("last_hidden_state", [b, s, hidden]))
        _pooling(node, init, nodes, helper, x, pooling or {}, opset, hidden)
        outputs.append(("sentence_embedding", [b, hidden]))

    inputs = [helper.make_tensor_value_info(n, i64, [b, s]) for n in input_names]
    graph = helper.make_graph(nodes, "encoder", inputs,
                              [helper.make_tensor_value_info(n, f32, dims) for n, dims in outputs], inits,
                              value_info=[helper.make_tensor_value_info(n, e, d) for n, (e, d) in infos.items()])
    # Tuned as fusions.py tunes an exported graph; the model is only a holder for its opset here.
    holder = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    tune_for_cpu(holder, fused_attention=True)
    art = save_written_graph(holder.graph, path, opset, tuple(input_names), tuple(n for n, _ in outputs))
    return art, contrib_op_counts(holder.graph)


def _pooling(node, init, nodes: list, helper, x: str, pooling: dict[str, Any], opset: int, hidden: int) -> None:
    """sentence_embedding as make_wrapper pools it: mean (masked), max (masked) or the first token; L2-normalised
    where the base's sentence-transformers modules say so."""
    from onnx import TensorProto

    b, s = BATCH_AXIS, SEQ

    def reduce(op: str, y: str, out: str, dims: list, axes: list[int], keepdims: int) -> str:
        if op == "ReduceSum" or opset >= 18:  # axes became an input (ReduceSum at 13, the others at 18)
            return node(op, [y, init(f"const/axes_{'_'.join(map(str, axes))}".replace("-", "m"),
                                     np.array(axes, np.int64))], out, dims, keepdims=keepdims)
        return node(op, [y], out, dims, axes=axes, keepdims=keepdims)

    mode = pooling.get("mode", "mean")
    keep = node("Unsqueeze", [node("Cast", ["attention_mask"], "pooling/mask", [b, s], to=TensorProto.FLOAT),
                              init("const/axes_last", np.array([-1], np.int64))], "pooling/mask3", [b, s, 1])
    if mode == "mean":
        total = reduce("ReduceSum", node("Mul", [x, keep], "pooling/masked", [b, s, hidden]), "pooling/sum",
                       [b, hidden], [1], 0)
        count = reduce("ReduceSum", keep, "pooling/count", [b, 1], [1], 0)
        count = node("Max", [count, init("const/min_count", np.array(1e-9, np.float32))], "pooling/count_clamped",
                     [b, 1])
        emb = node("Div", [total, count], "pooling/mean", [b, hidden])
    elif mode == "max":
        padded = node("Equal", [keep, init("const/zero_f", np.array(0.0, np.float32))], "pooling/padded", [b, s, 1],
                      TensorProto.BOOL)
        filled = node("Where", [padded, init("const/fill", np.array(-1e9, np.float32)), x], "pooling/filled",
                      [b, s, hidden])
        emb = reduce("ReduceMax", filled, "pooling/max", [b, hidden], [1], 0)
    else:
        emb = node("Gather", [x, "const/zero"], "pooling/first_token", [b, hidden], axis=1)
    if pooling.get("normalize"):
        norm = reduce("ReduceL2", emb, "pooling/norm", [b, 1], [-1], 1)
        norm = node("Max", [norm, init("const/norm_eps", np.array(1e-12, np.float32))], "pooling/norm_clamped", [b, 1])
        emb = node("Div", [emb, norm], "pooling/normalized", [b, hidden])
    nodes.append(helper.make_node("Identity", [emb], ["sentence_embedding"], name="/sentence_embedding/Identity"))
