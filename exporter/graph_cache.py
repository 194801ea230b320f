"""The dynamo exporter's graph for one model structure, kept without its weights and reused (build side).

Why: tracing, decomposing and translating MiniLM took ~15 s of its export (AVX2 EPYC, torch 2.13), and
exporting another adapter of the same base repeats it exactly: the merged model differs in weight values only.
(BERT, RoBERTa and XLM-RoBERTa graphs, MiniLM's included, are now written from the weights by
encoder_graph.py and never traced; the cache serves the encoders that still are.)
An entry is the graph as ``torch.onnx.export(optimize=False)`` wrote it, with the tensors that are the
module's parameters and buffers left empty. Reuse fills them from the module by name and shape, then both
paths run the same optimizer and save, so a graph from the cache is the same bytes as a fresh one
(tests/test_graph_cache.py). The key holds everything the trace depends on but the values: the module's
structure (its repr, every parameter and buffer's name, shape and dtype, its transformers config), the
example's shapes, names, opset, and the versions of torch, transformers, onnxscript and this package, and
the source of the wrapper's module. The fp32 parity gate then checks the result against PyTorch as always.

``EXPORT_ADAPTER_GRAPH_CACHE``: a folder for the entries, or ``off``; default ``<cache>/graphs``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
ENV = "EXPORT_ADAPTER_GRAPH_CACHE"


def cache_dir() -> Path | None:
    env = os.environ.get(ENV, "")
    if env.lower() in ("off", "0", "none", "false"):
        return None
    if env:
        return Path(env).expanduser()
    from .embedded import cache_root

    return cache_root() / "graphs"


def module_tensors(module) -> dict[str, Any]:
    """Every parameter and buffer by each of its names (tied weights under all of theirs)."""
    named = dict(module.named_parameters(remove_duplicate=False))
    named.update(module.named_buffers(remove_duplicate=False))
    return named


def graph_key(module, args: tuple, input_names: tuple[str, ...], output_names: tuple[str, ...], opset: int,
              dynamic_shapes: Any) -> str:
    import importlib.metadata as md

    from . import __version__

    def version(dist: str) -> str:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return "-"

    sources = {type(module).__module__, __name__, "exporter.onnx_export"}
    configs = []
    for sub in module.modules():
        cfg = getattr(sub, "config", None)
        if cfg is not None and hasattr(cfg, "to_dict"):
            d = {k: v for k, v in cfg.to_dict().items() if k != "_name_or_path"}  # where it was loaded from
            configs.append([json.dumps(d, sort_keys=True, default=str), str(getattr(cfg, "_attn_implementation", None))])
    parts = {
        "format": CACHE_FORMAT,
        "versions": [__version__, *(version(d) for d in ("torch", "transformers", "onnxscript", "onnx-ir", "onnx"))],
        "sources": sorted(_file_digest(name) for name in sources),
        "structure": repr(module),
        "tensors": [[n, list(t.shape), str(t.dtype)] for n, t in module_tensors(module).items()],
        "configs": configs,
        "args": [[list(a.shape), str(a.dtype)] for a in args],
        "names": [list(input_names), list(output_names)],
        "opset": opset,
        "dynamic": repr(dynamic_shapes),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:40]


def _file_digest(module_name: str) -> str:
    mod = sys.modules.get(module_name)
    path = getattr(mod, "__file__", None)
    if not path:
        return f"{module_name}:-"
    return f"{module_name}:{hashlib.sha256(Path(path).read_bytes()).hexdigest()}"


def load(key: str, module):
    """The entry's graph with the module's tensors filled in, or None (no entry, or one that does not fit)."""
    import onnx
    from google.protobuf.message import DecodeError

    folder = cache_dir()
    if folder is None:
        return None
    path = folder / f"{key}.onnx"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("graph cache: cannot read %s (%s); exporting afresh", path, e)
        return None
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except DecodeError:
        log.warning("graph cache: %s is not an ONNX graph; exporting afresh", path)
        return None
    if not _fill(proto, module_tensors(module)):
        log.warning("graph cache: %s does not match the model's tensors; exporting afresh", path)
        return None
    log.info("graph cache: reusing %s", path.name)
    return proto


MARKER = "export_adapter.graph_cache.emptied"
DATA_FIELDS = ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")


def _fill(proto, tensors: dict[str, Any]) -> bool:
    """Each emptied initializer gets the module's tensor of its name; False when a name, shape or dtype differs."""
    props = [p for p in proto.metadata_props if p.key == MARKER]
    if len(props) != 1:
        return False
    empty = [i for i in proto.graph.initializer if i.name in tensors and not _has_data(i)]
    if props[0].value != str(len(empty)):
        return False
    for init in empty:
        t = tensors[init.name].detach().cpu().contiguous()
        if list(init.dims) != list(t.shape) or init.data_type != _onnx_dtype(t.dtype):
            return False
        init.raw_data = _raw(t)
    proto.metadata_props.remove(props[0])
    return True


def _has_data(init) -> bool:
    return any(init.HasField(f) if f == "raw_data" else len(getattr(init, f)) for f in DATA_FIELDS)


def _raw(t) -> bytes:
    import torch

    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: the same two bytes, read as int16
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def store(key: str, proto, module) -> None:
    """Write the entry: the graph with the module's tensors emptied; atomic, and a warning when it cannot."""
    import onnx

    folder = cache_dir()
    if folder is None:
        return
    entry = onnx.ModelProto()
    entry.CopyFrom(proto)
    tensors = module_tensors(module)
    emptied = 0
    for init in entry.graph.initializer:
        if init.name in tensors:
            for f in DATA_FIELDS:
                init.ClearField(f)
            emptied += 1
    entry.metadata_props.add(key=MARKER, value=str(emptied))
    tmp = folder / f".{key}.{os.getpid()}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(entry.SerializeToString())
        os.replace(tmp, folder / f"{key}.onnx")
    except OSError as e:
        log.warning("graph cache: cannot write %s (%s); the export is not affected", folder, e)
        tmp.unlink(missing_ok=True)


def _onnx_dtype(dtype) -> int:
    import torch
    from onnx import TensorProto

    return {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16,
            torch.int64: TensorProto.INT64, torch.int32: TensorProto.INT32, torch.bool: TensorProto.BOOL,
            torch.uint8: TensorProto.UINT8, torch.int8: TensorProto.INT8}.get(dtype, -1)
