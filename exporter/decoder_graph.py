"""A decoder graph written from the merged model's weights, with onnxruntime's fused decoder ops (build side).

For Llama-family models (``tasks.DecoderArchSpec.fused_graph``): per layer SkipSimplifiedLayerNormalization,
the q/k/v/o and MLP MatMuls, RotaryEmbedding on q and k, and one GroupQueryAttention that appends the step to
the KV cache; the same inputs and outputs as the traced graph (``decoder.py``), so left-padded batches, the
runtime and every consumer work unchanged.

Why: the traced graph of SmolLM2-135M has ~8100 nodes (3744 after onnxruntime's own optimizations), most of them
the tracer's shape arithmetic, rotary, repeat_kv, masks and KV concats around 30 attentions. Measured for issue 15
(one thread of an AVX-512 Xeon, onnxruntime 1.32, decode step at context 128, torch eager 63-69 ms): the traced
graph's int4 takes 21.7-24.6 ms (0.34-0.36x torch); onnxruntime-genai's builder graph, 343 nodes, 12.6-13.3 ms
with its own int4 and 15.9-16.9 ms with this project's int4 weights (block minimum kept, lm_head 8-bit).

Left padding: GroupQueryAttention alone treats a batch as right-padded (seqlens_k) and rotates by its own
positions; measured on a left-padded batch, the padded row's logits were off by 29 at prefill and 7-10 at decode.
So rotary runs outside it (RotaryEmbedding on ``position_ids``), every row's ``seqlens_k`` is the full length, and
the causal and padding mask goes in as ``attention_bias`` (the traced graph's semantics): the same left-padded
prefill and three decode steps then matched the traced graph within 8e-5.

Two limits the traced graph does not have, both outside what ``generate``, optimum, transformers.js and
onnxruntime-genai do with a bundle (a prefill, then one token per step): GroupQueryAttention refuses a step of
several tokens onto a past with batch > 1 ("batch_size must be 1 when sequence_length > 1 and past context is
given"), and positions past the rotary table (max_position_embeddings, the manifest's context_length) fail
rather than extrapolate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import UnsupportedError
from .fusions import MS_DOMAIN
from .generation import DecoderIO
from .onnx_export import OnnxArtifact, check_opset, save_written_graph

# GroupQueryAttention's attention_bias input: onnxruntime 1.20.1 refuses the graph. 1.22.0 and 1.24.4 run it and
# match the traced graph within 2.1e-4 on SmolLM2's logits (1.32.0: 6.5e-5), left-padded prefill and three
# decode steps (issue 15, session 12); 1.21 was not tried.
MIN_ONNXRUNTIME = "1.22"
# Rotary types whose cos/sin depend on the position alone (modeling_rope_utils), so one table covers them.
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def unsupported_reason(model) -> str | None:
    """Why ``model`` cannot be written as the fused graph (None: it can); the exporter then traces it."""
    cfg = model.config
    core = getattr(model, "model", None)
    if core is None or not all(hasattr(core, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "not a Llama-style model (embed_tokens, layers, norm, rotary_emb)"
    if getattr(cfg, "hidden_act", None) != "silu":
        return f"activation {getattr(cfg, 'hidden_act', None)!r}, not silu"
    if getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True):
        return "sliding-window attention"
    rope = getattr(core.rotary_emb, "rope_type", "default")
    if rope not in STATIC_ROPE:
        # dynamic, longrope...: transformers recomputes their frequencies from the sequence length, which one
        # table for every position cannot follow (longrope measured 0.085 off on a 16-position original context).
        return f"rotary scaling {rope!r} (only {', '.join(STATIC_ROPE)} have one table for every position)"
    lm_head = getattr(model, "lm_head", None)
    if lm_head is None or getattr(lm_head, "bias", None) is not None:
        return "no plain lm_head"
    for layer in core.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return "attention without q_proj/k_proj/v_proj/o_proj"
        if not all(hasattr(mlp, p) and getattr(mlp, p).bias is None for p in ("gate_proj", "up_proj", "down_proj")):
            return "an MLP without bias-free gate_proj/up_proj/down_proj"
        if any(hasattr(attn, n) for n in ("q_norm", "k_norm")) or not hasattr(attn, "scaling"):
            return "q/k norms or no attention scaling"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if not hasattr(norm, "variance_epsilon") or getattr(norm, "bias", None) is not None:
                return "a layer norm that is not RMSNorm"
    return None


def export_fused_decoder(model, dio: DecoderIO, path: Path, opset: int) -> OnnxArtifact:
    """Write ``model`` (merged, float32, ``unsupported_reason`` None) as the fused graph at ``path``."""
    import torch
    from onnx import TensorProto, helper, numpy_helper

    check_opset(opset)
    reason = unsupported_reason(model)
    if reason is not None:
        raise UnsupportedError(f"the fused decoder graph does not cover this model: {reason}")
    cfg, core = model.config, model.model
    heads, kv_heads, head_dim = cfg.num_attention_heads, dio.num_kv_heads, dio.head_dim
    inits: list = []
    nodes: list = []

    def init(name: str, array) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def weight(linear, name: str) -> str:  # MatMul's [in, out] layout, what weightonly.py quantizes
        return init(name, linear.weight.detach().float().numpy().T)

    def node(op: str, inputs: list[str], outputs: list[str], name: str, **attrs):
        domain = MS_DOMAIN if op in ("SkipSimplifiedLayerNormalization", "RotaryEmbedding",
                                     "GroupQueryAttention") else ""
        nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs[0]

    def linears(x: str, modules: list, parent: str, names: list[str]) -> list[str]:
        """Projections of one input as one MatMul (and a Split where there are several): one MatMulNBits (and one
        block-minimum correction) instead of several, each a fixed cost per decode step. Named like the traced
        graph's nodes, the parts joined by "+" (".../self_attn/q_proj+k_proj+v_proj/MatMul"): weightonly.py keeps
        the adapter's modules at 8 bits by these names."""
        scope = f"{parent}/{'+'.join(names)}"
        w = np.concatenate([m.weight.detach().float().numpy().T for m in modules], axis=1)
        y = node("MatMul", [x, init(f"{scope}.weight", w)], [f"/{scope}/MatMul_output_0"], f"/{scope}/MatMul")
        if any(m.bias is not None for m in modules):
            b = np.concatenate([(m.bias.detach().float().numpy() if m.bias is not None else np.zeros(m.out_features,
                                                                                                   np.float32))
                                for m in modules])
            y = node("Add", [y, init(f"{scope}.bias", b)], [f"/{scope}/Add_output_0"], f"/{scope}/Add")
        if len(modules) == 1:
            return [y]
        sizes = init(f"{scope}.split", np.array([m.out_features for m in modules], np.int64))
        outs = [f"/{parent}/{n}/output_0" for n in names]
        node("Split", [y, sizes], outs, f"/{scope}/Split", axis=-1)
        return outs

    # Rotary tables for every position the model takes, from the model's own rotary module (its rope scaling).
    positions = int(cfg.max_position_embeddings)
    with torch.inference_mode():
        probe = torch.zeros(1, 1, head_dim)
        cos, sin = core.rotary_emb(probe, torch.arange(positions).unsqueeze(0))
    half = head_dim // 2
    cos_cache = init("cos_cache", cos[0, :, :half].float().numpy())
    sin_cache = init("sin_cache", sin[0, :, :half].float().numpy())

    # Once per step: the causal + padding mask as an additive bias [B, 1, S, T], and every row's full length.
    i64 = TensorProto.INT64
    consts = {"zero": np.array(0, np.int64), "one": np.array(1, np.int64), "axis0": np.array([0], np.int64),
              "axis1": np.array([1], np.int64), "axes12": np.array([1, 2], np.int64),
              "bias_ok": np.array(0.0, np.float32), "bias_masked": np.array(np.finfo(np.float32).min, np.float32)}
    for k, v in consts.items():
        init(f"mask/{k}", v)
    m = "mask/"
    node("Shape", ["attention_mask"], [m + "mask_shape"], m + "MaskShape")
    node("Shape", ["input_ids"], [m + "ids_shape"], m + "IdsShape")
    node("Gather", [m + "mask_shape", m + "one"], [m + "total"], m + "Total", axis=0)
    node("Gather", [m + "ids_shape", m + "one"], [m + "seq"], m + "Seq", axis=0)
    node("Gather", [m + "ids_shape", m + "axis0"], [m + "batch"], m + "Batch", axis=0)
    node("Sub", [m + "total", m + "seq"], [m + "past"], m + "Past")
    node("Range", [m + "zero", m + "total", m + "one"], [m + "key_pos"], m + "KeyPos")
    node("Range", [m + "past", m + "total", m + "one"], [m + "query_pos"], m + "QueryPos")
    node("Unsqueeze", [m + "query_pos", m + "axis1"], [m + "query_col"], m + "QueryCol")
    node("LessOrEqual", [m + "key_pos", m + "query_col"], [m + "causal"], m + "Causal")  # [S, T]
    node("Cast", ["attention_mask"], [m + "kept"], m + "Kept", to=TensorProto.BOOL)
    node("Unsqueeze", [m + "kept", m + "axes12"], [m + "kept4"], m + "Kept4")  # [B, 1, 1, T]
    node("And", [m + "causal", m + "kept4"], [m + "allowed"], m + "Allowed")  # [B, 1, S, T]
    node("Where", [m + "allowed", m + "bias_ok", m + "bias_masked"], [m + "attention_bias"], m + "Bias")
    node("Sub", [m + "total", m + "one"], [m + "last"], m + "Last")
    node("Expand", [m + "last", m + "batch"], [m + "last_b"], m + "LastPerRow")
    node("Cast", [m + "last_b"], [m + "seqlens_k"], m + "SeqlensK", to=TensorProto.INT32)
    node("Cast", [m + "total"], [m + "total_i32"], m + "TotalI32", to=TensorProto.INT32)

    embed = core.embed_tokens.weight.detach().float().numpy()
    table = init("model.embed_tokens.weight", embed)
    hidden = node("Gather", [table, "input_ids"], ["/model/embed_tokens/Gather_output_0"], "/model/embed_tokens/Gather")
    residual = None
    for li, layer in enumerate(core.layers):
        s = f"model/layers.{li}"
        attn, mlp = layer.self_attn, layer.mlp
        ln_in = init(f"{s}.input_layernorm.weight", layer.input_layernorm.weight.detach().float().numpy())
        eps = float(layer.input_layernorm.variance_epsilon)
        if residual is None:  # no residual to add yet: RMSNorm in standard ops (SimplifiedLayerNormalization
            # is onnxruntime's op in the default domain, which onnx.checker refuses); once per step
            x = _rms_norm(node, init, hidden, ln_in, eps, f"/{s}/input_layernorm", opset)
            residual = hidden
        else:
            x = node("SkipSimplifiedLayerNormalization", [hidden, residual, ln_in],
                     [f"/{s}/input_layernorm/output_0", "", "", f"/{s}/input_layernorm/sum"],
                     f"/{s}/input_layernorm", epsilon=eps)
            residual = f"/{s}/input_layernorm/sum"
        q, k, v = linears(x, [attn.q_proj, attn.k_proj, attn.v_proj], f"{s}/self_attn", ["q_proj", "k_proj", "v_proj"])
        q = node("RotaryEmbedding", [q, "position_ids", cos_cache, sin_cache], [f"/{s}/self_attn/q_rotary"],
                 f"/{s}/self_attn/q_rotary", num_heads=heads, interleaved=0)
        k = node("RotaryEmbedding", [k, "position_ids", cos_cache, sin_cache], [f"/{s}/self_attn/k_rotary"],
                 f"/{s}/self_attn/k_rotary", num_heads=kv_heads, interleaved=0)
        a = node("GroupQueryAttention",
                 [q, k, v, dio.past_names[2 * li], dio.past_names[2 * li + 1], m + "seqlens_k", m + "total_i32",
                  "", "", "", m + "attention_bias"],
                 [f"/{s}/self_attn/attention", dio.present_names[2 * li], dio.present_names[2 * li + 1]],
                 f"/{s}/self_attn/GroupQueryAttention", num_heads=heads, kv_num_heads=kv_heads,
                 scale=float(attn.scaling), do_rotary=0)
        (o,) = linears(a, [attn.o_proj], f"{s}/self_attn", ["o_proj"])
        ln_post = init(f"{s}.post_attention_layernorm.weight",
                       layer.post_attention_layernorm.weight.detach().float().numpy())
        x = node("SkipSimplifiedLayerNormalization", [o, residual, ln_post],
                 [f"/{s}/post_attention_layernorm/output_0", "", "", f"/{s}/post_attention_layernorm/sum"],
                 f"/{s}/post_attention_layernorm", epsilon=float(layer.post_attention_layernorm.variance_epsilon))
        residual = f"/{s}/post_attention_layernorm/sum"
        gate, up = linears(x, [mlp.gate_proj, mlp.up_proj], f"{s}/mlp", ["gate_proj", "up_proj"])
        sig = node("Sigmoid", [gate], [f"/{s}/mlp/act_fn/Sigmoid_output_0"], f"/{s}/mlp/act_fn/Sigmoid")
        act = node("Mul", [gate, sig], [f"/{s}/mlp/act_fn/Mul_output_0"], f"/{s}/mlp/act_fn/Mul")
        prod = node("Mul", [act, up], [f"/{s}/mlp/Mul_output_0"], f"/{s}/mlp/Mul")
        (hidden,) = linears(prod, [mlp.down_proj], f"{s}/mlp", ["down_proj"])
    norm_w = init("model.norm.weight", core.norm.weight.detach().float().numpy())
    final = node("SkipSimplifiedLayerNormalization", [hidden, residual, norm_w], ["/model/norm/output_0"],
                 "/model/norm", epsilon=float(core.norm.variance_epsilon))
    if model.lm_head.weight.data_ptr() == core.embed_tokens.weight.data_ptr():
        # Tied: x @ table^T, the form weightonly.py quantizes on the embedding's own packed data.
        head = node("Transpose", [table], ["/lm_head/tied_weight"], "/lm_head/Transpose", perm=[1, 0])
    else:
        head = weight(model.lm_head, "lm_head.weight")
    node("MatMul", [final, head], ["logits"], "/lm_head/MatMul")

    b = "batch_size"
    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("input_ids", i64, [b, "sequence"]),
              helper.make_tensor_value_info("attention_mask", i64, [b, "total_sequence"]),
              helper.make_tensor_value_info("position_ids", i64, [b, "sequence"])]
    inputs += [helper.make_tensor_value_info(n, f32, [b, kv_heads, "past_sequence", head_dim]) for n in dio.past_names]
    outputs = [helper.make_tensor_value_info("logits", f32, [b, "sequence", int(model.lm_head.out_features)])]
    outputs += [helper.make_tensor_value_info(n, f32, [b, kv_heads, "total_sequence", head_dim])
                for n in dio.present_names]
    graph = helper.make_graph(nodes, "decoder", inputs, outputs, inits)
    return save_written_graph(graph, path, opset, dio.input_names, dio.output_names)


def _rms_norm(node, init, x: str, w: str, eps: float, scope: str, opset: int) -> str:
    """x / sqrt(mean(x^2) + eps) * w over the last axis, in default-domain ops."""
    eps_c = init(f"{scope}/eps", np.array(eps, np.float32))
    sq = node("Mul", [x, x], [f"{scope}/square"], f"{scope}/Square")
    if opset >= 18:  # ReduceMean's axes became an input
        ms = node("ReduceMean", [sq, init(f"{scope}/axes", np.array([-1], np.int64))], [f"{scope}/mean_square"],
                  f"{scope}/ReduceMean", keepdims=1)
    else:
        ms = node("ReduceMean", [sq], [f"{scope}/mean_square"], f"{scope}/ReduceMean", axes=[-1], keepdims=1)
    ve = node("Add", [ms, eps_c], [f"{scope}/var_eps"], f"{scope}/AddEps")
    sd = node("Sqrt", [ve], [f"{scope}/rms"], f"{scope}/Sqrt")
    inv = node("Reciprocal", [sd], [f"{scope}/inv_rms"], f"{scope}/Reciprocal")
    n = node("Mul", [x, inv], [f"{scope}/normed"], f"{scope}/Normalize")
    return node("Mul", [n, w], [f"{scope}/output_0"], f"{scope}/Scale")
