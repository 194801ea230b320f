"""Reliability: each bad input or fault fails safely (one line, exit code, OUT untouched, no staging left)."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import assert_clean_failure, run_export
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from exporter.cli import cli
from exporter.errors import ExporterError


@pytest.fixture
def adapter(factory, tmp_path):
    dst = tmp_path / "adapter"
    shutil.copytree(factory.adapter("bert", "text-classification"), dst)
    return dst


def edit_config(adapter: Path, **changes):
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.update(changes)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))


def edit_tensors(adapter: Path, fn):
    f = adapter / "adapter_model.safetensors"
    t = load_file(f)
    fn(t)
    save_file(t, f)


def test_config_from_a_newer_peft_goes_on_with_a_warning(adapter, tmp_path):
    edit_config(adapter, shiny_new_option=True)
    r = run_export(adapter, tmp_path / "out", "--json")
    assert r.exit_code == 0, r.output
    warnings = json.loads(r.stdout)["warnings"]
    assert any("shiny_new_option" in w and "newer peft" in w for w in warnings)


def test_zero_size_tensor_is_refused(adapter, tmp_path):
    edit_tensors(adapter, lambda t: t.__setitem__(next(k for k in t if "lora_A" in k), torch.zeros(0)))
    assert_clean_failure(run_export(adapter, tmp_path / "out"), tmp_path / "out", "zero size", "ZeRO-3")


def test_adapter_without_lora_weights_is_refused(adapter, tmp_path):
    edit_tensors(adapter, lambda t: [t.pop(k) for k in [k for k in t if ".lora_" in k]])
    assert_clean_failure(run_export(adapter, tmp_path / "out"), tmp_path / "out", "no LORA weights")


def test_adapter_targeting_a_module_the_base_lacks(adapter, tmp_path):
    def rename(t):
        k = next(k for k in t if "query.lora_A" in k)
        t[k.replace("query", "quarry")] = t.pop(k)
    edit_tensors(adapter, rename)
    assert_clean_failure(run_export(adapter, tmp_path / "out"), tmp_path / "out", "has no module", "quarry")


def test_unexpected_extra_key_is_refused(adapter, tmp_path):
    edit_tensors(adapter, lambda t: t.__setitem__("base_model.model.bert.encoder.layer.0.attention.self.key.lora_A.weight",
                                                  torch.ones(4, 32)))
    assert_clean_failure(run_export(adapter, tmp_path / "out"), tmp_path / "out", "matches no adapter module")


def test_nan_in_the_base_is_caught_before_any_onnx_file(factory, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(factory.base("bert"), base)
    w = load_file(base / "model.safetensors")
    key = next(k for k in w if "attention.self.value.weight" in k)
    w[key][0, 0] = float("inf")
    save_file(w, base / "model.safetensors")
    out = tmp_path / "out"
    r = run_export(factory.adapter("bert", "text-classification"), out, "--base", str(base))
    assert_clean_failure(r, out, "NaN or inf", "value.weight")


def test_disk_full_during_quantization(factory, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".out.staging-x1" / "onnx/model_quantized.onnx"))

    monkeypatch.setattr("exporter.quantize._int8", full)
    out = tmp_path / "out"
    r = run_export(factory.adapter("bert", "text-classification"), out)
    assert_clean_failure(r, out, f"cannot write the bundle (onnx/model_quantized.onnx): {tmp_path}: No space left on device",
                         "free some space (or inodes)")


def test_free_space_is_checked_before_a_large_export(factory, tmp_path, monkeypatch):
    class Tiny:
        free = 10_000

    monkeypatch.setattr("exporter.staging.shutil.disk_usage", lambda path: Tiny)
    out = tmp_path / "out"
    assert_clean_failure(run_export(factory.adapter("bert", "text-classification"), out), out, "not enough free space")


def test_reexport_with_overwrite_leaves_no_stale_external_data(factory, tmp_path, monkeypatch):
    """onnx.save appends to an existing external data file; staging is always fresh, so sizes stay equal."""
    from exporter.verify import verify_bundle

    monkeypatch.setattr("exporter.onnx_export.EXTERNAL_DATA_THRESHOLD", 0)
    out = tmp_path / "out"
    adapter = factory.adapter("bert", "text-classification")
    assert run_export(adapter, out, "--quantize", "none").exit_code == 0
    first = (out / "onnx/model.onnx.data").stat().st_size
    assert run_export(adapter, out, "--quantize", "none", "--overwrite").exit_code == 0
    assert (out / "onnx/model.onnx.data").stat().st_size == first
    assert verify_bundle(out)["passed"]


def test_no_tokenizer_export_and_its_limits(factory, tmp_path):
    from exporter.runtime import BundleModel
    from exporter.verify import verify_bundle

    base = tmp_path / "base"
    shutil.copytree(factory.base("bert"), base)
    for f in base.iterdir():
        if "token" in f.name:
            f.unlink()
    out = tmp_path / "out"
    adapter = factory.adapter("bert", "text-classification")
    r = run_export(adapter, out, "--base", str(base))
    assert_clean_failure(r, out, "no tokenizer files", "--no-tokenizer")
    r = run_export(adapter, out, "--base", str(base), "--no-tokenizer", "--json")
    assert r.exit_code == 0, r.output
    assert any("--no-tokenizer" in w for w in json.loads(r.stdout)["warnings"])
    assert not (out / "tokenizer.json").exists()
    assert verify_bundle(out)["passed"]
    r = CliRunner().invoke(cli, ["infer", str(out), "hello"])
    assert r.exit_code == 1 and "without a tokenizer" in r.stderr
    model = BundleModel(out, "fp32")
    ids = {"input_ids": torch.tensor([[2, 50, 60, 3]]).numpy(), "attention_mask": torch.ones(1, 4, dtype=torch.long).numpy(),
           "token_type_ids": torch.zeros(1, 4, dtype=torch.long).numpy()}
    assert model.run(ids)["logits"].shape == (1, 3)


# Fuzzing the parse/validate layer: the only outcomes are a valid result or a clean ExporterError.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=12,
)
RECIPE_KEYS = ["base", "task", "data", "lora", "training", "export", "tolerances", "revision", "trust_remote_code"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(RECIPE_KEYS) | st.text(max_size=8), json_values, max_size=6)
       | st.text(max_size=60))
def test_fuzz_recipe_yaml(tmp_path, doc):
    from exporter.recipes import Recipe, load_recipe

    path = tmp_path / "fuzz.yaml"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, allow_unicode=True))
    try:
        assert isinstance(load_recipe(path), Recipe)
    except ExporterError as e:
        assert str(e) and "\n" not in str(e)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["peft_type", "r", "target_modules", "lora_alpha", "task_type",
                                        "base_model_name_or_path", "modules_to_save", "rank_pattern"])
                       | st.text(max_size=8), json_values, max_size=7)
       | st.text(max_size=40))
def test_fuzz_adapter_config(factory, tmp_path_factory, cfg):
    from exporter.loading import inspect_adapter

    d = tmp_path_factory.mktemp("fuzz")
    shutil.copy(factory.adapter("bert", "text-classification") / "adapter_model.safetensors", d)
    (d / "adapter_config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    try:
        ref = inspect_adapter(d)
        json.dumps(ref.summary())  # what the manifest records must be well-formed too
    except ExporterError as e:
        assert str(e) and "\n" not in str(e)
