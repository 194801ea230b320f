"""Decoders: latency of a ~100M-parameter Llama, and export time / peak RSS as models grow.

    python benchmarks/bench_decoder.py latency [--reps 10] [--threads 2]
    python benchmarks/bench_decoder.py scaling [--sizes 50M 200M 500M 1B]

Random Llama models built from a config (no hub access): the numbers measure the toolkit and the runtimes,
not the model's quality. `latency` compares prefill at 128 tokens and per-token decode (KV cache, batch 1)
for torch eager fp32 vs onnxruntime fp32 / int8 / int4, interleaved in one process with
session.intra_op.allow_spinning=0. `scaling` exports each size in a child process (fp32 + int4) and reports
wall time and peak RSS against the fp32 weight bytes. Targets on a 2-core machine: int4 decode >= 2x faster
than torch eager fp32; peak RSS <= 2.5x the fp32 weight bytes; time growing no worse than linearly.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = {  # hidden, layers, heads, kv heads, intermediate; vocab 32000
    "50M": (512, 8, 8, 4, 1408),
    "100M": (768, 8, 12, 4, 2048),
    "200M": (1024, 10, 16, 4, 2816),
    "500M": (1536, 14, 16, 4, 4096),
    "1B": (2048, 16, 16, 8, 5632),
}


def make_base(size: str, root: Path) -> tuple[Path, Path]:
    """A random Llama of the given size plus a rank-8 LoRA adapter on q/v (non-trivial weights)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    hidden, layers, heads, kv, inter = SIZES[size]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=2048,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    base = root / f"llama-{size}"
    model.save_pretrained(base)
    # A character-level WordPiece (English maps to real ids, not UNK); the model's vocabulary stays 32000.
    import string

    chars = list(string.ascii_letters + string.digits + string.punctuation)
    tokens = ["<pad>", "<s>", "</s>", "<unk>", *chars, *("##" + c for c in chars)]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(base)
    pm = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                          init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(0.01)  # keep the random model's outputs in a sane range
    pm.peft_config["default"].base_model_name_or_path = str(base)
    adapter = root / f"adapter-{size}"
    pm.save_pretrained(adapter)
    return base, adapter


def export_child(adapter: Path, out: Path, quantize: list[str]) -> tuple[float, float, dict]:
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "exporter.cli", "export", "--adapter", str(adapter), "-o", str(out), "--json", "-q"]
    for q in quantize:
        cmd += ["--quantize", q]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 3):
        raise SystemExit(proc.stderr[-2000:])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # max over children so far (MB)
    return wall, peak, json.loads(proc.stdout)


def latency(args) -> None:
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM

    from exporter.decoder import decoder_io, make_decoder_wrapper, torch_step
    from exporter.generation import next_feeds, prefill_feeds

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        base, adapter = make_base("100M", Path(tmp))
        out = Path(tmp) / "bundle"
        wall, peak, report = export_child(adapter, out, ["int8", "int4"])
        if not report["passed"]:  # still time the variants, from the diagnostics folder
            out = out.with_name(out.name + ".rejected")
            print("gate failures:", "; ".join(f for r in report["variants"].values() for f in r["failures"]))
        params = json.loads((out / "manifest.json").read_text())["num_parameters"]
        print(f"## Llama {params / 1e6:.0f}M (random), export fp32 + int8 + int4: {wall:.1f} s, peak RSS {peak:.0f} MB")
        verdicts = ", ".join(f"{v} {'pass' if r['passed'] else 'FAIL'}" for v, r in report["variants"].items())
        print(f"verdicts: {verdicts}\n")
        model = AutoModelForCausalLM.from_pretrained(base).eval()
        dio = decoder_io(model)
        engines = {"torch eager fp32": torch_step(make_decoder_wrapper(model, dio), dio)}
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        for v, f in (("ort fp32", "onnx/model.onnx"), ("ort int8", "onnx/model_quantized.onnx"), ("ort int4", "onnx/model_q4.onnx")):
            s = ort.InferenceSession(str(out / f), opts, providers=["CPUExecutionProvider"])
            engines[v] = (lambda feeds, s=s: dict(zip(dio.output_names,
                                                      s.run(list(dio.output_names),
                                                            {n: feeds[n] for n in dio.input_names}))))
        ids = np.random.default_rng(0).integers(4, 32000, (1, 128))
        prefill = prefill_feeds(dio, ids, np.ones_like(ids))
        times: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "decode": []} for k in engines}
        for _ in range(args.reps):
            for k, step in engines.items():
                t0 = time.perf_counter()
                out_ = step(prefill)
                times[k]["prefill"].append((time.perf_counter() - t0) * 1000)
                feeds = next_feeds(dio, prefill, out_, np.array([5]))
                t0 = time.perf_counter()
                for _ in range(16):
                    o = step(feeds)
                    feeds = next_feeds(dio, feeds, o, np.array([5]))
                times[k]["decode"].append((time.perf_counter() - t0) * 1000 / 16)
        torch_decode = statistics.median(times["torch eager fp32"]["decode"])
        print("| engine | prefill 128 tok (ms) | decode per token (ms) | decode speed-up vs torch |\n|---|---|---|---|")
        for k, t in times.items():
            d = statistics.median(t["decode"])
            print(f"| {k} | {statistics.median(t['prefill']):.1f} | {d:.2f} | {torch_decode / d:.2f}x |")


def scaling(args) -> None:
    print("| size | params | fp32 weights (MB) | export wall (s) | peak RSS (MB) | RSS / weights | verdicts |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            _, adapter = make_base(size, Path(tmp))
            script = ("import sys, json, resource, subprocess;"
                      "p = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
                      "print(json.dumps({'rc': p.returncode, 'out': p.stdout, 'err': p.stderr[-1500:],"
                      "'rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")
            cmd = [sys.executable, "-m", "exporter.cli", "export", "--adapter", str(adapter), "-o",
                   str(Path(tmp) / "b"), "--quantize", "int4", "--json", "-q"]
            t0 = time.perf_counter()
            res = json.loads(subprocess.run([sys.executable, "-c", script, *cmd], capture_output=True,
                                            text=True).stdout)
            wall = time.perf_counter() - t0
            if res["rc"] not in (0, 3):
                print(f"| {size} | export failed: {res['err'][-300:]} |")
                continue
            report = json.loads(res["out"])
            bundle = Path(tmp) / ("b" if res["rc"] == 0 else "b.rejected")
            params = json.loads((bundle / "manifest.json").read_text())["num_parameters"]
            weights_mb = (params or 0) * 4 / 1e6
            verdicts = ", ".join(f"{v} {'pass' if r['passed'] else 'FAIL'}" for v, r in report["variants"].items())
            print(f"| {size} | {params / 1e6:.0f}M | {weights_mb:.0f} | {wall:.1f} | {res['rss']:.0f} | "
                  f"{res['rss'] / weights_mb:.2f}x | {verdicts} |")
            for v, r in report["variants"].items():
                for f in r["failures"]:
                    print(f"  {size} {v}: {f}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    lat = sub.add_parser("latency")
    lat.add_argument("--reps", type=int, default=10)
    lat.add_argument("--threads", type=int, default=2)
    sc = sub.add_parser("scaling")
    sc.add_argument("--sizes", nargs="+", default=["50M", "200M", "500M", "1B"], choices=list(SIZES))
    args = ap.parse_args()
    latency(args) if args.cmd == "latency" else scaling(args)


if __name__ == "__main__":
    main()
