"""MiniLM + the sample sentiment adapter: export stage times, sizes, peak RSS, and latency.

    python benchmarks/bench_minilm.py [--reps 30] [--threads 2]

Latency compares torch eager fp32 (the merged model), onnxruntime fp32 and onnxruntime int8 at
batch 1 seq 16, batch 1 seq 128 and batch 8 seq 128. The engines run interleaved in one process (one call
of each per round, so drift hits all alike) and the median of the rounds is reported; onnxruntime runs with
session.intra_op.allow_spinning=0 so an idle spinning pool does not steal the other engine's cores.
Targets on a 2-core machine: whole export <= 30 s; int8 <= 0.30x torch at b1 s16 and <= 0.50x at b8 s128;
int8 file <= 0.26x fp32.
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

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = ROOT / "samples" / "adapters" / "minilm-sentiment"
SHAPES = ((1, 16), (1, 128), (8, 128))


def export_in_child(out: Path) -> tuple[dict, float, float]:
    """Run the real CLI in a child process so its peak RSS is the export's alone."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "exporter.cli", "export", "--adapter", str(ADAPTER), "-o", str(out), "--json", "-q"],
        capture_output=True, text=True, check=True,
    )
    wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return json.loads(proc.stdout), wall, peak_mb


def torch_model(threads: int):
    """The merged PyTorch model, built with the same stage functions export uses."""
    import torch

    from exporter.loading import inspect_adapter, resolve_base
    from exporter.merge import apply_adapter, load_base_model, merge, resolve_labels
    from exporter.onnx_export import make_wrapper
    from exporter.stages import quiet_libraries
    from exporter.tasks import get_arch, get_task, input_names

    torch.set_num_threads(threads)
    adapter = inspect_adapter(ADAPTER)
    base = resolve_base(None, adapter)
    task, arch = get_task("text-classification"), get_arch(base.model_type)
    with quiet_libraries():
        model, info = load_base_model(task, base, resolve_labels(task, arch, base, adapter, None), False)
    peft_model, _ = apply_adapter(model, adapter, base, info["missing_keys"], False)
    names = input_names(arch, base.config.get("type_vocab_size"))
    return make_wrapper(merge(peft_model, base.name), task, names, None), names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import onnxruntime as ort
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bundle"
        report, wall, peak_mb = export_in_child(out)
        sizes = report["sizes"]
        print("## Export (all-MiniLM-L6-v2 + minilm-sentiment LoRA, fp32 + int8)\n")
        print("| stage | seconds |\n|---|---|")
        for stage, s in report["timings"].items():
            print(f"| {stage} | {s:.2f} |")
        print(f"| **whole command (wall, incl. imports)** | **{wall:.2f}** |")
        print(f"\npeak RSS of the export process: {peak_mb:.0f} MB\n")
        print("| variant | size (MB) | vs fp32 |\n|---|---|---|")
        for v, b in sizes.items():
            print(f"| {v} | {b / 1e6:.1f} | {b / sizes['fp32']:.3f}x |")

        wrapper, names = torch_model(args.threads)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions = {v: ort.InferenceSession(str(out / f), opts, providers=["CPUExecutionProvider"])
                    for v, f in (("ort fp32", "onnx/model.onnx"), ("ort int8", "onnx/model_quantized.onnx"))}
        rng = np.random.default_rng(0)
        print(f"\n## Latency (median of {args.reps} interleaved rounds, {args.threads} threads, ms)\n")
        print("| shape | torch eager fp32 | ort fp32 | ort int8 | int8 / torch |\n|---|---|---|---|---|")
        for b, s in SHAPES:
            feeds = {"input_ids": rng.integers(1000, 30000, (b, s), dtype=np.int64),
                     "attention_mask": np.ones((b, s), dtype=np.int64),
                     "token_type_ids": np.zeros((b, s), dtype=np.int64)}
            feeds = {n: feeds[n] for n in names}
            targs = [torch.from_numpy(feeds[n]) for n in names]
            engines = {"torch": lambda t=targs: wrapper(*t)}
            engines.update({k: (lambda sess=sess, f=feeds: sess.run(None, f)) for k, sess in sessions.items()})
            times: dict[str, list[float]] = {k: [] for k in engines}
            with torch.inference_mode():
                for fn in engines.values():  # warm-up
                    fn()
                for _ in range(args.reps):
                    for k, fn in engines.items():
                        t0 = time.perf_counter()
                        fn()
                        times[k].append((time.perf_counter() - t0) * 1000)
            med = {k: statistics.median(v) for k, v in times.items()}
            print(f"| b{b} s{s} | {med['torch']:.2f} | {med['ort fp32']:.2f} | {med['ort int8']:.2f} | "
                  f"{med['ort int8'] / med['torch']:.2f}x |")


if __name__ == "__main__":
    main()
