"""Causal-LM export with a KV cache: the wrapper whose flat inputs/outputs are optimum's names.

Inputs input_ids, attention_mask, position_ids, past_key_values.{i}.key/value; outputs logits and
present.{i}.key/value; dynamic batch, sequence, past and total-sequence axes, so the first step runs with a
past of length 0 and left-padded batches work.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ExporterError
from .export import EXTERNAL_DATA_THRESHOLD, MIN_ORT_FOR_OPSET, OnnxArtifact
from .generation import DecoderIO


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
    b, s = torch.export.Dim("batch"), torch.export.Dim("sequence")
    p, t = torch.export.Dim("past_sequence"), torch.export.Dim("total_sequence")
    shapes: list[Any] = [{0: b, 1: s}, {0: b, 1: t}]
    if dio.uses_position_ids:
        shapes.append({0: b, 1: s})
    shapes += [{0: b, 2: p} for _ in dio.past_names]
    return example, shapes


def export_decoder(wrapper, dio: DecoderIO, path: Path, opset: int) -> OnnxArtifact:
    import onnx
    import torch

    example, shapes = decoder_example(dio)
    n_bytes = sum(x.numel() * x.element_size() for x in wrapper.parameters())
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                wrapper, tuple(example), str(path), input_names=list(dio.input_names),
                output_names=list(dio.output_names), opset_version=opset, dynamo=True,
                dynamic_shapes={"input_ids": shapes[0], "attention_mask": shapes[1], "rest": tuple(shapes[2:])},
                external_data=n_bytes > EXTERNAL_DATA_THRESHOLD, verbose=False,
            )
        except Exception as e:  # noqa: BLE001 - the exporter raises many types; name it and stop
            raise ExporterError(f"torch.onnx.export failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
    if opset not in MIN_ORT_FOR_OPSET:
        raise ExporterError(f"opset {opset} is not supported")
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise ExporterError(f"{path.name}: the exported graph fails onnx.checker: {str(e)[:200]}") from None
    data = path.with_name(path.name + ".data")
    return OnnxArtifact("fp32", path, (data,) if data.exists() else (), opset, dio.input_names, dio.output_names)
