"""Bad input: one-line message naming the file and the fix, exit 1, no traceback, OUT untouched."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from helpers import assert_clean_failure, run_export
from safetensors.torch import load_file, save_file


@pytest.fixture
def adapter_copy(factory, tmp_path):
    src = factory.adapter("bert", "text-classification")
    dst = tmp_path / "adapter"
    shutil.copytree(src, dst)
    return dst


def test_missing_adapter_folder(tmp_path):
    r = run_export(tmp_path / "nope", tmp_path / "out")
    assert_clean_failure(r, tmp_path / "out", "nope", "not found")


def test_adapter_config_not_json(adapter_copy, tmp_path):
    (adapter_copy / "adapter_config.json").write_text("{not json")
    r = run_export(adapter_copy, tmp_path / "out")
    assert_clean_failure(r, tmp_path / "out", "adapter_config.json", "not valid JSON")


def test_adapter_config_missing_field(adapter_copy, tmp_path):
    cfg = json.loads((adapter_copy / "adapter_config.json").read_text())
    del cfg["target_modules"]
    (adapter_copy / "adapter_config.json").write_text(json.dumps(cfg))
    r = run_export(adapter_copy, tmp_path / "out")
    assert_clean_failure(r, tmp_path / "out", "target_modules")


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage"])
def test_corrupt_safetensors(adapter_copy, tmp_path, how):
    f = adapter_copy / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\x00" * 64}[how])
    r = run_export(adapter_copy, tmp_path / "out")
    assert_clean_failure(r, tmp_path / "out", "adapter_model.safetensors")


def test_adapter_for_another_base_names_key_shapes_and_recorded_base(factory, tmp_path):
    from helpers import make_adapter, make_base

    other = make_base("bert", tmp_path / "wide-base")
    # Same architecture, other width: a realistic "trained on another base".
    from transformers import AutoModel, BertConfig

    wide = AutoModel.from_config(BertConfig(vocab_size=200, hidden_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=37))
    wide.save_pretrained(other)
    adapter = make_adapter(other, "bert", "text-classification", tmp_path / "wide-adapter")
    r = run_export(adapter, tmp_path / "out", "--base", str(factory.base("bert")))
    assert_clean_failure(r, tmp_path / "out", "lora_A", "(4, 48)", "wide-base", "in=32")


def test_nan_in_adapter(adapter_copy, tmp_path):
    f = adapter_copy / "adapter_model.safetensors"
    t = load_file(f)
    key = next(k for k in t if "lora_B" in k)
    t[key][0, 0] = float("nan")
    save_file(t, f)
    r = run_export(adapter_copy, tmp_path / "out")
    assert_clean_failure(r, tmp_path / "out", key, "NaN")


def test_partial_adapter_refused(adapter_copy, tmp_path):
    f = adapter_copy / "adapter_model.safetensors"
    t = load_file(f)
    dropped = next(k for k in t if "layer.1" in k and "lora_A" in k)
    del t[dropped]
    save_file(t, f)
    r = run_export(adapter_copy, tmp_path / "out")
    assert_clean_failure(r, tmp_path / "out", "partial")


def test_pickle_adapter_refused_without_unpickling(adapter_copy, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (adapter_copy / "adapter_model.safetensors").unlink()
    with open(adapter_copy / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    r = run_export(adapter_copy, tmp_path / "out")
    assert_clean_failure(r, tmp_path / "out", "adapter_model.bin", "--allow-pickle")
    assert not marker.exists()
    # Even with the opt-in, weights_only=True refuses the malicious object.
    r = run_export(adapter_copy, tmp_path / "out", "--allow-pickle")
    assert_clean_failure(r, tmp_path / "out", "weights_only")
    assert not marker.exists()


def test_pickle_adapter_with_opt_in_loads_plain_tensors(factory, adapter_copy, tmp_path):
    t = load_file(adapter_copy / "adapter_model.safetensors")
    (adapter_copy / "adapter_model.safetensors").unlink()
    torch.save(t, adapter_copy / "adapter_model.bin")
    r = run_export(adapter_copy, tmp_path / "out", "--allow-pickle", "--quantize", "none")
    assert r.exit_code == 0, r.output


def test_head_missing_and_no_labels(factory, tmp_path):
    """A classification adapter saved without its head would export a random classifier: refused."""
    adapter = tmp_path / "adapter"
    shutil.copytree(factory.adapter("bert", "text-classification"), adapter)
    f = adapter / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(f).items() if ".lora_" in k}, f)
    (adapter / "export_adapter.json").unlink()
    r = run_export(adapter, tmp_path / "out")
    assert_clean_failure(r, tmp_path / "out", "classification head")
    r = run_export(adapter, tmp_path / "out", "--labels", "a,b")
    assert_clean_failure(r, tmp_path / "out", "classifier")


def test_unsupported_architecture_lists_supported(tmp_path, factory):
    base = tmp_path / "base"
    shutil.copytree(factory.base("bert"), base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["model_type"] = "fancy"
    cfg["auto_map"] = {"AutoModel": "modeling_fancy.FancyModel"}
    (base / "config.json").write_text(json.dumps(cfg))
    r = run_export(factory.adapter("bert", "text-classification"), tmp_path / "out", "--base", str(base))
    assert_clean_failure(r, tmp_path / "out", "'fancy'", "remote code", "bert, deberta-v2")


def test_labels_count_mismatch(factory, tmp_path):
    r = run_export(factory.adapter("bert", "text-classification"), tmp_path / "out", "--labels", "a,b")
    assert_clean_failure(r, tmp_path / "out", "2 label names", "3 outputs")


def test_missing_base_folder(factory, tmp_path):
    r = run_export(factory.adapter("bert", "text-classification"), tmp_path / "out", "--base", str(tmp_path / "gone"))
    assert_clean_failure(r, tmp_path / "out", "gone")


def test_base_without_tokenizer(factory, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(factory.base("bert"), base)
    for f in base.iterdir():
        if "token" in f.name or f.name in ("vocab.txt",):
            f.unlink()
    r = run_export(factory.adapter("bert", "text-classification"), tmp_path / "out", "--base", str(base))
    assert_clean_failure(r, tmp_path / "out", "tokenizer")


def test_int8_weights_on_a_decoder_is_refused(factory, tmp_path):
    r = run_export(factory.decoder_adapter("llama"), tmp_path / "out", "--int8-weights", "signed7")
    assert_clean_failure(r, tmp_path / "out", "--int8-weights is for encoders", "drop --int8-weights")
