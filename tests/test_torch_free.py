"""verify, infer and inspect run in a process where importing torch or transformers is impossible."""

from __future__ import annotations

import json
import subprocess
import sys

BLOCK = (
    "import sys\n"
    "for m in ('torch', 'transformers', 'peft', 'onnx', 'safetensors', 'optimum', 'pydantic', 'yaml'):\n"
    "    sys.modules[m] = None  # any import of these now raises ImportError\n"
    "from exporter.cli import main\n"
    "sys.argv = ['export-adapter'] + sys.argv[1:]\n"
    "try:\n"
    "    main()\n"
    "finally:\n"
    "    assert sys.modules.get('torch') is None\n"
)


def run_blocked(*args):
    return subprocess.run([sys.executable, "-c", BLOCK, *args], capture_output=True, text=True, timeout=300)


def test_verify_infer_inspect_without_torch(factory):
    out, _ = factory.bundle("bert", "text-classification")
    r = run_blocked("verify", str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["passed"] is True
    r = run_blocked("infer", str(out), "Great.", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["results"][0]["label"] in ("negative", "neutral", "positive")
    r = run_blocked("inspect", str(out))
    assert r.returncode == 0 and "text-classification" in r.stdout, r.stderr
    r = run_blocked("inspect", str(factory.adapter("bert", "text-classification")))
    assert r.returncode == 0 and "LORA" in r.stdout, r.stderr


def test_export_without_full_extra_says_so_in_one_line(factory, tmp_path):
    r = run_blocked("export", "--adapter", str(factory.adapter("bert", "text-classification")), "-o",
                    str(tmp_path / "o"))
    assert r.returncode == 1
    assert r.stderr.strip().startswith("error: export needs the full toolkit")
    assert "export-adapter[full]" in r.stderr and "Traceback" not in r.stderr


def test_full_commands_say_what_is_missing(tmp_path):
    for args in (["recipe", "check", "x.yaml"], ["recipe", "schema"], ["finetune", "x.yaml", "-o", str(tmp_path / "a")],
                 ["run", "x.yaml", "-o", str(tmp_path / "b")]):
        r = run_blocked(*args)
        assert r.returncode == 1, (args, r.stderr)
        assert r.stderr.startswith("error: ") and "needs the full toolkit" in r.stderr and "Traceback" not in r.stderr


def test_decoder_verify_and_generate_without_torch(factory):
    out, _ = factory.decoder_bundle("gpt2")
    r = run_blocked("verify", str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["variants"]["int4"]["passed"] is True
    r = run_blocked("generate", str(out), "Once upon a time", "--max-new-tokens", "5", "--variant", "int4")
    assert r.returncode == 0, r.stderr


def test_swappable_adapters_without_torch(factory):
    out, _ = factory.swap_bundle("encoder")
    r = run_blocked("verify", str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["variants"]["int8"]["adapters"]["second"]["passed"] is True
    r = run_blocked("infer", str(out), "Great.", "--adapter", "second", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["adapter"] == "second"
    out, _ = factory.swap_bundle("decoder")
    r = run_blocked("generate", str(out), "Once upon a time", "--max-new-tokens", "4", "--adapter", "first",
                    "--variant", "int4")
    assert r.returncode == 0, r.stderr


def test_public_api_on_the_device_side_without_torch(factory):
    """`import exporter` and its device names (BundleModel, verify_bundle, Report) work where torch cannot
    be imported; the build and train names are there too and say in one line what to install when called."""
    out, _ = factory.bundle("bert", "text-classification")
    code = (
        "import sys\n"
        "for m in ('torch', 'transformers', 'peft', 'onnx', 'safetensors', 'pydantic', 'yaml'):\n"
        "    sys.modules[m] = None\n"
        "import exporter\n"
        "report = exporter.verify_bundle(sys.argv[1])\n"
        "assert isinstance(report, exporter.Report) and report.passed, report\n"
        "print(exporter.BundleModel(sys.argv[1]).infer(['Great.'])[0]['label'])\n"
        "try:\n"
        "    exporter.export(sys.argv[1], sys.argv[1] + '-x')\n"
        "except exporter.MissingExtraError as e:\n"
        "    print('missing:', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    label, missing = r.stdout.splitlines()
    assert label in ("negative", "neutral", "positive")
    assert missing.startswith("missing: export needs the full toolkit"), missing


def test_public_api_names_resolve():
    import exporter

    for name in exporter.__all__:
        assert getattr(exporter, name) is not None, name
    assert exporter.Report is __import__("exporter.report", fromlist=["Report"]).Report
    try:
        exporter.no_such_thing  # noqa: B018
    except AttributeError as e:
        assert "no attribute 'no_such_thing'" in str(e)
    else:
        raise AssertionError("an unknown name must raise AttributeError")
