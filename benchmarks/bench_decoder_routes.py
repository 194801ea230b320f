"""Decoder routes side by side on SmolLM2-135M-Instruct + LoRA: torch eager against the project's traced and fused
graphs and, where a Python with onnxruntime-genai is given, onnxruntime-genai's model builder, from the same merged
model, timed in one process.

    python benchmarks/bench_decoder_routes.py [--rounds 25] [--context 128] [--genai-python PATH]

Routes (batch 1, one intra-op thread for torch and onnxruntime alike, interleaved rounds, median):
- torch eager fp32: the merged model with transformers' KV cache;
- project fused fp32 / int8 / int4: ``export-adapter export`` of the adapter (exporter/decoder_graph.py);
- project traced fp32 / int8 / int4: the same with ``--no-ort-fusions`` (the TorchScript graph, decoder.py);
- genai builder int4 (``--genai-python``): ``python -m onnxruntime_genai.models.builder -p int4 -e cpu`` on the
  merged model saved as a Hugging Face folder; its graph has no position_ids input and treats batches as
  right-padded, and its int4 (every MatMul and the lm_head at 4 bits, no block minimum) has not been through the
  project's gates, so it shows the speed another tool reaches, not an option.
Prints, each relative to torch eager: decode ms/token while generating (``--steps`` tokens in a row after the
``--context``-token prompt, each step fed the cache the previous one returned, as ``generate`` runs: graphs with
GroupQueryAttention keep it in one buffer per layer that the attention appends to, ``runtime.InPlaceStep``;
torch and the traced graphs concatenate), one decode step run alone between the other engines' (plain
``session.run``, weights cold in the caches: a worst case), and prefill ms for the prompt.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_smollm2 import SMOL, make_inputs  # noqa: E402


def export(adapter: Path, out: Path, *extra: str) -> None:
    cmd = [sys.executable, "-m", "exporter.cli", "export", "--adapter", str(adapter), "--base", SMOL, "-o", str(out),
           "--quantize", "int8", "--quantize", "int4", "-q", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"export failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=16, help="decode steps generated in a row per round")
    ap.add_argument("--genai-python", type=Path, default=None,
                    help="a Python that can import onnxruntime_genai (its model builder), to add that route")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import onnxruntime as ort
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from exporter.cpu import cpu_features
    from exporter.decoder import decoder_io, make_decoder_wrapper, torch_step
    from exporter.generation import next_feeds, prefill_feeds
    from exporter.loading import resolve_base_name
    from exporter.runtime import InPlaceStep, session_step

    torch.set_num_threads(1)
    print(f"CPU: {cpu_features()['isa']} ({cpu_features()['model']}); onnxruntime {ort.__version__}, "
          f"torch {torch.__version__}; 1 thread, context {args.context}\n")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _, adapter = make_inputs(root, degrid=False)
        routes: dict[str, Path] = {}
        export(adapter, root / "fused")
        export(adapter, root / "traced", "--no-ort-fusions")
        for name, b in (("fused", root / "fused"), ("traced", root / "traced")):
            for v, f in (("fp32", "model.onnx"), ("int8", "model_quantized.onnx"), ("int4", "model_q4.onnx")):
                routes[f"project {name} {v}"] = b / "onnx" / f
        loc = resolve_base_name(SMOL).location
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(loc), adapter).merge_and_unload().eval()
        if args.genai_python:
            merged = root / "merged"
            model.save_pretrained(merged)
            AutoTokenizer.from_pretrained(loc).save_pretrained(merged)
            proc = subprocess.run([str(args.genai_python), "-m", "onnxruntime_genai.models.builder", "-i", str(merged),
                                   "-o", str(root / "genai"), "-p", "int4", "-e", "cpu", "-c", str(root / "gcache")],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"genai builder failed: {proc.stderr.strip()[-500:]}")
            routes["genai builder int4"] = root / "genai" / "model.onnx"
        dio = decoder_io(model)
        ctx = args.context
        ids = np.random.default_rng(0).integers(100, 40000, (1, ctx))
        prefill = prefill_feeds(dio, ids, np.ones_like(ids))
        tstep = torch_step(make_decoder_wrapper(model, dio), dio)
        decode = next_feeds(dio, prefill, tstep(prefill), np.array([42]))
        def burst(step, feeds):
            # Generation: each step takes the cache the previous one returned (the token is fixed, so every
            # engine does the same work).
            feeds = next_feeds(dio, feeds, step(feeds), np.array([42]))  # untimed: a cache the step made itself
            t0 = time.perf_counter()
            for _ in range(args.steps):
                feeds = next_feeds(dio, feeds, step(feeds), np.array([42]))
            return (time.perf_counter() - t0) * 1e3

        engines = {"torch eager fp32": (lambda: tstep(prefill), lambda: tstep(decode),
                                        lambda: burst(tstep, decode))}
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        for name, path in routes.items():
            s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            names = {i.name for i in s.get_inputs()}
            pf = {k: v for k, v in prefill.items() if k in names}
            present = dict(zip([o.name for o in s.get_outputs()], s.run(None, pf)))
            df = {k: v for k, v in decode.items() if k in names and not k.startswith("past")}
            df.update({k: present[k.replace("past_key_values", "present")] for k in names if k.startswith("past")})
            # The graphs with GroupQueryAttention (fused, genai) step the way generate runs them: the cache in
            # one buffer per layer that the attention appends to (runtime.InPlaceStep); traced graphs concatenate.
            ort_step = InPlaceStep(s, dio) if "traced" not in name else session_step(s, dio)

            engines[name] = (lambda s=s, f=pf: s.run(None, f), lambda s=s, f=df: s.run(None, f),
                             lambda st=ort_step, f=df: burst(st, f))
        times = {k: {"prefill": [], "decode": [], "burst": []} for k in engines}
        for _ in range(2):
            for pre, dec, _burst in engines.values():
                pre(), dec()
        for _ in range(args.rounds):
            for k, fns in engines.items():
                for kind, fn in zip(("prefill", "decode", "burst"), fns):
                    t0 = time.perf_counter()
                    ms = fn()
                    if kind == "burst":
                        times[k][kind].append(ms / args.steps)
                    else:
                        times[k][kind].append((time.perf_counter() - t0) * 1e3)
        med = {k: {kind: statistics.median(v) for kind, v in t.items()} for k, t in times.items()}
        base = med["torch eager fp32"]
        print(f"| route | decode ms/token, {args.steps} in a row | x torch | one step alone (cold) | x torch | "
              f"prefill {ctx} ms | x torch |\n|---|---|---|---|---|---|---|")
        for k, m in med.items():
            print(f"| {k} | {m['burst']:.2f} | {m['burst'] / base['burst']:.2f}x | {m['decode']:.2f} | "
                  f"{m['decode'] / base['decode']:.2f}x | {m['prefill']:.1f} | {m['prefill'] / base['prefill']:.2f}x |")


if __name__ == "__main__":
    main()
