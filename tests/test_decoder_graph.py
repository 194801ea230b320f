"""exporter/decoder_graph.py: Llama-family decoders written as onnxruntime's fused decoder ops compute what the
PyTorch model does, left-padded batches and KV-cache steps included, and the exporter falls back to the traced
graph wherever the fused one does not apply."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch


def _model(factory, arch: str, **config):
    from transformers import AutoConfig, AutoModelForCausalLM

    base = factory.decoder_base(arch)
    cfg = AutoConfig.from_pretrained(base)
    for k, v in config.items():
        setattr(cfg, k, v)
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # no weight left at its init value (biases are zeros), so a wrong wire shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _ops(path) -> list[str]:
    import onnx

    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


def _left_padded_steps(session_step, torch_step, dio, vocab: int, steps: int = 3):
    """Max |logits difference| over a left-padded prefill (2 rows, one padded by 5) and ``steps`` decode steps."""
    from exporter.generation import next_feeds, prefill_feeds

    rng = np.random.default_rng(0)
    ids = rng.integers(3, vocab, (2, 12))
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    feeds = {"onnx": prefill_feeds(dio, ids, mask), "torch": prefill_feeds(dio, ids, mask)}
    worst = 0.0
    for step in range(steps + 1):
        got, want = session_step(feeds["onnx"]), torch_step(feeds["torch"])
        valid = feeds["onnx"]["attention_mask"][:, -got["logits"].shape[1]:].astype(bool)
        worst = max(worst, float(np.abs(got["logits"] - want["logits"])[valid].max()))
        if step < steps:
            token = np.array([7 + step, 11 + step])
            feeds = {"onnx": next_feeds(dio, feeds["onnx"], got, token),
                     "torch": next_feeds(dio, feeds["torch"], want, token)}
    return worst


@pytest.mark.parametrize("arch, config, opset", [
    ("llama", {}, 20),
    ("llama", {"tie_word_embeddings": True}, 17),  # tied lm_head; ReduceMean's axes attribute
    ("qwen2", {}, 20),  # q/k/v biases
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, 20),  # rope scaling from the model's tables
], ids=["llama", "llama-tied-opset17", "qwen2-qkv-bias", "llama-linear-rope"])
def test_fused_graph_equals_pytorch_on_left_padded_batches_and_cache_steps(factory, tmp_path, arch, config, opset):
    import onnxruntime as ort

    from exporter.decoder import decoder_io, make_decoder_wrapper, torch_step
    from exporter.decoder_graph import export_fused_decoder, unsupported_reason

    model = _model(factory, arch, **config)
    if config.get("tie_word_embeddings"):
        model.tie_weights()
    assert unsupported_reason(model) is None
    dio = decoder_io(model)
    path = tmp_path / "model.onnx"
    export_fused_decoder(model, dio, path, opset)
    ops = _ops(path)
    layers = model.config.num_hidden_layers
    assert ops.count("GroupQueryAttention") == layers and ops.count("RotaryEmbedding") == 2 * layers, ops
    assert "Softmax" not in ops and ops.count("MatMul") == 4 * layers + 1  # q/k/v, o, gate/up, down; lm_head
    import onnx

    inits = {t.name for t in onnx.load(str(path), load_external_data=False).graph.initializer}
    # A tied lm_head multiplies by the embedding table itself (one copy, which int4 quantizes once).
    assert ("Transpose" in ops and "lm_head.weight" not in inits) == bool(config.get("tie_word_embeddings")), ops
    # The IR the traced graphs have for this opset, which older runtimes (transformers.js' onnxruntime-node) load.
    assert onnx.load(str(path), load_external_data=False).ir_version == {17: 8, 20: 9}[opset]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def step(feeds):
        return dict(zip(names, session.run(None, feeds)))

    worst = _left_padded_steps(step, torch_step(make_decoder_wrapper(model, dio), dio), dio, model.config.vocab_size)
    # float32 kernels in another order than torch's, on logits of magnitude ~1-5 (random weights).
    assert worst < 1e-4, worst


def test_llama_bundles_carry_the_fused_graph_and_say_what_onnxruntime_it_needs(factory):
    from exporter.decoder_graph import MIN_ONNXRUNTIME

    out, report = factory.decoder_bundle("llama")
    assert report.passed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["min_onnxruntime"] == MIN_ONNXRUNTIME and manifest["onnxruntime_fusions"] is True
    for variant in manifest["variants"].values():
        ops = _ops(out / variant["file"])
        assert ops.count("GroupQueryAttention") == 2, (variant["file"], ops)


def test_models_the_fused_graph_does_not_cover_are_traced(factory, tmp_path):
    from exporter.decoder_graph import unsupported_reason
    from exporter.onnx_export import MIN_ORT_FOR_OPSET
    from exporter.pipeline import ExportSpec, run_pipeline

    # Mistral's tiny config has sliding-window attention; dynamic rope changes its tables with the length.
    assert "sliding-window" in unsupported_reason(_model(factory, "mistral"))
    for rope in ({"rope_type": "dynamic", "factor": 2.0}, {"rope_type": "longrope", "short_factor": [1.0] * 8,
                                                           "long_factor": [4.0] * 8, "original_max_position_embeddings": 16}):
        model = _model(factory, "llama", rope_parameters={**rope, "rope_theta": 10000.0})
        assert f"rotary scaling '{rope['rope_type']}'" in unsupported_reason(model)
    out, report = factory.decoder_bundle("mistral")
    manifest = json.loads((out / "manifest.json").read_text())
    assert report.passed and "GroupQueryAttention" not in _ops(out / "onnx/model.onnx")
    assert manifest["min_onnxruntime"] == MIN_ORT_FOR_OPSET[manifest["opset"]]
    # --no-ort-fusions: the traced graph, standard ONNX in fp32, for runtimes other than onnxruntime.
    plain = tmp_path / "plain"
    report = run_pipeline(ExportSpec(adapter=factory.decoder_adapter("llama"), out=plain, quantize=("int4",),
                                     ort_fusions=False))
    assert report.passed
    assert {"GroupQueryAttention", "RotaryEmbedding"}.isdisjoint(_ops(plain / "onnx/model.onnx"))
    manifest = json.loads((plain / "manifest.json").read_text())
    assert manifest["onnxruntime_fusions"] is False
    assert manifest["min_onnxruntime"] == MIN_ORT_FOR_OPSET[manifest["opset"]]


def test_swappable_llama_bundles_are_traced_and_ask_for_their_opsets_onnxruntime(factory, tmp_path):
    from exporter.onnx_export import MIN_ORT_FOR_OPSET
    from exporter.pipeline import ExportSpec, run_pipeline

    out = tmp_path / "swap"
    report = run_pipeline(ExportSpec(adapter=factory.decoder_adapter("llama"), out=out, quantize=(),
                                     keep_adapters=True))
    assert report.passed
    manifest = json.loads((out / "manifest.json").read_text())
    assert "GroupQueryAttention" not in _ops(out / manifest["variants"]["fp32"]["file"])
    assert manifest["min_onnxruntime"] == MIN_ORT_FOR_OPSET[manifest["opset"]]


def test_generate_appends_to_one_kv_buffer_per_layer_where_the_graph_allows_it(factory):
    """Fused graphs' GroupQueryAttention writes each step into the buffer bound as both past and present
    (runtime.InPlaceStep): the same logits and tokens as session.run's concatenated cache, over a left-padded
    batch and enough steps that the buffers grow; fp16 (its cache passes through Casts, so no gain) and traced
    graphs run the plain way, and a bundle that claims it for a graph that concatenates fails in one line."""
    import onnxruntime as ort

    from exporter.generation import DecoderIO, greedy, next_feeds, prefill_feeds
    from exporter.runtime import BundleGenerator, InPlaceStep, in_place_cache, session_step

    out, _ = factory.decoder_bundle("llama")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["decoder"]["in_place_cache"] is True
    assert not in_place_cache(manifest, "fp16")
    io = DecoderIO.from_json(manifest["decoder"])
    vocab = json.loads((out / "config.json").read_text())["vocab_size"]
    rng = np.random.default_rng(1)
    ids = rng.integers(3, vocab, (3, 9))
    mask = np.ones_like(ids)
    mask[1, :4], mask[2, :7] = 0, 0
    names = list(io.output_names)
    for variant in ("fp32", "int8", "int4"):
        assert in_place_cache(manifest, variant)
        session = ort.InferenceSession(str(out / manifest["variants"][variant]["file"]),
                                       providers=["CPUExecutionProvider"])
        want = greedy(lambda f, s=session: dict(zip(names, s.run(names, f))), io, ids, mask, 10)
        step = InPlaceStep(session, io, headroom=2)  # 9 + 2 positions: the buffers double once on the way
        got = greedy(step, io, ids, mask, 10)
        assert step.kv.capacity == 22 and step.kv.length == 18
        # The same kernels on the same numbers: only the cache's memory differs. Had a step not been written
        # into the buffers, the next one would read zeros there and its logits would move.
        assert np.abs(got.step_logits - want.step_logits).max() < 1e-5, variant
        assert (got.tokens == want.tokens).all(), variant
    # A continuing step stays in the same buffers; a cache that is not the one returned last (a rewind, one
    # layer's past swapped) runs plainly and gives session.run's logits; the cache returned is read-only.
    session = ort.InferenceSession(str(out / manifest["variants"]["int4"]["file"]), providers=["CPUExecutionProvider"])
    step = InPlaceStep(session, io)
    first = prefill_feeds(io, ids, mask)
    out0 = step(first)
    buffers = step.kv.arrays[0]
    feeds1 = next_feeds(io, first, out0, ids[:, 0])
    out1 = step(feeds1)
    assert step.kv.arrays[0] is buffers and not out1["present.0.key"].flags.writeable
    with pytest.raises(ValueError):
        out1["present.0.key"][...] = 0
    def plain(feeds):
        return session.run(["logits"], {n: np.ascontiguousarray(v) for n, v in feeds.items()})[0]

    rewind = plain(feeds1)  # feeds1's past is out0's, a step behind the buffers
    assert np.abs(step(feeds1)["logits"] - rewind).max() < 1e-5
    feeds2 = next_feeds(io, feeds1, step(feeds1), ids[:, 1])
    swapped = {**feeds2, "past_key_values.1.key": np.array(feeds2["past_key_values.1.key"]) * 0.5}
    assert np.abs(step(swapped)["logits"] - plain(swapped)).max() < 1e-5
    assert np.abs(step(swapped)["logits"] - plain(feeds2)).max() > 1e-3  # the swap matters
    gen = BundleGenerator(out, "int4")
    assert isinstance(gen._step, InPlaceStep)
    text = gen.generate("hello there", max_new_tokens=6)
    gen._step = session_step(gen.session, gen.io)  # session.run's concatenated cache
    assert gen.generate("hello there", max_new_tokens=6) == text
    traced, _ = factory.decoder_bundle("mistral")
    assert "in_place_cache" not in json.loads((traced / "manifest.json").read_text())["decoder"]


def test_a_bundle_that_claims_an_in_place_cache_for_a_traced_graph_fails_in_one_line(factory, tmp_path):
    """decoder.in_place_cache comes from a stranger's manifest: on a graph that concatenates its cache, verify
    and generate (which run the variant the same way) refuse it with the claim named, no traceback."""
    import shutil

    from click.testing import CliRunner

    from exporter.cli import cli
    from exporter.formats import sha256_file

    traced, _ = factory.decoder_bundle("mistral")
    bundle = tmp_path / "forged"
    shutil.copytree(traced, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["decoder"]["in_place_cache"] = True
    manifest["onnxruntime_fusions"] = True
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    (bundle / "manifest.json.sha256").write_text(f"{sha256_file(bundle / 'manifest.json')}  manifest.json\n")
    r = CliRunner().invoke(cli, ["verify", str(bundle), "--variant", "int4"])
    assert r.exit_code == 3 and "decoder.in_place_cache" in r.output and "Traceback" not in r.output, r.output
    r = CliRunner().invoke(cli, ["generate", str(bundle), "hello", "--variant", "int4", "--max-new-tokens", "3"])
    assert r.exit_code == 1 and "decoder.in_place_cache" in r.output and "Traceback" not in r.output, r.output
