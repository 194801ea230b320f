"""Publishing: external data, locks against racing exports, interruption leaves OUT untouched."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from click.testing import CliRunner

from exporter.bundle import output_lock
from exporter.cli import cli
from exporter.pipeline import ExportSpec, run_pipeline
from exporter.verify import verify_bundle


def test_external_data_bundle_verifies_from_another_directory(factory, tmp_path, monkeypatch):
    """Past the 2 GB protobuf limit weights go to one external data file; exercised here by lowering the limit."""
    monkeypatch.setattr("exporter.onnx_export.EXTERNAL_DATA_THRESHOLD", 0)
    out = tmp_path / "ext"
    report = run_pipeline(ExportSpec(adapter=factory.adapter("bert", "text-classification"), out=out,
                                     quantize=("int8", "fp16")))
    assert report.passed, report.data["variants"]
    manifest = json.loads((out / "manifest.json").read_text())
    for name, v in manifest["variants"].items():
        assert v["data_files"], name
        for f in [v["file"], *v["data_files"]]:
            assert f in manifest["files"] and (out / f).is_file()
    import onnx

    graph = onnx.load(str(out / "onnx/model.onnx"), load_external_data=False)
    external = [i for i in graph.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    # Relative to the graph's own folder (onnx/), as onnxruntime resolves it.
    assert external and {e.value for i in external for e in i.external_data if e.key == "location"} == {
        "model.onnx.data"}
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    assert verify_bundle(os.path.relpath(out, other))["passed"]
    # A flipped byte in the external data is caught by name.
    data = out / "onnx/model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0x01
    data.write_bytes(bytes(raw))
    report = verify_bundle(out)
    assert not report["passed"]
    assert any(p.startswith("onnx/model.onnx.data:") for p in report["integrity"]["problems"])
    assert report["variants"]["fp32"]["failures"] == ["not run: onnx/model.onnx.data failed the integrity check"]


def test_second_export_into_locked_out_fails_cleanly(factory, tmp_path):
    out = tmp_path / "bundle"
    with output_lock(out):
        r = CliRunner().invoke(cli, ["export", "--adapter", str(factory.adapter("bert", "text-classification")),
                                     "-o", str(out), "-q"])
    assert r.exit_code == 1
    assert "another export is writing" in r.stderr
    assert not out.exists()


def _interrupt_midway(adapter, out, sig):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "exporter.cli", "export", "--adapter", str(adapter), "-o",
                             str(out), "--quantize", "fp16"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    deadline = time.monotonic() + 120
    for line in proc.stderr:  # wait until the export stage has started writing into staging
        if "exporting to ONNX" in line or time.monotonic() > deadline:
            break
    time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_sigterm_and_sigint_leave_nothing_behind(factory, tmp_path):
    # DistilBERT: traced (seconds of export to interrupt); BERT's graph is written in a blink (encoder_graph.py).
    adapter = factory.adapter("distilbert", "text-classification")
    for sig, code, word in ((signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")):
        out = tmp_path / f"out-{code}"
        rc, err = _interrupt_midway(adapter, out, sig)
        assert rc == code, err
        assert word in err and "Traceback" not in err
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((out.name, f".{out.name}"))) == []
