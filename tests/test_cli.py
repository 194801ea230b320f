"""The CLI over the library: exit codes, stdout/stderr split, --json, messages (CliRunner)."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from exporter import __version__
from exporter.cli import cli


@pytest.fixture
def runner():
    return CliRunner()


def test_version_and_help(runner):
    r = runner.invoke(cli, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output
    r = runner.invoke(cli, ["export", "--help"])
    assert r.exit_code == 0
    for opt in ("--adapter", "--base", "--quantize", "--opset", "--overwrite", "--json", "--allow-pickle"):
        assert opt in r.output


def test_usage_error_exits_2(runner):
    r = runner.invoke(cli, ["export", "--adapter", "x"])  # -o missing
    assert r.exit_code == 2
    r = runner.invoke(cli, ["export", "--adapter", "x", "-o", "y", "--quantize", "int3"])
    assert r.exit_code == 2


def test_export_json_then_verify_infer_inspect(runner, factory, tmp_path):
    adapter = factory.adapter("bert", "text-classification")
    out = tmp_path / "bundle"
    r = runner.invoke(cli, ["export", "--adapter", str(adapter), "-o", str(out), "--quantize", "int8", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["passed"] is True and report["command"] == "export"
    assert set(report["variants"]) == {"fp32", "int8"}
    assert "[export-adapter]" in r.stderr and "[export-adapter]" not in r.stdout
    assert json.loads((out / "parity.json").read_text())["variants"].keys() == report["variants"].keys()

    r = runner.invoke(cli, ["verify", str(out), "--json"])
    assert r.exit_code == 0, r.output
    v = json.loads(r.stdout)
    assert v["passed"] is True and set(v["variants"]) == {"fp32", "int8"}

    r = runner.invoke(cli, ["infer", str(out), "Great.", "Terrible.", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["variant"] == "int8"
    assert [x["label"] in ("negative", "neutral", "positive") for x in res["results"]] == [True, True]
    assert all(abs(sum(x["scores"].values()) - 1) < 1e-5 for x in res["results"])

    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text('{"text": "Great."}\n"plain string"\n\n')
    r = runner.invoke(cli, ["infer", str(out), "--input", str(jsonl), "--variant", "fp32"])
    assert r.exit_code == 0 and len(r.stdout.strip().splitlines()) == 2

    r = runner.invoke(cli, ["inspect", str(out), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["kind"] == "bundle"
    r = runner.invoke(cli, ["inspect", str(adapter), "--json"])
    info = json.loads(r.stdout)
    assert r.exit_code == 0 and info["kind"] == "adapter" and info["rank"] == 4 and info["adapted_modules"] == 4


def test_existing_out_refused_then_overwritten(runner, factory, tmp_path):
    adapter = factory.adapter("distilbert", "text-classification")
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = runner.invoke(cli, ["export", "--adapter", str(adapter), "-o", str(out), "-q"])
    assert r.exit_code == 1
    assert "already exists" in r.stderr and "--overwrite" in r.stderr
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces only a bundle (or an empty folder): a folder of the user's files is refused (issue 12).
    r = runner.invoke(cli, ["export", "--adapter", str(adapter), "-o", str(out), "-q", "--overwrite"])
    assert r.exit_code == 1 and "is not an export-adapter bundle" in r.stderr
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    for _ in range(2):  # into the empty folder, then over the bundle it wrote
        r = runner.invoke(cli, ["export", "--adapter", str(adapter), "-o", str(out), "-q", "--overwrite"])
        assert r.exit_code == 0, r.output
        assert (out / "manifest.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no staging or lock left behind


def test_verify_tampered_bundle_exits_3_and_names_file(runner, factory, tmp_path):
    out, _ = factory.bundle("bert", "text-classification")
    b = tmp_path / "b"
    shutil.copytree(out, b)
    data = bytearray((b / "onnx/model_quantized.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / "onnx/model_quantized.onnx").write_bytes(bytes(data))
    r = runner.invoke(cli, ["verify", str(b)])
    assert r.exit_code == 3
    assert "onnx/model_quantized.onnx" in r.stdout and "VERIFICATION FAILED" in r.stdout

    shutil.rmtree(b)
    shutil.copytree(out, b)
    (b / "tokenizer.json").unlink()
    r = runner.invoke(cli, ["verify", str(b), "--json"])
    assert r.exit_code == 3
    rep = json.loads(r.stdout)
    assert rep["passed"] is False and "tokenizer.json: missing" in rep["integrity"]["problems"]

    shutil.rmtree(b)
    shutil.copytree(out, b)
    m = json.loads((b / "manifest.json").read_text())
    m["labels"] = ["a", "b", "c"]
    (b / "manifest.json").write_text(json.dumps(m))
    r = runner.invoke(cli, ["verify", str(b), "--json"])
    assert r.exit_code == 3
    assert any("manifest.json" in p for p in json.loads(r.stdout)["integrity"]["problems"])


def test_verify_selected_variant_and_unknown_variant(runner, factory):
    out, _ = factory.bundle("bert", "text-classification")
    r = runner.invoke(cli, ["verify", str(out), "--variant", "fp16", "--json"])
    assert r.exit_code == 0 and list(json.loads(r.stdout)["variants"]) == ["fp16"]
    r = runner.invoke(cli, ["verify", str(out), "--variant", "int4"])
    assert r.exit_code == 1 and "no variant 'int4'" in r.stderr


def test_newer_schema_and_runtime_are_named(runner, factory, tmp_path):
    out, _ = factory.bundle("bert", "text-classification")
    for key, value, expect in (("schema_version", 99, "schema_version 99"), ("min_onnxruntime", "99.0", ">= 99.0")):
        b = tmp_path / key
        shutil.copytree(out, b)
        m = json.loads((b / "manifest.json").read_text())
        m[key] = value
        (b / "manifest.json").write_text(json.dumps(m))
        for cmd in (["verify", str(b)], ["infer", str(b), "hi"]):
            r = runner.invoke(cli, cmd)
            assert r.exit_code == 1 and expect in r.stderr, r.output
            assert "Traceback" not in r.output


def test_parity_failure_exits_3_publishes_nothing(runner, factory, tmp_path, monkeypatch):
    """A gate that fails keeps OUT untouched and leaves diagnostics in OUT.rejected."""
    adapter = factory.adapter("bert", "text-classification")
    out = tmp_path / "bundle"
    # A zero fp32 tolerance: the graph is close to PyTorch but not bit-identical, so the gate fails.
    strict = [x for name in ("atol", "atol_rms", "rtol") for x in ("--tolerance", f"fp32.{name}=0")]
    r = runner.invoke(cli, ["export", "--adapter", str(adapter), "-o", str(out), "--json", "-q", *strict])
    assert r.exit_code == 3, r.output
    assert not out.exists()
    rejected = tmp_path / "bundle.rejected"
    assert (rejected / "parity.json").exists() and (rejected / "parity.md").exists()
    assert "rejected" in r.stderr and "fp32" in r.stderr
    assert json.loads(r.stdout)["passed"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle.rejected"]
