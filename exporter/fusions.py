"""onnxruntime's transformer fusions on an exported encoder graph (build side).

Measured for issue 15 on MiniLM + LoRA (x86 AVX2 without VNNI, 1 thread, ``benchmarks/bench_routes.py``): the
dynamo graph with eager attention, fused by onnxruntime's transformer optimizer (SkipLayerNormalization 12,
BiasGelu 6: 187 nodes instead of 241), runs fp32 at 0.91x / 0.94x / 0.89x the unfused graph's latency at
b1 s16 / b1 s128 / b8 s128 and int8 at ~0.98x. Its attention is not fused into one Attention op (the
optimizer's patterns match the TorchScript exporter's graph, which runs ~5% faster still, but traces
transformers' masks into shape-specialised Python branches). The fusions are plain pattern rewrites (no
onnxruntime session optimizations baked in, so nothing depends on the exporting CPU); the fused ops are
onnxruntime contrib ops (com.microsoft), which onnxruntime, onnxruntime-web and onnxruntime-node run.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

from .errors import ExporterError

MS_DOMAIN = "com.microsoft"


def fuse_transformer(path: Path, model_type: str) -> dict[str, int]:
    """Rewrite the graph at ``path`` in place with onnxruntime's fusions for ``model_type`` (its optimizer's
    name: "bert" also matches RoBERTa/DistilBERT layers); the fused op counts (empty: nothing matched)."""
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
    fused: dict[str, int] = {}
    for node in optimized.model.graph.node:
        if node.domain == MS_DOMAIN:
            fused[node.op_type] = fused.get(node.op_type, 0) + 1
    if fused:
        # save_model_to_file adds the com.microsoft opset import the fused nodes need.
        optimized.save_model_to_file(str(path), use_external_data_format=False)
        onnx.checker.check_model(str(path))
    return fused


def uses_contrib_ops(path: Path) -> bool:
    import onnx

    return any(n.domain == MS_DOMAIN for n in onnx.load(str(path), load_external_data=False).graph.node)
