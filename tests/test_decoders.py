"""Decoder export: every registered architecture with KV cache, quantized variants, parity, generation."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import TINY_DECODERS

from exporter.cli import cli
from exporter.generation import DecoderIO, greedy
from exporter.runtime import BundleGenerator
from exporter.tasks import DECODER_ARCHITECTURES
from exporter.verify import verify_bundle


def test_every_registered_decoder_is_tested():
    assert set(DECODER_ARCHITECTURES) == set(TINY_DECODERS), "a registered decoder has no tiny test config"


@pytest.mark.parametrize("arch", TINY_DECODERS)
def test_decoder_export_passes_every_gate(factory, arch):
    out, report = factory.decoder_bundle(arch)
    data = report.data
    assert data["passed"], {v: r["failures"] for v, r in data["variants"].items()}
    assert set(data["variants"]) == {"fp32", "int8", "int4", "fp16"}
    assert data["adapter_effect"]["meaningful"]
    fp32 = data["variants"]["fp32"]["outputs"]["logits"]
    assert fp32["greedy_exact"] == 1.0 and fp32["n_over_tolerance"] == 0 and fp32["max_abs_diff"] < 1e-5
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["family"] == "decoder" and manifest["task"] == "text-generation"
    dio = DecoderIO.from_json(manifest["decoder"])
    model = onnx.load(str(out / "onnx/model.onnx"), load_external_data=False)
    assert [i.name for i in model.graph.input] == list(dio.input_names)
    assert [o.name for o in model.graph.output] == list(dio.output_names)
    assert dio.input_names[:3] == ("input_ids", "attention_mask", "position_ids")
    assert dio.past_names[0] == "past_key_values.0.key" and dio.present_names[-1].startswith("present.1.value")
    # int4 really is 4-bit: MatMulNBits replaced the MatMuls (GPT-2's Conv1D included).
    q = onnx.load(str(out / "onnx/model_q4.onnx"), load_external_data=False)
    assert sum(n.op_type == "MatMulNBits" for n in q.graph.node) >= 2 * 2


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_decoder_bundle_verifies_and_generates_without_torch_api(factory, arch):
    out, _ = factory.decoder_bundle(arch)
    report = verify_bundle(out)
    assert report["passed"], report
    gen = BundleGenerator(out, "fp32")
    text = gen.generate("Once upon a time", max_new_tokens=6)
    assert isinstance(text, str)
    # Greedy generation through the bundle equals the stored PyTorch continuation of a probe prompt.
    from exporter.probes import load_arrays

    probes = json.loads((out / "reference" / "probes.json").read_text())
    ins = load_arrays(out / "reference" / "inputs.npz", len(probes["batches"]))
    ref = load_arrays(out / "reference" / "outputs.npz", len(probes["batches"]))
    run = greedy(gen.step, gen.io, ins[-1]["input_ids"], ins[-1]["attention_mask"], probes["max_new_tokens"])
    np.testing.assert_array_equal(run.tokens, ref[-1]["tokens"])  # the left-padded batch


def test_left_padded_batch_equals_each_prompt_alone(factory):
    out, _ = factory.decoder_bundle("qwen2")
    from exporter.probes import load_arrays

    probes = json.loads((out / "reference" / "probes.json").read_text())
    ref = load_arrays(out / "reference" / "outputs.npz", len(probes["batches"]))
    singles = np.concatenate([r["tokens"] for r in ref[:-1]])
    np.testing.assert_array_equal(ref[-1]["tokens"], singles)


def test_generate_cli_streams_and_samples(factory):
    out, _ = factory.decoder_bundle("llama")
    runner = CliRunner()
    r = runner.invoke(cli, ["generate", str(out), "The capital of France is", "--max-new-tokens", "5",
                            "--variant", "int4"])
    assert r.exit_code == 0, r.output
    a = runner.invoke(cli, ["generate", str(out), "Once upon a time", "--temperature", "1.0", "--seed", "3",
                            "--max-new-tokens", "8"]).stdout
    b = runner.invoke(cli, ["generate", str(out), "Once upon a time", "--temperature", "1.0", "--seed", "3",
                            "--max-new-tokens", "8"]).stdout
    assert a == b  # seeded sampling is reproducible
    r = runner.invoke(cli, ["generate", str(out), "hi", "--chat"])
    assert r.exit_code == 1 and "no chat template" in r.stderr
    enc, _ = factory.bundle("bert", "text-classification")
    r = runner.invoke(cli, ["generate", str(enc), "hi"])
    assert r.exit_code == 1 and "cannot generate text" in r.stderr


def test_greedy_mismatch_fails_the_fp32_gate():
    from exporter.parity import compare_decoder
    from exporter.tolerances import decoder_thresholds_for

    logits = [np.random.default_rng(0).standard_normal((1, 4, 10)).astype(np.float32)]
    mask = [np.ones((1, 4), dtype=np.int64)]
    ref_tokens = [np.array([[1, 2, 3, 4]])]
    ok = compare_decoder(logits, logits, mask, ref_tokens, ref_tokens, decoder_thresholds_for("fp32"))
    assert ok["passed"]
    bad = compare_decoder(logits, logits, mask, [np.array([[1, 2, 9, 4]])], ref_tokens, decoder_thresholds_for("fp32"))
    assert not bad["passed"] and "greedy tokens" in bad["failures"][0]
    assert bad["outputs"]["logits"]["prefix_match_mean"] == 0.5


def test_prompt_and_prefix_tuning_are_refused(factory, tmp_path):
    import shutil

    adapter = tmp_path / "prefix"
    shutil.copytree(factory.decoder_adapter("llama"), adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["peft_type"] = "PREFIX_TUNING"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(cli, ["export", "--adapter", str(adapter), "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and "cannot be merged" in r.stderr and "LoRA" in r.stderr


@pytest.mark.parametrize("flavour", ["rslora", "dora"])
def test_rslora_and_dora_adapters_merge_and_export(factory, tmp_path, flavour):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from exporter.pipeline import ExportSpec, run_pipeline

    base = factory.decoder_base("llama")
    torch.manual_seed(5)
    cfg = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                     init_lora_weights=False, use_rslora=flavour == "rslora", use_dora=flavour == "dora")
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(base), cfg)
    adapter = tmp_path / flavour
    pm.save_pretrained(adapter)
    report = run_pipeline(ExportSpec(adapter=adapter, out=tmp_path / "b", base=str(base), quantize=("none",)))
    assert report.passed and report.data["adapter"][f"use_{flavour}"] is True
    assert report.data["variants"]["fp32"]["outputs"]["logits"]["greedy_exact"] == 1.0
    assert report.data["adapter_effect"]["meaningful"]


def test_int4_embedding_option_quantizes_the_gather(factory, tmp_path):
    r = CliRunner().invoke(cli, ["export", "--adapter", str(factory.decoder_adapter("gpt2")), "-o", str(tmp_path / "b"),
                                 "--quantize", "int4", "--int4-embedding", "--int4-block-size", "16", "-q", "--json"])
    assert r.exit_code in (0, 3), r.output
    q = onnx.load(str((tmp_path / ("b" if r.exit_code == 0 else "b.rejected")) / "onnx/model_q4.onnx"))
    assert any(n.op_type == "GatherBlockQuantized" for n in q.graph.node)
    assert json.loads(r.stdout)["variants"]["int4"]["file"] == "onnx/model_q4.onnx"


def _peft_config(kind: str):
    from peft import AdaLoraConfig, IA3Config, LoHaConfig, LoKrConfig

    targets = ["q_proj", "v_proj"]
    return {
        "loha": lambda: LoHaConfig(task_type="CAUSAL_LM", r=4, alpha=8, target_modules=targets, init_weights=False),
        "lokr": lambda: LoKrConfig(task_type="CAUSAL_LM", r=4, alpha=8, target_modules=targets, init_weights=False),
        "ia3": lambda: IA3Config(task_type="CAUSAL_LM", target_modules=targets + ["down_proj"],
                                 feedforward_modules=["down_proj"], init_ia3_weights=False),
        "adalora": lambda: AdaLoraConfig(task_type="CAUSAL_LM", init_r=6, target_r=4, target_modules=targets,
                                         total_step=10, init_lora_weights=False),
    }[kind]()


@pytest.mark.parametrize("kind", ["loha", "lokr", "ia3", "adalora"])
def test_other_mergeable_adapter_types(factory, tmp_path, kind):
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from exporter.pipeline import ExportSpec, run_pipeline

    base = factory.decoder_base("llama")
    torch.manual_seed(6)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(base), _peft_config(kind))
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:  # a "trained" adapter: move every adapter weight off its initial value
                p.add_(0.05 * torch.randn_like(p))
    adapter = tmp_path / kind
    pm.save_pretrained(adapter)
    report = run_pipeline(ExportSpec(adapter=adapter, out=tmp_path / "b", base=str(base), quantize=("none",)))
    assert report.passed, report.data["variants"]["fp32"]["failures"]
    assert report.data["adapter"]["peft_type"] == kind.upper()
    assert report.data["adapter_effect"]["meaningful"], report.data["adapter_effect"]
    assert report.data["variants"]["fp32"]["outputs"]["logits"]["greedy_exact"] == 1.0


def test_departure_at_a_pytorch_near_tie_is_not_damage():
    from exporter.parity import compare_decoder
    from exporter.tolerances import decoder_thresholds_for

    rng = np.random.default_rng(1)
    logits = [rng.standard_normal((1, 4, 10)).astype(np.float32) * 3]
    mask = [np.ones((1, 4), dtype=np.int64)]
    ref_tokens = [np.array([[1, 2, 3, 4]])]
    got = [np.array([[1, 2, 7, 7]])]  # departs at step 2
    th = decoder_thresholds_for("int8")
    tie = compare_decoder(logits, logits, mask, got, ref_tokens, th, [np.array([[5.0, 5.0, 1e-4, 5.0]])])
    assert tie["outputs"]["logits"]["tie_divergences"] == 1 and tie["outputs"]["logits"]["prefix_match_mean"] == 1.0
    clear = compare_decoder(logits, logits, mask, got, ref_tokens, th, [np.array([[5.0, 5.0, 5.0, 5.0]])])
    assert clear["outputs"]["logits"]["prefix_match_mean"] == 0.5 and clear["outputs"]["logits"]["tie_divergences"] == 0
    assert clear["outputs"]["logits"]["greedy_exact"] == 0.0


def test_decoder_adapter_that_grew_the_vocabulary(factory, tmp_path):
    """embed_tokens and lm_head in modules_to_save with added tokens: carried over, tokens generate."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from exporter.pipeline import ExportSpec, run_pipeline

    base = factory.decoder_base("llama")
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_tokens(["<tool>", "</tool>"])
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(len(tok))
    pm = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                          modules_to_save=["embed_tokens", "lm_head"], init_lora_weights=False))
    with torch.no_grad():  # make the new tokens likely, so generation exercises them
        pm.base_model.model.lm_head.modules_to_save["default"].weight[-2:] += 0.5
    adapter = tmp_path / "grown"
    pm.save_pretrained(adapter)
    tok.save_pretrained(adapter)
    report = run_pipeline(ExportSpec(adapter=adapter, out=tmp_path / "b", base=str(base), quantize=("none",)))
    assert report.passed, report.data["variants"]["fp32"]["failures"]
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert json.loads((tmp_path / "b" / "config.json").read_text())["vocab_size"] == len(tok)
    gen = BundleGenerator(tmp_path / "b", "fp32")
    assert gen.tokenizer.encode("<tool>").ids[-1] == len(tok) - 2
    assert manifest["decoder"]["num_layers"] == 2


def test_chat_template_is_applied_without_transformers(factory, tmp_path):
    import shutil

    from exporter.pipeline import ExportSpec, run_pipeline

    base = tmp_path / "chat-base"
    shutil.copytree(factory.decoder_base("llama"), base)
    cfg_path = base / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
                            "{% if add_generation_prompt %}<|assistant|> {% endif %}")
    cfg_path.write_text(json.dumps(cfg))
    out = tmp_path / "b"
    assert run_pipeline(ExportSpec(adapter=factory.decoder_adapter("llama"), out=out, base=str(base),
                                   quantize=("none",))).passed
    gen = BundleGenerator(out, "fp32")
    assert gen.apply_chat_template("hi there") == "<|user|> hi there <|assistant|> "
    r = CliRunner().invoke(cli, ["generate", str(out), "hi there", "--chat", "--max-new-tokens", "3"])
    assert r.exit_code == 0, r.output


PAYLOAD = ("{{ cycler.__init__.__globals__.os.popen('touch PWNED_PATH').read() }}"
           "{% for m in messages %}{{ m['content'] }}{% endfor %}")


def test_a_chat_template_that_runs_code_is_refused_at_export_and_on_the_device(factory, tmp_path):
    """The template is a stranger's text: jinja2's sandbox refuses it, nothing runs, one line each time."""
    import shutil

    from helpers import assert_clean_failure, run_export

    from exporter.errors import BundleError
    from exporter.runtime import render_chat_template

    marker = tmp_path / "pwned"
    payload = PAYLOAD.replace("PWNED_PATH", str(marker))
    with pytest.raises(BundleError, match="unsafe operation"):
        render_chat_template(payload, [{"role": "user", "content": "hi"}])
    assert not marker.exists()
    base = tmp_path / "evil-base"
    shutil.copytree(factory.decoder_base("llama"), base)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg["chat_template"] = payload
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "b"
    assert_clean_failure(run_export(factory.decoder_adapter("llama"), out, "--base", str(base)), out,
                         "chat template is refused")
    assert not marker.exists()
    # A bundle whose manifest was edited afterwards: generate --chat refuses it too, with exit 3 (bundle error).
    good, _ = factory.decoder_bundle("llama")
    evil = tmp_path / "evil-bundle"
    shutil.copytree(good, evil)
    manifest = json.loads((evil / "manifest.json").read_text())
    manifest["generation"]["chat_template"] = payload
    (evil / "manifest.json").write_text(json.dumps(manifest))
    r = CliRunner().invoke(cli, ["generate", str(evil), "hi", "--chat", "--max-new-tokens", "2"])
    assert r.exit_code != 0 and "Traceback" not in r.output and not marker.exists(), r.output
