"""torch.onnx export of the merged model, with the task's outputs declared in ``tasks.py``.

The wrapper is also what produces the PyTorch reference, so the reference and the ONNX graph are the
same computation by construction.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ExporterError, UnsupportedError
from .formats import VARIANT_FILES
from .tasks import TaskSpec

log = logging.getLogger(__name__)

DEFAULT_OPSET = 20
# Protobuf cannot hold a model over 2 GiB; past this many parameter bytes the weights go to one
# external data file (model.onnx.data) beside the graph.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# The oldest onnxruntime that implements each default-domain opset (onnxruntime's compatibility table).
MIN_ORT_FOR_OPSET = {17: "1.14", 18: "1.16", 19: "1.17", 20: "1.17", 21: "1.20", 22: "1.20", 23: "1.22"}


def min_onnxruntime(opset: int, *needs: str) -> str:
    """The oldest onnxruntime that runs a graph of ``opset`` whose ops also need each of ``needs``."""
    return max((MIN_ORT_FOR_OPSET[opset], *needs), key=lambda v: tuple(int(x) for x in v.split(".")))


@dataclass(frozen=True)
class OnnxArtifact:
    variant: str
    path: Path
    data_files: tuple[Path, ...]
    opset: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]


def make_wrapper(model: Any, task: TaskSpec, input_names: tuple[str, ...], pooling: dict | None):
    """An nn.Module whose positional inputs and tuple outputs are exactly the ONNX graph's."""
    import torch

    class OnnxWrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args: torch.Tensor):
            kwargs = dict(zip(input_names, args))
            out = self.model(**kwargs)
            if task.name != "feature-extraction":
                return out.logits
            hidden = out.last_hidden_state
            mask = kwargs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mode = (pooling or {}).get("mode", "mean")
            if mode == "mean":
                emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            elif mode == "max":
                emb = hidden.masked_fill(mask == 0, -1e9).max(1).values
            else:
                emb = hidden[:, 0]
            if (pooling or {}).get("normalize"):
                emb = torch.nn.functional.normalize(emb, p=2.0, dim=-1)
            return hidden, emb

    return OnnxWrapper().eval()


def run_torch(module: Any, feeds: dict[str, np.ndarray], output_names: tuple[str, ...]) -> dict[str, np.ndarray]:
    import torch

    with torch.inference_mode():
        out = module(*[torch.from_numpy(a) for a in feeds.values()])
    if not isinstance(out, tuple):
        out = (out,)
    return {name: t.detach().float().numpy() for name, t in zip(output_names, out)}


def export_onnx(
    module: Any,
    example: dict[str, np.ndarray],
    path: Path,
    task: TaskSpec,
    opset: int = DEFAULT_OPSET,
) -> OnnxArtifact:
    """Export with dynamic batch and sequence axes; check the written file by path (works past 2 GiB)."""
    import torch

    input_names = tuple(example)
    batch = torch.export.Dim(BATCH_AXIS)
    seq = torch.export.Dim("sequence")
    return dynamo_export(module, tuple(torch.from_numpy(a) for a in example.values()), path, input_names,
                         tuple(o.name for o in task.outputs), opset, [{0: batch, 1: seq} for _ in input_names])


def dynamo_export(module, args: tuple, path: Path, input_names: tuple[str, ...], output_names: tuple[str, ...],
                  opset: int, dynamic_shapes: list) -> OnnxArtifact:
    """The dynamo exporter's one path (merged encoders, swappable graphs): the opset checked before tracing,
    the traced graph from graph_cache.py when this structure was exported before, external data past the
    threshold, the written file checked."""
    check_opset(opset)
    shapes = {"args": tuple(dynamic_shapes)}
    options = dict(input_names=list(input_names), output_names=list(output_names), opset_version=opset,
                   dynamo=True, dynamic_shapes=shapes, verbose=False)
    if parameter_bytes(module) > EXTERNAL_DATA_THRESHOLD:  # protobuf cannot hold it: torch writes the data file
        import onnx

        torch_export(module, args, path, external_data=True, **options)
        model = onnx.load(str(path), load_external_data=False)  # the weights stay in their file, untouched
        strip_metadata(model)
        onnx.save(model, str(path))
    else:
        from . import graph_cache

        key = graph_cache.graph_key(module, args, input_names, output_names, opset, shapes)
        traced = graph_cache.load(key, module)
        if traced is None:
            traced = _serialize(torch_export(module, args, None, optimize=False, **options).model)
            strip_metadata(traced)
            graph_cache.store(key, traced, module)
        _optimize_and_save(traced, path)
    return checked_artifact(path, opset, tuple(input_names), tuple(output_names))


def _serialize(model):
    import onnx_ir as ir

    return ir.serde.serialize_model(model)


def _optimize_and_save(proto, path: Path) -> None:
    """What ``torch.onnx.export(optimize=True)`` does after translating: onnxscript's optimizer (constant
    folding, dead code), then the graph saved without the node metadata it adds."""
    import onnx
    import onnx_ir as ir
    import onnxscript.optimizer

    model = ir.serde.deserialize_model(proto)
    onnxscript.optimizer.optimize_ir(model)
    out = _serialize(model)
    strip_metadata(out)
    onnx.save(out, str(path))


def strip_metadata(model) -> None:
    """Drop the exporter's per-node metadata_props: stack traces full of the exporting machine's paths (1654
    site-packages paths in MiniLM's graph; 31-59% of a small decoder's file), which nothing reads."""
    import onnx

    def strip(graph) -> None:
        for node in graph.node:
            del node.metadata_props[:]
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    strip(attr.g)
                for g in attr.graphs:
                    strip(g)

    strip(model.graph)
    for function in model.functions:
        for node in function.node:
            del node.metadata_props[:]


# The batch axis's name in every graph: transformers.js builds an empty KV cache from a graph's dim names and
# resolves only this one (a graph with "batch" fails there).
BATCH_AXIS = "batch_size"


def graph_path(staging: Path) -> Path:
    """Where the fp32 graph goes in a staging folder (formats.VARIANT_FILES), its folder made."""
    path = staging / VARIANT_FILES["fp32"]
    path.parent.mkdir(exist_ok=True)
    return path


def check_opset(opset: int) -> None:
    """Before any tracing: an opset onnxruntime cannot run (or we have no minimum runtime for) is refused."""
    if opset not in MIN_ORT_FOR_OPSET:
        raise UnsupportedError(f"opset {opset} is not supported; use one of {sorted(MIN_ORT_FOR_OPSET)}")


def parameter_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def torch_export(module, args: tuple, path: Path | None, **options: Any):
    """torch.onnx.export with its progress kept off our stdout (results, --json) and its warnings silenced
    (TracerWarnings about shape-dependent branches: parity checks the graph); a failure is one line, while a
    failed write (disk full, permissions) stays an OSError for the caller to name."""
    import torch

    out = sys.stderr if log.isEnabledFor(logging.DEBUG) else io.StringIO()  # noqa: SIM115 - closed with the block
    with warnings.catch_warnings(), contextlib.redirect_stdout(out):
        warnings.simplefilter("ignore")
        try:
            return torch.onnx.export(module, args, None if path is None else str(path), **options)
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - the exporter raises many types; name it and stop
            raise ExporterError(f"torch.onnx.export failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e


def checked_artifact(path: Path, opset: int, input_names: tuple[str, ...],
                     output_names: tuple[str, ...]) -> OnnxArtifact:
    """The written graph passes onnx.checker (by path: works past 2 GiB); with its external data file if any."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise ExporterError(f"{path.name}: the exported graph fails onnx.checker: {str(e)[:200]}") from None
    data = path.with_name(path.name + ".data")
    return OnnxArtifact("fp32", path, (data,) if data.exists() else (), opset, tuple(input_names),
                        tuple(output_names))


def save_written_graph(graph, path: Path, opset: int, input_names: tuple[str, ...],
                       output_names: tuple[str, ...]) -> OnnxArtifact:
    """A graph written from the weights (decoder_graph.py, encoder_graph.py) as a model at ``path``: the
    default and com.microsoft opsets, the oldest IR they allow, external data past the threshold; checked."""
    import onnx
    from onnx import helper

    from .fusions import MS_DOMAIN

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)],
                              producer_name="export-adapter")
    # The oldest IR the opsets allow, not the onnx package's newest: consumers pin older runtimes (transformers.js'
    # onnxruntime-node refused IR 14, "max supported IR version: 13").
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    if sum(t.ByteSize() for t in graph.initializer) > EXTERNAL_DATA_THRESHOLD:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data")
    else:
        onnx.save(model, str(path))
    return checked_artifact(path, opset, tuple(input_names), tuple(output_names))


def example_feeds(probe_feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A batch of 2 and a sequence of >= 3: torch.export specialises any dimension traced at size 1."""
    ids = probe_feeds["input_ids"]
    if ids.shape[0] >= 2 and ids.shape[1] >= 3:
        return {k: v[:2] for k, v in probe_feeds.items()}
    raise ExporterError("internal: the example batch for export needs batch >= 2 and sequence >= 3")
