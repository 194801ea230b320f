"""Causal-LM export with a KV cache: the wrapper whose flat inputs/outputs are optimum's names.

Inputs input_ids, attention_mask, position_ids, past_key_values.{i}.key/value; outputs logits and
present.{i}.key/value; dynamic batch, sequence, past and total-sequence axes, so the first step runs with a
past of length 0 and left-padded batches work.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np

from .generation import DecoderIO
from .onnx_export import (
    BATCH_AXIS,
    EXTERNAL_DATA_THRESHOLD,
    OnnxArtifact,
    check_opset,
    checked_artifact,
    parameter_bytes,
    torch_export,
)


def _cache_kwarg(model) -> str:
    # transformers renamed past_key_values to cache during 5.x; accept both.
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_out(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def decoder_io(model) -> DecoderIO:
    """Read the KV layout from one tiny forward pass: configs disagree on head counts, the cache does not."""
    import torch

    with torch.inference_mode():
        out = model(input_ids=torch.tensor([[1, 2]]), use_cache=True)
    layers = _cache_out(out).layers
    k = layers[0].keys
    uses_pos = "position_ids" in inspect.signature(model.forward).parameters
    return DecoderIO(len(layers), int(k.shape[1]), int(k.shape[3]), uses_pos)


def conv1d_to_linear(model) -> int:
    """GPT-2's Conv1D exports as Gemm, which MatMulNBits (int4) skips: swap in equivalent nn.Linear layers."""
    import torch
    from transformers.pytorch_utils import Conv1D

    swapped = 0
    for _, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, Conv1D):
                lin = torch.nn.Linear(child.weight.shape[0], child.weight.shape[1], bias=child.bias is not None)
                with torch.no_grad():
                    lin.weight.copy_(child.weight.T)
                    if child.bias is not None:
                        lin.bias.copy_(child.bias)
                setattr(mod, child_name, lin)
                swapped += 1
    return swapped


def make_decoder_wrapper(model, dio: DecoderIO):
    import torch
    from transformers import DynamicCache

    kwarg = _cache_kwarg(model)
    config = model.config

    class DecoderWrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, *rest):
            n_pos = 1 if dio.uses_position_ids else 0
            past = rest[n_pos:]
            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(dio.num_layers)],
                                 config=config)
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, kwarg: cache, "use_cache": True}
            if n_pos:
                kwargs["position_ids"] = rest[0]
            out = self.model(**kwargs)
            flat = []
            for layer in _cache_out(out).layers:
                flat += [layer.keys, layer.values]
            return (out.logits, *flat)

    return DecoderWrapper().eval()


def torch_step(wrapper, dio: DecoderIO):
    """A generation.Step over the PyTorch wrapper (numpy in, numpy out)."""
    import torch

    def step(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            out = wrapper(*[torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in dio.input_names])
        return {n: t.float().numpy() for n, t in zip(dio.output_names, out)}

    return step


def decoder_example(dio: DecoderIO) -> tuple[list, list]:
    """Example inputs for tracing (past of 4, 3 new tokens, batch 2) and their dynamic axes, in input order."""
    import torch

    batch, seq = 2, 3
    past_len = 4
    example = [torch.ones(batch, seq, dtype=torch.long), torch.ones(batch, past_len + seq, dtype=torch.long)]
    if dio.uses_position_ids:
        example.append(torch.arange(past_len, past_len + seq).expand(batch, seq).contiguous())
    example += [torch.zeros(batch, dio.num_kv_heads, past_len, dio.head_dim) for _ in dio.past_names]
    b, s = torch.export.Dim(BATCH_AXIS), torch.export.Dim("sequence")
    p, t = torch.export.Dim("past_sequence"), torch.export.Dim("total_sequence")
    shapes: list[Any] = [{0: b, 1: s}, {0: b, 1: t}]
    if dio.uses_position_ids:
        shapes.append({0: b, 1: s})
    shapes += [{0: b, 2: p} for _ in dio.past_names]
    return example, shapes


def export_decoder(wrapper, dio: DecoderIO, path: Path, opset: int) -> OnnxArtifact:
    """TorchScript-trace the KV-cache wrapper to ONNX with dynamic batch, sequence and past axes.

    The tracing exporter, not dynamo: on SmolLM2-135M (30 layers) dynamo took 175 s and this 18 s, with the
    same parity (SmolLM2 step logits within 1e-4 of torch, seven tiny architectures within 4e-7, greedy tokens
    identical, left padding and an empty past included). The graph is then re-saved once: a tied lm_head shares the
    embedding table again (the tracer writes a transposed copy, +20% file size), node metadata is dropped,
    and weights go to one external data file when they pass protobuf's 2 GiB.
    """
    import shutil

    import onnx
    import torch

    check_opset(opset)
    example, _ = decoder_example(dio)
    b = BATCH_AXIS
    axes: dict[str, dict[int, str]] = {"input_ids": {0: b, 1: "sequence"}, "attention_mask": {0: b, 1: "total_sequence"},
                                       "position_ids": {0: b, 1: "sequence"}, "logits": {0: b, 1: "sequence"}}
    axes.update({n: {0: b, 2: "past_sequence"} for n in dio.past_names})
    axes.update({n: {0: b, 2: "total_sequence"} for n in dio.present_names})
    names = set(dio.input_names) | set(dio.output_names)
    traced = path.parent / ".trace"
    traced.mkdir()
    try:
        with torch.no_grad():  # the TorchScript tracer records no autograd state
            torch_export(wrapper, tuple(example), traced / "model.onnx", input_names=list(dio.input_names),
                         output_names=list(dio.output_names), opset_version=opset, dynamo=False,
                         dynamic_axes={k: v for k, v in axes.items() if k in names}, do_constant_folding=True)
        model = onnx.load(str(traced / "model.onnx"))
        retie_embeddings(model)
        for node in model.graph.node:
            del node.metadata_props[:]
        if parameter_bytes(wrapper) > EXTERNAL_DATA_THRESHOLD:
            onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=path.name + ".data")
        else:
            onnx.save(model, str(path))
    finally:
        shutil.rmtree(traced, ignore_errors=True)
    return checked_artifact(path, opset, dio.input_names, dio.output_names)


def retie_embeddings(model) -> int:
    """A MatMul weight that equals a Gather table transposed (a tied lm_head) becomes Transpose(table)."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    tables = {}
    for node in g.node:
        t = inits.get(node.input[0]) if node.op_type == "Gather" and node.input else None
        if t is not None and len(t.dims) == 2:
            tables[node.input[0]] = t
    if not tables:
        return 0
    arrays = {name: numpy_helper.to_array(t) for name, t in tables.items()}
    tied: dict[str, str] = {}
    for node in g.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if w is None or w.name in tied or len(w.dims) != 2:
            continue
        for name, t in tables.items():
            if list(w.dims) == list(t.dims)[::-1] and np.array_equal(numpy_helper.to_array(w), arrays[name].T):
                tied[w.name] = name
                break
    if not tied:
        return 0
    nodes = [helper.make_node("Transpose", [table], [copy], perm=[1, 0], name=f"{copy}_tied")
             for copy, table in tied.items()]
    rest = [n for n in g.node]
    del g.node[:]
    g.node.extend(nodes + rest)
    keep = [t for t in g.initializer if t.name not in tied]
    del g.initializer[:]
    g.initializer.extend(keep)
    return len(tied)
