"""export-adapter bench: every variant timed per case, sizes, load time and peak RSS (issue 15).

Timings are never asserted against targets here (benchmarks/ prints those); these tests check that bench
measures what it says it measures: every variant and case, consistent numbers, real file sizes, its errors.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from test_torch_free import run_blocked

from exporter.cli import cli


def bench_json(*args: str) -> dict:
    r = CliRunner().invoke(cli, ["bench", *args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def check_consistent(result: dict, bundle, cases: list[str]) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert list(result["variants"]) == list(manifest["variants"])
    for v, info in result["variants"].items():
        entry = manifest["variants"][v]
        files = [entry["file"], *entry.get("data_files", [])]
        assert info["size_mb"] == pytest.approx(sum((bundle / f).stat().st_size for f in files) / 2**20)
        assert info["load_s"] > 0 and info["peak_rss_mb"] > 20  # a Python process with onnxruntime loaded
    assert [(r["case"], r["variant"]) for r in result["cases"]] == [(c, v) for c in cases for v in manifest["variants"]]
    for r in result["cases"]:
        assert 0 < r["p50_ms"] <= r["p90_ms"]
        per_call = r["batch"] if r["kind"] == "encode" else r["batch"] * r["tokens"]
        assert r["throughput"] == pytest.approx(per_call / (r["p50_ms"] / 1e3))
        fp32 = next(x for x in result["cases"] if x["case"] == r["case"] and x["variant"] == "fp32")
        assert r["vs_fp32"] == pytest.approx(r["p50_ms"] / fp32["p50_ms"])
    assert result["cpu"]["isa"] and result["rounds"] == 2


def test_bench_times_every_encoder_variant_and_shape(factory):
    bundle, _ = factory.bundle("bert", "text-classification")
    result = bench_json(str(bundle), "--rounds", "2", "--warmup", "0", "--shape", "1x8", "--shape", "2x16",
                        "--threads", "1", "--session-config", "session.intra_op.allow_spinning=0")
    check_consistent(result, bundle, ["b1 s8", "b2 s16"])
    assert result["threads"] == 1 and result["session_config"] == {"session.intra_op.allow_spinning": "0"}


def test_bench_times_decoder_prefill_and_decode_steps(factory):
    bundle, _ = factory.decoder_bundle("llama")
    result = bench_json(str(bundle), "--rounds", "2", "--warmup", "1", "--context", "8", "--context", "24")
    check_consistent(result, bundle, ["prefill 8", "decode @8", "prefill 24", "decode @24"])
    decode = next(r for r in result["cases"] if r["case"] == "decode @24")
    assert (decode["tokens"], decode["past"]) == (1, 24)
    r = CliRunner().invoke(cli, ["bench", str(bundle), "--shape", "1x8"])
    assert r.exit_code == 2 and "--shape times encoders; this is a decoder bundle: pass --context N" in r.output
    r = CliRunner().invoke(cli, ["bench", str(bundle), "--context", "100000"])
    assert r.exit_code == 2 and "--context 100000: this decoder's context is" in r.output


def test_bench_table_plot_and_variant_choice(factory, tmp_path):
    pytest.importorskip("matplotlib")
    bundle, _ = factory.bundle("bert", "text-classification")
    plot = tmp_path / "bench.png"
    r = CliRunner().invoke(cli, ["bench", str(bundle), "--variant", "int8", "--rounds", "2", "--warmup", "0",
                                 "--shape", "1x8", "--no-memory", "--plot", str(plot)])
    assert r.exit_code == 0, r.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"bundle: {bundle}") and "rounds" in lines[0]
    row = next(line.split() for line in lines if line.strip().startswith("b1 s8"))
    assert row[:2] == ["b1", "s8"] and row[2] == "int8" and row[-1] == "-"  # no fp32 to compare with
    assert any(line.split()[:3] == ["int8", f"{(bundle / 'onnx/model_quantized.onnx').stat().st_size / 2**20:.1f}",
                                    "-"] for line in lines)


def test_bench_swappable_adapter_and_without_torch(factory):
    bundle, _ = factory.swap_bundle("encoder")
    r = run_blocked("bench", str(bundle), "--adapter", "second", "--rounds", "2", "--warmup", "0", "--shape", "1x8",
                    "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["adapter"] == "second"


@pytest.mark.parametrize("args, code, message", [
    (["--shape", "8"], 2, "'8': write BATCHxSEQUENCE, e.g. 8x128"),
    (["--shape", "1x100000"], 2, "--shape 1x100000: sequences of 1..128 tokens (the bundle's max_length)"),
    (["--session-config", "novalue"], 2, "'novalue': write KEY=VALUE"),
    (["--variant", "int3"], 1, "no variant 'int3'; this bundle has fp32, int8, fp16"),
    (["--context", "8"], 2, "--context times decoders; this is a text-classification bundle: pass --shape BxS"),
])
def test_bench_bad_options_exit_with_one_line(factory, args, code, message):
    bundle, _ = factory.bundle("bert", "text-classification")
    r = CliRunner().invoke(cli, ["bench", str(bundle), "--rounds", "1", "--warmup", "0", "--no-memory", *args])
    assert r.exit_code == code, r.output
    assert message in r.output and "Traceback" not in r.output


def test_bench_decode_on_kv_buffers_computes_what_session_run_does(factory):
    """bench times a fused decoder's decode step on KV buffers (as generate runs it), called again and again
    at one position: each call must give session.run's logits for the same inputs and cache."""
    import numpy as np
    import onnxruntime as ort

    from exporter.bench import Case, make_feeds
    from exporter.generation import DecoderIO
    from exporter.runtime import KVBuffers, in_place_cache

    bundle, _ = factory.decoder_bundle("llama")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert in_place_cache(manifest, "int4")
    io = DecoderIO.from_json(manifest["decoder"])
    session = ort.InferenceSession(str(bundle / manifest["variants"]["int4"]["file"]),
                                   providers=["CPUExecutionProvider"])
    feeds = make_feeds(session, Case("decode @12", "decode", 1, 1, 12), 100)
    want = session.run(["logits"], feeds)[0]
    kv = KVBuffers(session, io)
    kv.load([feeds.pop(n) for n in io.past_names], 13)
    for _ in range(3):
        got = kv.run(feeds)
        assert got.shape == want.shape and np.abs(got - want).max() < 1e-5


def test_bench_times_a_fused_decoders_decode_steps_on_kv_buffers(factory, monkeypatch):
    """The path bench times is generate's: KVBuffers for the variants that append in place, not fp16."""
    import exporter.bench as bench
    from exporter.runtime import KVBuffers

    ran: list[int] = []

    class Counting(KVBuffers):
        def run(self, feeds):
            ran.append(feeds["attention_mask"].shape[1])
            return super().run(feeds)

    monkeypatch.setattr(bench, "KVBuffers", Counting)
    bundle, _ = factory.decoder_bundle("llama")
    bench.run_bench(bench.BenchSpec(bundle, variants=("int4", "fp16"), contexts=(8,), rounds=2, warmup=1,
                                    memory=False))
    assert ran == [9] * 3  # int4's decode @8, 3 rounds; fp16's ran plainly
