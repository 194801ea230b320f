"""Weight-only quantization of decoder graphs (MatMulNBits / GatherBlockQuantized), numpy and onnx only.

Why weight-only for decoders, measured on SmolLM2-135M + LoRA (x86 AVX2 without VNNI, onnxruntime 1.32):
- dynamic int8 (``quantize_dynamic``) quantizes activations per tensor. A decoder's activations have outliers,
  and the u8s8 kernels of CPUs without VNNI saturate in int16 (vpmaddubsw): top-1 agreement 0.00, mean KL 12.8.
  Its numbers also changed with the batch a text ran in.
- 8-bit weights with activations quantized per row and block inside MatMulNBits (accuracy_level 4): mean KL
  0.005, top-1 1.00 on clear-margin positions, decode 31 ms/token vs 41 ms fp32. The same weights with float
  compute (accuracy_level 0) decode at 296 ms/token: onnxruntime has no fast kernel for that.
- 4-bit round-to-nearest with a symmetric or an integer zero point: mean KL 0.49-0.66. A block minimum kept
  in float (``W ~= q * scale + min``, what GGUF's Q4_1 and HQQ do) gives 0.007. onnxruntime's float zero
  points run on a slow path (161 ms/token), so the minimum is applied as a correction: MatMulNBits with the
  default zero point plus ``(A @ S) @ C``, where S sums A per block and C holds ``min + 8 * scale`` per block
  and column (26 ms/token vs 22 ms for the symmetric form).
The integer arithmetic here cannot saturate on any ISA: weights stay within +-127 (8-bit) or 0..15 (4-bit)
and activations within +-127, so every int8 kernel (AVX2, AVX-512 VNNI, NEON dot) computes the same integers;
tests/test_quant_numerics.py checks onnxruntime against an exact integer emulation. x86 CPUs without AVX2 have
no int8 kernel for MatMulNBits and use float activations instead (measured under qemu -cpu Nehalem).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ExporterError

MS_DOMAIN = "com.microsoft"
# int8 compute inside MatMulNBits: activations quantized to int8 per row and block of K.
ACCURACY_LEVEL = 4
INT8_BLOCK = 32


@dataclass(frozen=True)
class WeightOnlySpec:
    bits: int  # 8 or 4 for the body's MatMuls
    block_size: int
    embedding_bits: int = 8  # token embeddings and the output projection (lm_head)
    # Modules kept at 8 bits in a 4-bit variant, by name (q_proj, matched against the exporter's scoped node
    # names, "/model/model/layers.0/self_attn/q_proj/MatMul"): the ones a merged adapter changed. A LoRA delta
    # is small next to the weights, often below a 4-bit block's step, so rounding the merged weights to 4 bits
    # erases part of the fine-tune. Measured, SmolLM2 + the smollm2-sft recipe's adapter (q/v, r=8): mean KL
    # 0.397 with every module at 4 bits, 0.0039 with q/v at 8 (+5 MB, 0.22x fp32 instead of 0.21x).
    keep_8bit: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Packed:
    """A token embedding table, quantized once (GatherBlockQuantized layout) and shared with a tied lm_head."""

    data: str  # (V, H * bits / 8) uint8
    scales: str  # (V, H / block) float
    vocab: int
    hidden: int
    block: int


@dataclass
class _Stats:
    matmuls: int = 0
    embeddings: int = 0
    tied_heads: int = 0
    kept_float: list[str] = field(default_factory=list)


def _blocks(w: np.ndarray, bs: int) -> np.ndarray:
    """(K, N) -> (N, k_blocks, bs), zero-padded along K: MatMulNBits' layout of B."""
    k, n = w.shape
    kb = -(-k // bs)
    padded = np.zeros((kb * bs, n), np.float32)
    padded[:k] = w
    return padded.reshape(kb, bs, n).transpose(2, 0, 1)


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes (..., bs) -> MatMulNBits blobs: 4-bit codes two per byte, low nibble first."""
    if bits == 8:
        return np.ascontiguousarray(q, dtype=np.uint8)
    return np.ascontiguousarray(q[..., 0::2] | (q[..., 1::2] << 4), dtype=np.uint8)


def quantize_symmetric(wb: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Blocks (..., bs) -> codes with the default zero point 2^(bits-1), and one scale per block.

    Codes stay within +-(2^(bits-1) - 1) of the zero point, so no integer kernel can overflow.
    """
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(wb).max(axis=-1) / qmax
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(wb / scale[..., None]), -qmax, qmax) + 2 ** (bits - 1)
    return q.astype(np.uint8), scale


def quantize_min_offset(wb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4-bit blocks with a float minimum: codes 0..15, scales, and the offset ``min + 8 * scale`` per block."""
    lo, hi = wb.min(axis=-1), wb.max(axis=-1)
    scale = ((hi - lo) / 15.0).astype(np.float32)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint((wb - lo[..., None]) / scale[..., None]), 0, 15).astype(np.uint8)
    return q, scale, (lo + 8 * scale).astype(np.float32)


class _Graph:
    def __init__(self, model) -> None:
        from onnx import numpy_helper

        self.model = model
        self.g = model.graph
        self.inits = {i.name: i for i in self.g.initializer}
        self.to_array = numpy_helper.to_array
        self.from_array = numpy_helper.from_array
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.added: list = []
        self.dropped: set[str] = set()
        self.names: set[str] = set(self.inits) | {n.name for n in self.g.node} | set(self.producer)
        self._arrays: dict[str, np.ndarray] = {}

    def unique(self, base: str) -> str:
        name, i = base, 0
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name

    def float_init(self, name: str, rank: int, keep: bool = False) -> np.ndarray | None:
        """A float32 initializer of this rank as an array; ``keep`` caches it (embedding tables are read again)."""
        from onnx import TensorProto

        t = self.inits.get(name)
        if t is None or len(t.dims) != rank or t.data_type != TensorProto.FLOAT:
            return None
        if name in self._arrays:
            return self._arrays[name]
        array = self.to_array(t)
        if keep:
            self._arrays[name] = array
        return array

    def add_init(self, array: np.ndarray, base: str) -> str:
        name = self.unique(base)
        self.added.append(self.from_array(array, name))
        return name


def quantize_weights(src: Path, dst: Path, spec: WeightOnlySpec, external: bool) -> dict[str, int]:
    """Quantize ``src``'s MatMul weights and token embeddings into ``dst``; returns what was quantized."""
    import onnx
    from onnx import helper

    model = onnx.load(str(src))
    g = _Graph(model)
    stats = _Stats()
    replaced: dict[int, list] = {}  # node index -> the nodes that replace it, in order
    embeddings: dict[str, _Packed] = {}  # float table -> its packed copy

    # Token embeddings: GatherBlockQuantized on a packed (V, H*bits/8) table with (V, k_blocks) scales.
    for node in g.g.node:
        if node.op_type != "Gather" or node.input[0] in embeddings:
            continue
        table = g.float_init(node.input[0], 2, keep=True)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if table is None or axis != 0:
            continue
        v, h = table.shape
        bs = _embedding_block(h, spec.block_size)
        if bs is None:
            stats.kept_float.append(node.input[0])
            continue
        q, scale = quantize_symmetric(table.reshape(v, h // bs, bs), spec.embedding_bits)
        data = g.add_init(_pack(q, spec.embedding_bits).reshape(v, -1), node.input[0] + "_q")
        embeddings[node.input[0]] = _Packed(data, g.add_init(scale, node.input[0] + "_scales"), v, h, bs)
        stats.embeddings += 1
    for idx, node in enumerate(g.g.node):
        if node.op_type == "Gather" and node.input[0] in embeddings:
            e = embeddings[node.input[0]]
            replaced[idx] = [helper.make_node(
                "GatherBlockQuantized", [e.data, node.input[1], e.scales], list(node.output), name=node.name + "_q",
                domain=MS_DOMAIN, bits=spec.embedding_bits, block_size=e.block, gather_axis=0, quantize_axis=1)]

    for idx, node in enumerate(g.g.node):
        if node.op_type != "MatMul":
            continue
        tied = _tied_table(g, node, embeddings)
        if tied is not None:
            replaced[idx] = _tied_head(g, node, embeddings[tied], spec.embedding_bits)
            stats.tied_heads += 1
            continue
        w = g.float_init(node.input[1], 2)
        if w is None:
            continue  # activations x activations (attention), or a swappable adapter's LoRA input
        # The output projection keeps the embeddings' precision: SmolLM2 with a 4-bit embedding and lm_head
        # measured mean KL 0.134 against 0.008 with both at 8 bits.
        bits = spec.embedding_bits if node.output[0] == "logits" else spec.bits
        if bits < 8 and _names_a_module(node.name, spec.keep_8bit):
            bits = 8
        replaced[idx] = _matmul(g, node, w, bits, spec.block_size if bits == spec.bits else INT8_BLOCK)
        stats.matmuls += 1
    if not stats.matmuls:
        raise ExporterError(f"{src.name}: no MatMul weight could be quantized (block size {spec.block_size})")

    nodes = _live([n for idx, node in enumerate(g.g.node) for n in replaced.get(idx, [node])],
                  {o.name for o in g.g.output})
    used = {i for n in nodes for i in n.input}
    keep = [t for t in g.g.initializer if t.name in used]
    del g.g.node[:]
    g.g.node.extend(nodes)
    del g.g.initializer[:]
    g.g.initializer.extend(keep + [t for t in g.added if t.name in used])
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    if external:
        onnx.save(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=dst.name + ".data")
    else:
        onnx.save(model, str(dst))
    return {"matmuls": stats.matmuls, "embeddings": stats.embeddings, "tied_heads": stats.tied_heads,
            "kept_float": len(stats.kept_float)}


def _names_a_module(node_name: str, modules: tuple[str, ...]) -> bool:
    """Whether a node's scope names one of ``modules``: a path segment equal to it, or a packed projection's
    segment listing it among parts joined by "+" (decoder_graph.py: ".../q_proj+k_proj+v_proj/MatMul")."""
    parts = {p for seg in node_name.split("/") for p in seg.split("+")}
    return any(m in parts for m in modules)


def _live(nodes: list, outputs: set[str]) -> list:
    """Drop nodes nothing reads any more (the Transpose of a tied table whose MatMul was replaced)."""
    needed = set(outputs)
    keep = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
    return keep[::-1]


def _embedding_block(h: int, block_size: int) -> int | None:
    """GatherBlockQuantized needs whole blocks along the hidden axis: the largest power of two <= block_size."""
    bs = block_size
    while bs >= 16:
        if h % bs == 0:
            return bs
        bs //= 2
    return None


def _tied_table(g: _Graph, node, embeddings: dict) -> str | None:
    """The embedding table this MatMul multiplies by, transposed (tied input and output embeddings)."""
    # Both exporters' graphs reach here as MatMul(x, Transpose(table)): decoder.retie_embeddings turns the
    # tracer's transposed copy back into that form.
    src = g.producer.get(node.input[1])
    if src is not None and src.op_type == "Transpose" and src.input[0] in embeddings:
        perm = next((list(a.ints) for a in src.attribute if a.name == "perm"), [1, 0])
        return src.input[0] if perm == [1, 0] else None
    return None


def _tied_head(g: _Graph, node, e: _Packed, bits: int) -> list:
    """lm_head = x @ E^T on the embedding's own packed data: one copy of the table serves both ops."""
    from onnx import helper

    shape = g.add_init(np.array([e.vocab, e.hidden // e.block, e.block * bits // 8], np.int64), e.data + "_shape")
    blob = g.unique(e.data + "_blobs")
    return [
        helper.make_node("Reshape", [e.data, shape], [blob], name=node.name + "_blobs"),
        helper.make_node("MatMulNBits", [node.input[0], blob, e.scales], list(node.output), name=node.name + "_q",
                         domain=MS_DOMAIN, K=e.hidden, N=e.vocab, bits=bits, block_size=e.block,
                         accuracy_level=ACCURACY_LEVEL),
    ]


def _matmul(g: _Graph, node, w: np.ndarray, bits: int, bs: int) -> list:
    from onnx import helper

    k, n = w.shape
    wb = _blocks(w.astype(np.float32), bs)
    name = node.input[1]
    out = node.output[0]
    if bits == 8:
        q, scale = quantize_symmetric(wb, 8)
        offset = None
    else:
        q, scale, offset = quantize_min_offset(wb)
    b = g.add_init(_pack(q, bits), name + f"_q{bits}")
    s = g.add_init(scale.reshape(-1), name + "_scales")
    main = out if offset is None else g.unique(out + "_nbits")
    nodes = [helper.make_node("MatMulNBits", [node.input[0], b, s], [main], name=node.name + "_q", domain=MS_DOMAIN,
                              K=k, N=n, bits=bits, block_size=bs, accuracy_level=ACCURACY_LEVEL)]
    if offset is not None:
        # (A @ S) sums A over each block of K; times C = min + 8 * scale, it adds back each block's minimum.
        kb = offset.shape[1]
        sum_name = f"blocksum_K{k}_B{bs}"
        if sum_name not in g.names:
            s_mat = np.zeros((k, kb), np.float32)
            s_mat[np.arange(k), np.arange(k) // bs] = 1.0
            g.names.add(sum_name)
            g.added.append(g.from_array(s_mat, sum_name))
        c = g.add_init(np.ascontiguousarray(offset.T), name + "_min")
        sums, corr = g.unique(out + "_blocksum"), g.unique(out + "_min")
        nodes += [helper.make_node("MatMul", [node.input[0], sum_name], [sums], name=node.name + "_blocksum"),
                  helper.make_node("MatMul", [sums, c], [corr], name=node.name + "_min"),
                  helper.make_node("Add", [main, corr], [out], name=node.name + "_add")]
    return nodes
