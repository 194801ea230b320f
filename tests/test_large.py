"""A model over 2 GB (protobuf's limit): external data, exported and verified from another directory. Slow."""

from __future__ import annotations

import os
import shutil

import pytest


@pytest.mark.slow
def test_export_over_2gb(tmp_path, monkeypatch):
    if shutil.disk_usage(tmp_path).free < 6e9:
        pytest.skip("needs ~6 GB free disk for a >2 GB model, its bundle and staging")
    import torch
    from helpers import tiny_tokenizer
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, BertConfig

    from exporter.pipeline import ExportSpec, run_pipeline
    from exporter.verify import verify_bundle

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=1024, num_hidden_layers=48, num_attention_heads=16,
                     intermediate_size=4096)  # ~604M parameters, ~2.4 GB in fp32
    base = tmp_path / "big-base"
    AutoModel.from_config(cfg).save_pretrained(base)
    tok.save_pretrained(base)
    pm = get_peft_model(AutoModel.from_pretrained(base),
                        LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False))
    pm.peft_config["default"].base_model_name_or_path = str(base)
    pm.save_pretrained(tmp_path / "adapter")
    del pm
    out = tmp_path / "bundle"
    report = run_pipeline(ExportSpec(adapter=tmp_path / "adapter", out=out, quantize=("none",),
                                     task="feature-extraction"))
    assert report.passed, report.data["variants"]
    assert (out / "onnx/model.onnx.data").stat().st_size > 2 * 1024**3
    assert (out / "onnx/model.onnx").stat().st_size < 50 * 1024**2
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert verify_bundle(os.path.relpath(out, elsewhere))["passed"]
