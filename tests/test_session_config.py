"""Session options a bundle carries (manifest "session"): parity runs with them, and infer, verify and bench use
them; only the entries formats.SESSION_CONFIG_VALUES lists get in, from the CLI or from a stranger's manifest."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from exporter.cli import cli

KEY = "session.intra_op.allow_spinning"


@pytest.fixture(scope="module")
def spun(factory, tmp_path_factory):
    from exporter import ExportSpec, run_pipeline

    out = tmp_path_factory.mktemp("session") / "b"
    report = run_pipeline(ExportSpec(adapter=factory.adapter("bert", "text-classification"), out=out,
                                     quantize=("int8",), session_config=((KEY, "0"),)))
    assert report["passed"], report
    return out


def test_the_manifest_records_the_options_and_sessions_run_with_them(spun):
    from exporter.runtime import BundleModel

    manifest = json.loads((spun / "manifest.json").read_text())
    assert manifest["session"] == {"config": {KEY: "0"}}
    assert manifest["spec"]["session_config"] == {KEY: "0"}
    for variant in ("fp32", "int8"):
        options = BundleModel(spun, variant).session.get_session_options()
        assert options.get_session_config_entry(KEY) == "0", variant
    r = CliRunner().invoke(cli, ["verify", str(spun), "--json"])
    assert r.exit_code == 0, r.output


def test_bench_records_the_bundles_options_and_its_own_override(spun):
    def config(*extra: str) -> dict:
        r = CliRunner().invoke(cli, ["bench", str(spun), "--variant", "int8", "--shape", "1x8", "--rounds", "1",
                                     "--warmup", "0", "--no-memory", "--json", *extra])
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)["session_config"]

    assert config() == {KEY: "0"}
    assert config("--session-config", f"{KEY}=1") == {KEY: "1"}


def test_export_refuses_an_option_a_bundle_may_not_carry():
    r = CliRunner().invoke(cli, ["export", "--adapter", "nowhere", "-o", "out",
                                 "--session-config", "ep.context_file_path=/tmp/x"])
    assert r.exit_code == 2
    assert "ep.context_file_path: not a session option a bundle may carry" in r.output
    r = CliRunner().invoke(cli, ["export", "--adapter", "nowhere", "-o", "out", "--session-config", f"{KEY}=yes"])
    assert r.exit_code == 2 and f"{KEY}=yes: use one of 0, 1" in r.output


@pytest.mark.parametrize("config", ["context file", {KEY: "maybe"}])
def test_a_manifest_with_other_options_is_refused_before_any_session(spun, tmp_path, config):
    from exporter.formats import sha256_file

    if config == "context file":  # what would make onnxruntime write an EP context model where the bundle says
        config = {"ep.context_enable": "1", "ep.context_file_path": str(tmp_path / "written-by-a-bundle")}
    bundle = tmp_path / "b"
    shutil.copytree(spun, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["session"]["config"] = config
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    # A consistent checksum: the stranger rewrote that too; the schema is what must stop it.
    (bundle / "manifest.json.sha256").write_text(f"{sha256_file(bundle / 'manifest.json')}  manifest.json\n")
    for command in (["infer", str(bundle), "great"], ["verify", str(bundle)]):
        r = CliRunner().invoke(cli, command)
        assert r.exit_code == 3, (command, r.output)  # a tampered bundle fails verification (docs/exit-codes.md)
        assert "session.config" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "written-by-a-bundle").exists()
