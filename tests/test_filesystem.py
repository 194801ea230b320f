"""Issue 12, the system side: unreadable files, unwritable or read-only folders, a full disk and no free inodes
end in one line naming the path and the fix, with nothing half-written.

Root passes every permission check, so as root the commands run with CAP_DAC_OVERRIDE dropped (setpriv): the
kernel then applies a file's mode bits to root as to its owner. Read-only filesystems, full disks and inode
exhaustion are real tmpfs mounts; where this machine cannot mount, those tests are skipped and say why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import assert_clean_failure, run_export

from exporter.cli import cli

DROP = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search"]


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def _unprivileged_prefix() -> list[str]:
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permission bits cannot be enforced")
    probe = subprocess.run([*DROP, "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot drop CAP_DAC_OVERRIDE here ({probe.stderr.decode().strip()[:80]})")
    return DROP


def cli_without_override(*args: str) -> Result:
    """The CLI in a process whose permission checks are real (root loses CAP_DAC_OVERRIDE)."""
    proc = subprocess.run([*_unprivileged_prefix(), sys.executable, "-m", "exporter.cli", *args],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    return Result(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture()
def tmpfs(tmp_path):
    """mount(options) -> a fresh tmpfs folder; unmounted at the end."""
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()[:80]})")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], capture_output=True)


def test_an_unwritable_output_folder_is_refused_before_any_work(factory, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    out = locked / "sub" / "bundle"
    r = cli_without_override("export", "--adapter", str(factory.adapter("bert", "text-classification")),
                             "-o", str(out))
    locked.chmod(0o755)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    last = r.stderr.strip().splitlines()[-1]
    assert last == (f"error: -o {out}: cannot write in {locked} (permission denied); choose a folder you may write, "
                    "or fix its permissions"), r.stderr
    assert "merging" not in r.stderr  # refused up front, not after the export
    assert list(locked.iterdir()) == []


def test_a_read_only_filesystem_is_refused_before_any_work(factory, tmpfs):
    ro = tmpfs("size=10M,ro")
    out = ro / "bundle"
    r = run_export(factory.adapter("bert", "text-classification"), out)
    assert_clean_failure(r, out, f"{ro} is on a read-only filesystem", "choose a location on a writable one")


def test_no_free_inodes_is_refused_before_any_work(factory, tmpfs):
    fs = tmpfs("size=100M,nr_inodes=12")
    out = fs / "bundle"
    r = run_export(factory.adapter("bert", "text-classification"), out)
    assert_clean_failure(r, out, "no free inodes in", "delete files there or choose another -o")


# torch.onnx.export writes the tiny fp32 graph at ~450 kB before its node metadata is stripped (to ~180 kB), so
# 300k fills up inside torch.onnx.export. For the quantizer, another writer fills the disk once the fp32 graph is
# written, leaving 20 kB: int8 quantization then fails on the truncated file it wrote (onnx reports it as "wire
# format was corrupt").
@pytest.mark.parametrize("stage", ["export", "quantize"])
def test_a_disk_that_fills_during_the_export_is_named(factory, tmpfs, monkeypatch, stage):
    import exporter.pipeline as pipeline

    # Another writer fills the disk after the up-front free-space check passed.
    monkeypatch.setattr(pipeline, "check_free_space", lambda *a, **k: None)
    fs = tmpfs("size=300k" if stage == "export" else "size=2m")
    out = fs / "bundle"
    if stage == "quantize":
        quantize_all = pipeline.quantize_all

        def fill_then_quantize(*args, **kwargs):
            st = os.statvfs(fs)
            (fs / ".other-writer").write_bytes(b"\0" * max(st.f_bavail * st.f_frsize - 20_000, 0))
            return quantize_all(*args, **kwargs)

        monkeypatch.setattr(pipeline, "quantize_all", fill_then_quantize)
    r = CliRunner().invoke(cli, ["export", "--adapter", str(factory.adapter("bert", "text-classification")),
                                 "-o", str(out), "-q", "--quantize", "int8"])
    assert_clean_failure(r, out, f"{fs}: No space left on device",
                         "free some space (or inodes)", f"nothing was written to {out}")
    assert [p.name for p in fs.iterdir() if p.name != ".other-writer"] == []  # no staging folder, no lock


@pytest.mark.parametrize("member", ["tokenizer.json", "onnx/model_quantized.onnx", "reference/outputs.npz",
                                    "reference/probes.json", "manifest.json"])
def test_an_unreadable_bundle_file_is_one_line(bundle, member):
    (bundle / member).chmod(0)
    commands = [("verify", str(bundle)), ("infer", str(bundle), "fine", "--variant", "int8")]
    for args in commands:
        r = cli_without_override(*args)
        if member.startswith("reference/") and args[0] == "infer":
            assert r.exit_code == 0, r.output  # infer does not read the reference
            continue
        assert r.exit_code == 1 and "Traceback" not in r.output, (args, r.output)
        msg = r.stderr.strip()
        assert len(msg.splitlines()) == 1 and msg.startswith(f"error: {bundle / member}"), (args, msg)
        assert "ermission denied" in msg, msg


def test_unreadable_adapter_weights_say_permission_not_missing(factory, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(factory.adapter("bert", "text-classification"), adapter)
    (adapter / "adapter_model.safetensors").chmod(0)
    out = tmp_path / "bundle"
    r = cli_without_override("export", "--adapter", str(adapter), "-o", str(out), "-q")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.stderr.strip() == (f"error: {adapter / 'adapter_model.safetensors'}: cannot read it (permission denied); "
                                "check its permissions"), r.stderr
    assert not out.exists()
