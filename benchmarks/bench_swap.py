"""The cost of keeping adapters swappable (export --keep-adapters) instead of merging them.

    python benchmarks/bench_swap.py [--reps 20] [--threads 2] [--only encoder|decoder]

Encoder: all-MiniLM-L6-v2 with the sample sentiment adapter (rank 8 on query/key/value/dense). Decoder: a
random ~100M Llama with a rank-8 adapter on q/v (as bench_decoder.py). Each is exported twice, merged and
with --keep-adapters, and every variant is timed in one process, interleaved, with
session.intra_op.allow_spinning=0: the merged graph, the swappable graph with the adapter active, and the
swappable graph with no adapter. Sizes are the graph files; the adapter file is listed separately (a device
holds one base plus one small file per adapter).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def export(adapter: Path, out: Path, quantize: list[str], keep: bool) -> dict:
    cmd = [sys.executable, "-m", "exporter.cli", "export", "--adapter", str(adapter), "-o", str(out), "--json", "-q"]
    cmd += [a for q in quantize for a in ("--quantize", q)] + (["--keep-adapters"] if keep else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"export failed ({'keep' if keep else 'merged'}): {proc.stderr[-1500:]}")
    report = json.loads(proc.stdout)
    report["wall"] = time.perf_counter() - t0
    return report


def session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def median_ms(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def sizes_row(merged: Path, keep: Path, variant_file: str, adapter_file: Path) -> tuple[float, float, float]:
    def mb(p: Path) -> float:
        return sum(f.stat().st_size for f in p.parent.glob(p.name + "*")) / 1e6
    return mb(merged / variant_file), mb(keep / variant_file), adapter_file.stat().st_size / 1e6


def encoder(args) -> None:
    from exporter.runtime import BundleModel
    from exporter.swappable import ActiveAdapters

    adapter = ROOT / "samples" / "adapters" / "minilm-sentiment"
    with tempfile.TemporaryDirectory() as tmp:
        merged, keep = Path(tmp) / "merged", Path(tmp) / "keep"
        rm = export(adapter, merged, ["int8"], keep=False)
        rk = export(adapter, keep, ["int8"], keep=True)
        print(f"## Encoder: all-MiniLM-L6-v2 + sample adapter (rank 8, q/k/v/dense); export merged {rm['wall']:.1f} s, "
              f"swappable {rk['wall']:.1f} s\n")
        manifest = json.loads((keep / "manifest.json").read_text())
        name = next(iter(manifest["adapters"]["items"]))
        active = ActiveAdapters(keep, manifest, [name])
        tok = BundleModel(merged, "fp32")
        texts = ["The delivery was quick and the staff were lovely, would order again."] * 8
        shapes = {"b1 s16": (1, 16), "b1 s128": (1, 128), "b8 s128": (8, 128)}
        print("| variant | shape | merged ms | swappable + adapter ms | overhead | swappable, no adapter ms |")
        print("|---|---|---|---|---|---|")
        for variant, file in (("fp32", "onnx/model.onnx"), ("int8", "onnx/model_quantized.onnx")):
            sm, sk = session(merged / file, args.threads), session(keep / file, args.threads)
            for label, (b, s) in shapes.items():
                feeds = tok.encode(texts[:b])
                feeds = {k: np.resize(v, (b, s)) if k != "attention_mask" else np.ones((b, s), np.int64)
                         for k, v in feeds.items()}
                t_m = median_ms(lambda s=sm, f=feeds: s.run(None, f), args.reps)
                t_k = median_ms(lambda s=sk, f=feeds: s.run(None, f, active.run_options), args.reps)
                t_0 = median_ms(lambda s=sk, f=feeds: s.run(None, f), args.reps)
                print(f"| {variant} | {label} | {t_m:.2f} | {t_k:.2f} | {100 * (t_k / t_m - 1):+.0f}% | {t_0:.2f} |")
        print("\n| variant | merged graph MB | swappable graph MB | adapter file MB |\n|---|---|---|---|")
        for variant, file in (("fp32", "onnx/model.onnx"), ("int8", "onnx/model_quantized.onnx")):
            a, b, c = sizes_row(merged, keep, file, keep / manifest["adapters"]["items"][name]["file"])
            print(f"| {variant} | {a:.1f} | {b:.1f} | {c:.2f} |")
        print()


def decoder(args) -> None:
    from bench_decoder import make_base

    from exporter.generation import DecoderIO, next_feeds, prefill_feeds
    from exporter.swappable import ActiveAdapters

    with tempfile.TemporaryDirectory() as tmp:
        _, adapter = make_base("100M", Path(tmp))
        merged, keep = Path(tmp) / "merged", Path(tmp) / "keep"
        rm = export(adapter, merged, ["int8", "int4"], keep=False)
        rk = export(adapter, keep, ["int8", "int4"], keep=True)
        manifest = json.loads((keep / "manifest.json").read_text())
        dio = DecoderIO.from_json(manifest["decoder"])
        name = next(iter(manifest["adapters"]["items"]))
        active = ActiveAdapters(keep, manifest, [name])
        print(f"## Decoder: random Llama {manifest['num_parameters'] / 1e6:.0f}M + rank-8 adapter on q/v; export "
              f"merged {rm['wall']:.1f} s, swappable {rk['wall']:.1f} s\n")
        ids = np.random.default_rng(0).integers(4, 32000, (1, 128))
        prefill = prefill_feeds(dio, ids, np.ones_like(ids))
        names = list(dio.output_names)

        def engine(s, ro):
            return lambda feeds: dict(zip(names, s.run(names, {n: feeds[n] for n in dio.input_names}, ro)))

        def decode(step) -> None:
            out = step(prefill)
            feeds = next_feeds(dio, prefill, out, np.array([5]))
            for _ in range(16):
                feeds = next_feeds(dio, feeds, step(feeds), np.array([5]))

        print("| variant | prefill 128 merged ms | prefill swappable ms | decode/token merged ms | "
              "decode/token swappable ms | decode overhead |\n|---|---|---|---|---|---|")
        for variant, file in (("fp32", "onnx/model.onnx"), ("int8", "onnx/model_quantized.onnx"), ("int4", "onnx/model_q4.onnx")):
            em = engine(session(merged / file, args.threads), None)
            ek = engine(session(keep / file, args.threads), active.run_options)
            p_m = median_ms(lambda e=em: e(prefill), args.reps)
            p_k = median_ms(lambda e=ek: e(prefill), args.reps)
            # decode = (prefill + 16 steps) - prefill, per step
            d_m = (median_ms(lambda e=em: decode(e), max(3, args.reps // 4)) - p_m) / 16
            d_k = (median_ms(lambda e=ek: decode(e), max(3, args.reps // 4)) - p_k) / 16
            print(f"| {variant} | {p_m:.1f} | {p_k:.1f} | {d_m:.2f} | {d_k:.2f} | {100 * (d_k / d_m - 1):+.0f}% |")
        print("\n| variant | merged graph MB | swappable graph MB | adapter file MB |\n|---|---|---|---|")
        for variant, file in (("fp32", "onnx/model.onnx"), ("int8", "onnx/model_quantized.onnx"), ("int4", "onnx/model_q4.onnx")):
            a, b, c = sizes_row(merged, keep, file, keep / manifest["adapters"]["items"][name]["file"])
            print(f"| {variant} | {a:.1f} | {b:.1f} | {c:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["encoder", "decoder"], default=None)
    args = ap.parse_args()
    if args.only != "decoder":
        encoder(args)
    if args.only != "encoder":
        decoder(args)


if __name__ == "__main__":
    main()
