"""Side by side, from the same merged MiniLM + LoRA model: the project's variants against the routes a user
could script instead, all timed with torch eager in one process.

    python benchmarks/bench_routes.py [--rounds 30] [--threads 1] [--candidates]

Routes:
- torch eager fp32: the merged model (the reference everything is relative to);
- project fp32 / int8: ``run_pipeline`` on the sample adapter, the bundle's onnx/model.onnx and model_quantized.onnx
  (the int8 weight format it chose is printed);
- plain int8: the TorchScript exporter (``torch.onnx.export(dynamo=False)``) + ``quantize_dynamic`` defaults;
- plain + fusions int8: the same after onnxruntime's transformer optimizer (``optimize_model(model_type="bert")``);
- ``--candidates`` adds the fp32 graphs of the plain routes and what issue 15 weighed against the chosen route.

The plain routes' int8 (signed 8-bit weights) saturates in int16 on CPUs without VNNI, so its numbers depend on
the CPU (see exporter/quantize.py): it is here as the speed a user would otherwise get, not as an option.

Engines run interleaved (one call of each per round) with ``session.intra_op.allow_spinning=0`` and the given
thread count for torch and onnxruntime alike; the table shows the median per shape, and each route relative to
torch eager. Export times: the project's whole ``run_pipeline`` (with parity) and the plain script's export +
quantize, both in this process after imports.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_minilm import ADAPTER, SHAPES, torch_model  # noqa: E402

# Shape inference does not type the outputs of onnxruntime's contrib ops (Attention, SkipLayerNormalization...).
FUSED = {"DefaultTensorType": 1}  # onnx.TensorProto.FLOAT


def plain_routes(wrapper, names: list[str], work: Path, opset: int = 17) -> tuple[dict[str, Path], float]:
    import torch
    from onnxruntime.quantization import quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    t0 = time.perf_counter()
    fp32 = work / "plain.onnx"
    example = tuple(torch.ones((1, 8), dtype=torch.int64) for _ in names)
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    torch.onnx.export(wrapper, example, str(fp32), input_names=names, output_names=["logits"],
                      dynamic_axes={**axes, "logits": {0: "batch"}}, opset_version=opset, dynamo=False)
    int8 = work / "plain_int8.onnx"
    quantize_dynamic(str(fp32), str(int8))
    script_s = time.perf_counter() - t0
    fused = work / "fused.onnx"
    optimize_model(str(fp32), model_type="bert", num_heads=0, hidden_size=0).save_model_to_file(str(fused))
    fused_int8 = work / "fused_int8.onnx"
    quantize_dynamic(str(fused), str(fused_int8), extra_options=FUSED)
    routes = {"plain int8": int8, "plain+fusions int8": fused_int8, "plain fp32": fp32, "plain+fusions fp32": fused}
    return routes, script_s


def set_attention(wrapper, implementation: str) -> None:
    for m in wrapper.modules():
        if hasattr(m, "set_attn_implementation") and hasattr(m, "config"):
            m.set_attn_implementation(implementation)


def candidate_routes(wrapper, names: list[str], project_fp32: Path, work: Path) -> dict[str, Path]:
    """What issue 15 weighed against the chosen route: the project's graph with unsigned int8 weights (what
    --int8-weights auto falls back to where 7-bit signed weights fail the gate), and the TorchScript exporter
    with eager attention, which onnxruntime's optimizer fuses down to Attention ops."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    from exporter.int8 import quantize_dynamic_int8

    out = {}
    p = work / "project_u8u8.onnx"
    quantize_dynamic_int8(project_fp32, p, external=False, weights="unsigned")
    out["project graph, int8 unsigned (auto's fallback)"] = p
    set_attention(wrapper, "eager")
    ts = work / "ts_eager.onnx"
    example = tuple(torch.ones((2, 8), dtype=torch.int64) for _ in names)
    torch.onnx.export(wrapper, example, str(ts), input_names=names, output_names=["logits"], opset_version=17,
                      dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names}, "logits": {0: "batch"}},
                      dynamo=False)
    set_attention(wrapper, "sdpa")  # torch eager is timed as users run it (transformers' default attention)
    fused = work / "ts_eager_fused.onnx"
    optimize_model(str(ts), model_type="bert", num_heads=0, hidden_size=0).save_model_to_file(str(fused))
    out["TorchScript eager+fusions fp32"] = fused
    q = work / "ts_eager_fused_s7.onnx"
    quantize_dynamic(str(fused), str(q), per_channel=True, weight_type=QuantType.QInt8, reduce_range=True,
                     extra_options=FUSED)
    out["TorchScript eager+fusions int8 s7"] = q
    return out


def gemm_peak(threads: int, size: int = 1024, rounds: int = 10) -> dict[str, float]:
    """GOP/s (2 ops per multiply-add) of onnxruntime's MatMul (fp32) and MatMulInteger (u8 x u8, the project's
    int8; u8 x s8 within +-64) on one large square GEMM: this CPU's practical peak for each kernel."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    out = {}
    cases = {"fp32 MatMul": (TensorProto.FLOAT, rng.standard_normal((size, size)).astype(np.float32), None),
             "int8 u8 x s7 MatMulInteger": (TensorProto.UINT8, rng.integers(-64, 65, (size, size)).astype(np.int8),
                                            np.int8),
             "int8 u8 x u8 MatMulInteger": (TensorProto.UINT8, rng.integers(0, 256, (size, size)).astype(np.uint8),
                                            np.uint8)}
    for name, (a_type, b, zp) in cases.items():
        if zp is None:
            node = helper.make_node("MatMul", ["A", "B"], ["Y"])
            inits = [numpy_helper.from_array(b, "B")]
            a = rng.standard_normal((size, size)).astype(np.float32)
        else:
            node = helper.make_node("MatMulInteger", ["A", "B", "az", "bz"], ["Y"])
            inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(np.array(0, np.uint8), "az"),
                     numpy_helper.from_array(np.zeros((size,), zp), "bz")]
            a = rng.integers(0, 256, (size, size)).astype(np.uint8)
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", a_type, [size, size])],
                                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT if zp is None else TensorProto.INT32,
                                                                 None)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        sess.run(None, {"A": a})
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            sess.run(None, {"A": a})
            times.append(time.perf_counter() - t0)
        out[name] = 2 * size**3 / statistics.median(times) / 1e9
    return out


# MiniLM (6 layers, hidden 384, FFN 1536): multiply-adds per token in the linear layers, which int8 quantizes.
MINILM_LINEAR_MACS = 6 * (4 * 384 * 384 + 2 * 384 * 1536)


def fused_ops(path: Path) -> str:
    import onnx

    def walk(g) -> list[str]:  # subgraphs too: the project's attention sits in If branches (exporter/fusions.py)
        out = []
        for n in g.node:
            out.append(n.op_type)
            for a in n.attribute:
                for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                    out += walk(sub)
        return out

    ops = walk(onnx.load(str(path), load_external_data=False).graph)
    wanted = ("Attention", "QAttention", "MultiHeadAttention", "If", "SkipLayerNormalization", "EmbedLayerNormalization",
              "BiasGelu", "FastGelu", "Gelu", "MatMulInteger", "DynamicQuantizeMatMul", "MatMul", "LayerNormalization")
    return ", ".join(f"{k} {ops.count(k)}" for k in wanted if ops.count(k))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--candidates", action="store_true")
    args = ap.parse_args()

    import onnxruntime as ort
    import torch

    from exporter.cpu import cpu_features
    from exporter.pipeline import ExportSpec, run_pipeline

    print(f"CPU: {cpu_features()['isa']} ({cpu_features()['model']}); onnxruntime {ort.__version__}, "
          f"torch {torch.__version__}; {args.threads} thread(s)\n")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        run_pipeline(ExportSpec(adapter=ADAPTER, out=work / "bundle", quantize=("int8",)))
        project_s = time.perf_counter() - t0
        wrapper, names = torch_model(args.threads)
        plain, script_s = plain_routes(wrapper, list(names), work)
        routes = {"project fp32": work / "bundle/onnx/model.onnx",
                  "project int8": work / "bundle/onnx/model_quantized.onnx", **plain}
        if args.candidates:
            routes.update(candidate_routes(wrapper, list(names), routes["project fp32"], work))
        else:
            routes = {k: v for k, v in routes.items() if "fp32" not in k or k.startswith("project")}
        dtype = json.loads((work / "bundle/manifest.json").read_text())["variants"]["int8"]["dtype"]
        print(f"project int8: {dtype}")
        print(f"export: project run_pipeline (export + int8 + parity) {project_s:.1f} s; plain script "
              f"(export + int8) {script_s:.1f} s\n")
        print("| route | file MB | operators |\n|---|---|---|")
        for k, p in routes.items():
            print(f"| {k} | {p.stat().st_size / 2**20:.1f} | {fused_ops(p)} |")

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions = {k: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
                    for k, p in routes.items()}
        rng = np.random.default_rng(0)
        header = " | ".join(["torch eager fp32 (ms)", *routes])
        print(f"\nLatency: median of {args.rounds} interleaved rounds, ms for torch and x torch for each route\n")
        print(f"| shape | {header} |\n|---|{'---|' * (len(routes) + 1)}")
        for b, s in SHAPES:
            feeds = {"input_ids": rng.integers(1000, 30000, (b, s), dtype=np.int64),
                     "attention_mask": np.ones((b, s), dtype=np.int64),
                     "token_type_ids": np.zeros((b, s), dtype=np.int64)}
            feeds = {n: feeds[n] for n in names}
            targs = [torch.from_numpy(feeds[n]) for n in names]
            engines = {"torch": lambda t=targs: wrapper(*t)}
            for k, sess in sessions.items():
                mine = {i.name: feeds[i.name] for i in sess.get_inputs()}
                engines[k] = lambda sess=sess, f=mine: sess.run(None, f)
            times: dict[str, list[float]] = {k: [] for k in engines}
            with torch.inference_mode():
                for _ in range(2):
                    for fn in engines.values():
                        fn()
                for _ in range(args.rounds):
                    for k, fn in engines.items():
                        t1 = time.perf_counter()
                        fn()
                        times[k].append((time.perf_counter() - t1) * 1000)
            med = {k: statistics.median(v) for k, v in times.items()}
            cells = " | ".join(f"{med[k] / med['torch']:.2f}x" for k in routes)
            print(f"| b{b} s{s} | {med['torch']:.2f} | {cells} |")
            last = med
        peak = gemm_peak(args.threads)
        ops = 2 * MINILM_LINEAR_MACS * 8 * 128
        print(f"\nGEMM throughput, {args.threads} thread(s): one 1024^3 GEMM (this CPU's practical peak) against "
              f"MiniLM's linear layers at b8 s128 ({ops / 1e9:.1f} GOP; whole-model time, so a lower bound)\n")
        print("| kernel | peak GOP/s | MiniLM b8 s128 achieved GOP/s | share of peak |\n|---|---|---|---|")
        signed = dtype.endswith("u8s7")
        unsigned_route = "project int8" if not signed else next((k for k in routes if "unsigned" in k), None)
        for kernel, route in (("fp32 MatMul", "project fp32"), ("int8 u8 x u8 MatMulInteger", unsigned_route),
                              ("int8 u8 x s7 MatMulInteger", "project int8" if signed else None)):
            achieved = ops / (last[route] / 1e3) / 1e9 if route else None
            print(f"| {kernel} | {peak[kernel]:.1f} | {f'{achieved:.1f}' if achieved else '-'} | "
                  f"{f'{achieved / peak[kernel]:.0%}' if achieved else '-'} |")


if __name__ == "__main__":
    main()
