"""Issue 12: a bundle or adapter from a stranger, or a careless -o, can do no harm and ends in one line."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil

import pytest
from click.testing import CliRunner
from helpers import assert_clean_failure, run_export

from exporter.bundle import MANIFEST, MANIFEST_SHA, file_hashes, read_manifest, write_manifest
from exporter.cli import cli
from exporter.errors import BundleError


def _write_raw_manifest(root, manifest_text: str) -> None:
    """A tampered manifest whose checksum file matches (anyone who can edit one can edit the other)."""
    (root / MANIFEST).write_text(manifest_text)
    (root / MANIFEST_SHA).write_text(hashlib.sha256((root / MANIFEST).read_bytes()).hexdigest() + f"  {MANIFEST}\n")


def test_overwrite_never_deletes_a_folder_holding_the_adapter(factory, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(factory.adapter("bert", "text-classification"), work / "adapter")
    (work / "notes.txt").write_text("mine")
    r = run_export(work / "adapter", work, "--overwrite")
    assert r.exit_code == 1 and "holds an input of this export" in r.stderr
    assert (work / "adapter" / "adapter_model.safetensors").is_file() and (work / "notes.txt").is_file()


def test_output_is_never_the_current_folder(factory, tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    (here / "mine.txt").write_text("x")
    monkeypatch.chdir(here)
    r = run_export(factory.adapter("bert", "text-classification"), ".", "--overwrite")
    assert r.exit_code == 1 and "holds your work" in r.stderr and "Traceback" not in r.output
    assert (here / "mine.txt").is_file() and sorted(p.name for p in here.iterdir()) == ["mine.txt"]


def test_a_users_folder_named_like_the_rejected_one_is_kept(factory, tmp_path):
    out = tmp_path / "bundle"
    mine = tmp_path / "bundle.rejected"
    mine.mkdir()
    (mine / "thesis.tex").write_text("mine")
    strict = [x for name in ("atol", "atol_rms", "rtol") for x in ("--tolerance", f"fp32.{name}=0")]
    r = run_export(factory.adapter("bert", "text-classification"), out, *strict)
    assert r.exit_code == 3
    assert (mine / "thesis.tex").read_text() == "mine"
    diagnostics = [p for p in tmp_path.iterdir() if p.name.startswith("bundle.rejected-")]
    assert len(diagnostics) == 1 and (diagnostics[0] / "parity.json").exists()


@pytest.mark.parametrize("path", ["/etc/passwd", "../outside.txt", "reference/../../x", "./model.onnx", "a\\b"])
def test_manifest_paths_must_stay_inside_the_bundle(bundle, tmp_path, path):
    (tmp_path / "outside.txt").write_text("private")
    m = read_manifest(bundle)
    m["files"][path] = "0" * 64
    write_manifest(bundle, m)
    r = CliRunner().invoke(cli, ["verify", str(bundle)])
    assert r.exit_code == 3 and "Traceback" not in r.output
    assert "not a relative path inside the bundle" in r.output or "not a file path" in r.output
    # Whether the outside file exists is not told: the same words either way.
    assert "missing" not in r.output.split(path)[-1][:40]


def test_symlinks_in_a_bundle_are_refused_and_never_hashed(bundle, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("private key")
    os.symlink(secret, bundle / "notes.txt")  # unlisted: add-adapter used to hash it into the manifest
    with pytest.raises(BundleError, match="notes.txt is a symlink"):
        file_hashes(bundle)
    r = CliRunner().invoke(cli, ["verify", str(bundle)])
    assert r.exit_code == 3 and "notes.txt: is a symlink" in r.output
    # A listed file replaced by a symlink to a copy of itself still fails: it is not the bundle's file.
    b2 = tmp_path / "b2"
    shutil.copytree(bundle, b2, symlinks=True)
    (b2 / "notes.txt").unlink()
    shutil.copyfile(b2 / "config.json", tmp_path / "config.json")
    (b2 / "config.json").unlink()
    os.symlink(tmp_path / "config.json", b2 / "config.json")
    r = CliRunner().invoke(cli, ["verify", str(b2)])
    assert r.exit_code == 3 and "config.json: is a symlink" in r.output


def test_a_file_the_manifest_uses_must_be_hashed(bundle):
    m = read_manifest(bundle)
    del m["files"]["onnx/model_quantized.onnx"]
    write_manifest(bundle, m)
    r = CliRunner().invoke(cli, ["verify", str(bundle)])
    assert r.exit_code == 3 and "onnx/model_quantized.onnx: used by the manifest but not among its hashed files" in r.output


@pytest.mark.parametrize("mutate, needle", [
    (lambda m: m.pop("variants"), "missing 'variants'"),
    (lambda m: m.update(variants=[1, 2]), "variants: expected object"),
    (lambda m: m["variants"]["int8"].update(file=7), "variants.int8.file: expected string"),
    (lambda m: m.update(tokenizer="tok.json"), "tokenizer: expected object or null"),
    (lambda m: m["variants"]["int8"]["thresholds"].update(max_prob_diff="0.3"), "expected number"),
    (lambda m: m["variants"].update(int3=m["variants"]["int8"]), "int3"),
])
def test_a_manifest_that_breaks_its_schema_is_one_line_exit_3(bundle, mutate, needle):
    m = read_manifest(bundle)
    mutate(m)
    _write_raw_manifest(bundle, json.dumps(m))
    for command in (["verify", str(bundle)], ["infer", str(bundle), "hello"], ["inspect", str(bundle)]):
        r = CliRunner().invoke(cli, command)
        assert r.exit_code == 3, (command, r.output)
        assert needle in r.stderr and "Traceback" not in r.output and len(r.stderr.strip().splitlines()) == 1


def test_a_100000_deep_manifest_is_damage_not_a_recursion_error(bundle):
    _write_raw_manifest(bundle, "[" * 100_000 + "]" * 100_000)
    r = CliRunner().invoke(cli, ["verify", str(bundle)])
    assert r.exit_code == 3 and "not valid JSON" in r.stderr and "Traceback" not in r.output


def test_non_utf8_checksum_file_is_exit_3(bundle):
    (bundle / MANIFEST_SHA).write_bytes(b"\xff\xfe\x00 not a digest\n")
    r = CliRunner().invoke(cli, ["verify", str(bundle)])
    assert r.exit_code == 3 and "does not match manifest.json.sha256" in r.output


def test_fuzzed_manifests_never_end_in_a_traceback(bundle):
    """Random mutations of a real bundle's manifest (values replaced by other types, keys dropped, numbers
    scaled, strings turned into paths): verify and inspect end with exit 0, 1 or 3 and one line or a report."""
    original = read_manifest(bundle)
    rng = random.Random(0)
    weird = [None, -1, 1e308, "", "../../etc/passwd", [], {}, True, "x" * 300, 2**63]

    for _ in range(40):
        m = _mutate_json(json.loads(json.dumps(original)), rng, weird)
        _write_raw_manifest(bundle, json.dumps(m))
        for command in (["verify", str(bundle)], ["inspect", str(bundle)]):
            r = CliRunner().invoke(cli, command)
            assert r.exit_code in (0, 1, 3), (command, m, r.output)
            assert r.exception is None or isinstance(r.exception, SystemExit), (command, r.exception)


def test_signed_bundle_verifies_only_with_its_key_and_any_edit_breaks_it(factory, tmp_path):
    pytest.importorskip("cryptography")
    runner = CliRunner()
    r = runner.invoke(cli, ["keygen", str(tmp_path / "key.pem")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "key.pem").stat().st_mode & 0o777 == 0o600 and (tmp_path / "key.pub.pem").is_file()
    assert runner.invoke(cli, ["keygen", str(tmp_path / "key.pem")]).exit_code == 1  # never overwritten
    runner.invoke(cli, ["keygen", str(tmp_path / "other.pem")])
    out = tmp_path / "signed"
    r = run_export(factory.adapter("bert", "text-classification"), out, "--sign", str(tmp_path / "key.pem"))
    assert r.exit_code == 0, r.output
    assert (out / "manifest.json.sig").is_file()
    assert read_manifest(out)["spec"]["sign"] is True  # recorded as a choice, never the key's path
    r = runner.invoke(cli, ["verify", str(out), "--trusted-key", str(tmp_path / "key.pub.pem"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["signature"]["checked"] is True
    r = runner.invoke(cli, ["verify", str(out), "--trusted-key", str(tmp_path / "other.pub.pem")])
    assert r.exit_code == 3 and "someone else signed it" in r.stderr
    # Loosen a gate and re-write the checksum: integrity alone cannot tell, the signature can.
    m = read_manifest(out)
    m["variants"]["int8"]["thresholds"]["max_prob_diff"] = 1.0
    write_manifest(out, m)
    assert runner.invoke(cli, ["verify", str(out)]).exit_code == 0
    r = runner.invoke(cli, ["verify", str(out), "--trusted-key", str(tmp_path / "key.pub.pem")])
    assert r.exit_code == 3 and "changed after signing" in r.stderr and "Traceback" not in r.output


def test_trusted_key_refuses_an_unsigned_bundle_and_bad_keys_are_one_line(bundle, tmp_path):
    pytest.importorskip("cryptography")
    runner = CliRunner()
    runner.invoke(cli, ["keygen", str(tmp_path / "k.pem")])
    r = runner.invoke(cli, ["verify", str(bundle), "--trusted-key", str(tmp_path / "k.pub.pem")])
    assert r.exit_code == 3 and "not signed" in r.stderr
    (tmp_path / "junk.pem").write_text("not a key")
    r = runner.invoke(cli, ["verify", str(bundle), "--trusted-key", str(tmp_path / "junk.pem")])
    assert r.exit_code == 1 and "not a PEM public key" in r.stderr
    r = run_export(bundle, tmp_path / "o", "--sign", str(tmp_path / "junk.pem"))
    assert r.exit_code == 1 and "not a PEM private key" in r.stderr and not (tmp_path / "o").exists()


def _rehash(root) -> None:
    m = read_manifest(root)
    m["files"] = file_hashes(root)
    write_manifest(root, m)


def test_a_reference_npz_whose_header_lies_is_damage_not_a_memory_error(bundle):
    import zipfile

    import numpy as np

    path = bundle / "reference" / "outputs.npz"
    with zipfile.ZipFile(path, "w") as z, z.open("0.logits.npy", "w") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (2**40,)})
        f.write(b"\0" * 16)
    _rehash(bundle)
    r = CliRunner().invoke(cli, ["verify", str(bundle)])
    assert r.exit_code == 3 and "header claims" in r.stderr and "Traceback" not in r.output


def test_probes_json_not_utf8_is_exit_3(bundle):
    (bundle / "reference" / "probes.json").write_bytes(b'{"texts": ["\xff\xfe"]}')
    _rehash(bundle)
    r = CliRunner().invoke(cli, ["verify", str(bundle)])
    assert r.exit_code == 3 and "probes.json: cannot read probes" in r.stderr


@pytest.mark.parametrize("mutate, needle", [
    (lambda m: m.update(labels=m["labels"][:1]), "1 labels for 3 logits"),
    (lambda m: m.update(labels=["ok", "forged\nline", "x"]), "labels[1]"),
    (lambda m: m["outputs"][0].update(name="logitz"), "'logitz'"),
    (lambda m: m["tokenizer"].update(max_length=1e20), "tokenizer.max_length"),
    (lambda m: m["tokenizer"].update(pad_id=-1), "tokenizer.pad_id"),
])
def test_manifest_fields_that_do_not_fit_the_graph_are_exit_3_for_infer(bundle, mutate, needle):
    m = read_manifest(bundle)
    mutate(m)
    _write_raw_manifest(bundle, json.dumps(m))
    r = CliRunner().invoke(cli, ["infer", str(bundle), "hello there"])
    assert r.exit_code == 3, r.output
    assert needle in r.stderr and "Traceback" not in r.output


def test_a_fifo_in_place_of_a_model_does_not_hang_infer(bundle):
    import signal

    (bundle / "onnx/model_quantized.onnx").unlink()
    os.mkfifo(bundle / "onnx/model_quantized.onnx")
    signal.alarm(60)  # a hang would otherwise stall the suite
    try:
        r = CliRunner().invoke(cli, ["infer", str(bundle), "--variant", "int8", "hello"])
    finally:
        signal.alarm(0)
    assert r.exit_code == 3 and "not a regular file" in r.stderr


@pytest.mark.parametrize("args, needle", [(["--threads", "100000"], "cores"),
                                          (["--providers", "NoSuchExecutionProvider"], "not available here")])
def test_impossible_threads_or_providers_are_usage_errors(bundle, args, needle):
    commands = [["verify", str(bundle), *args]]
    if args[0] == "--threads":  # infer has no --providers
        commands.append(["infer", str(bundle), *args, "hi"])
    for command in commands:
        r = CliRunner().invoke(cli, command)
        assert r.exit_code == 2 and needle in r.stderr, (command, r.output)


def test_published_bundle_is_not_private_and_stale_staging_is_cleaned(factory, tmp_path):
    out = tmp_path / "bundle"
    stale = tmp_path / ".bundle.staging-killed"
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"x" * 1000)
    r = run_export(factory.adapter("bert", "text-classification"), out)
    assert r.exit_code == 0, r.output
    assert not stale.exists()
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask


def test_a_planted_lock_symlink_is_not_followed(factory, tmp_path):
    target = tmp_path / "victim.txt"
    target.write_text("keep")
    os.symlink(target, tmp_path / ".bundle.lock")
    r = run_export(factory.adapter("bert", "text-classification"), tmp_path / "bundle")
    assert r.exit_code == 1 and "is a symlink" in r.stderr
    assert target.read_text() == "keep"


def test_adapter_config_rank_that_is_not_the_weights_rank(factory, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(factory.adapter("bert", "text-classification"), adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["r"] = 4096
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    r = run_export(adapter, tmp_path / "out")
    assert r.exit_code == 1 and "r = 4096 but" in r.stderr and "has rank 4" in r.stderr


def test_target_modules_that_match_nothing_are_one_line(factory, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(factory.adapter("bert", "text-classification"), adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["target_modules"] = ["no_such_module"]
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    r = run_export(adapter, out)
    assert r.exit_code == 1 and "match no module" in r.stderr and "query" in r.stderr
    assert "Traceback" not in r.output and not out.exists()


def test_a_malformed_tokenizer_in_the_adapter_is_one_line(factory, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(factory.adapter("bert", "text-classification"), adapter)
    (adapter / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "WordPiece", "vocab": 5}}')
    out = tmp_path / "out"
    r = run_export(adapter, out)
    assert_clean_failure(r, out, "adapter adapter: no usable tokenizer")


def test_a_base_config_with_wrong_types_is_one_line(factory, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(factory.base("bert"), base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["num_attention_heads"] = "four"
    (base / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    r = run_export(factory.adapter("bert", "text-classification"), out, "--base", str(base))
    assert r.exit_code == 1, r.output
    assert_clean_failure(r, out, "config.json does not describe a valid bert model", "num_attention_heads")


def test_a_252_character_output_name_is_refused_up_front(factory, tmp_path):
    out = tmp_path / ("b" * 252)
    r = run_export(factory.adapter("bert", "text-classification"), out)
    assert_clean_failure(r, out, "the folder name is 252 bytes")


def test_infer_input_that_is_not_utf8(bundle, tmp_path):
    bad = tmp_path / "in.jsonl"
    bad.write_bytes(b'{"text": "caf\xe9"}\n')
    r = CliRunner().invoke(cli, ["infer", str(bundle), "--input", str(bad)])
    assert r.exit_code == 1 and "not UTF-8 text" in r.stderr and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["infer", str(bundle), "caf\udce9"])  # undecodable bytes from the shell
    assert r.exit_code == 2 and "is not valid UTF-8" in r.output


class OpenWatch:
    """Every open of a file in FOLDER, by any code in this process (Python, onnxruntime's C++, tokenizers' Rust):
    inotify sees the kernel's opens, which an audit hook would not."""

    IN_ACCESS, IN_OPEN = 0x1, 0x20

    def __init__(self, folder) -> None:
        import ctypes

        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK)
        if self.fd < 0 or self.libc.inotify_add_watch(self.fd, str(folder).encode(),
                                                      self.IN_OPEN | self.IN_ACCESS) < 0:
            pytest.skip("inotify is not available here")

    def opened(self) -> list[str]:
        import struct

        names = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return names
            at = 0
            while at < len(data):
                _wd, mask, _cookie, length = struct.unpack_from("iIII", data, at)
                name = data[at + 16:at + 16 + length].rstrip(b"\0").decode()
                names.append(f"{name or '.'}:{mask:#x}")
                at += 16 + length

    def close(self) -> None:
        os.close(self.fd)


def _leaves(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, (*path, i))
    yield path


def _mutate_json(data, rng, weird):
    paths = [p for p in _leaves(data) if p]
    for path in rng.sample(paths, min(2, len(paths))):
        parent = data
        try:
            for k in path[:-1]:
                parent = parent[k]
            if rng.random() < 0.3 and isinstance(parent, dict):
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = rng.choice(weird)
        except (KeyError, IndexError, TypeError):
            continue
    return data


def _mutate_npz(path, rng, outside):
    import numpy as np

    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    key = rng.choice(sorted(arrays))
    a = arrays[key]
    kind = rng.randrange(9)
    if kind == 0:
        arrays[key] = a[..., None]  # one more axis
    elif kind == 1:
        arrays[key] = a[:, :1] if a.ndim > 1 else a[:0]  # shorter
    elif kind == 2:
        arrays[key] = np.full(a.shape, 2**40 if a.dtype.kind == "i" else np.nan, dtype=a.dtype)  # ids/NaN
    elif kind == 3:
        arrays[key] = a.astype(np.float64 if a.dtype.kind == "i" else np.int64)
    elif kind == 4:
        del arrays[key]
    elif kind == 5:
        arrays["../" + key] = a
    elif kind == 6:
        arrays[key] = np.array([str(outside / "secret.txt")], dtype=object)  # needs unpickling to read
    if kind <= 6:
        np.savez(path, allow_pickle=kind == 6, **arrays)
    elif kind == 7:
        raw = bytearray(path.read_bytes())
        for _ in range(8):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        path.write_bytes(bytes(raw))
    else:
        path.write_bytes(path.read_bytes()[: rng.randrange(1, 400)])


def _mutate_bundle(b, target, rng, weird, outside) -> None:
    """One random mutation of TARGET in bundle B, re-hashed into the manifest so its checksums agree."""
    manifest = json.loads((b / MANIFEST).read_text())
    if target == "manifest":
        _mutate_json(manifest, rng, weird)
    elif target == "symlink":  # a bundle file replaced by a link out, with the link target's hash
        rel = rng.choice(sorted(r for r in manifest["files"] if not r.startswith("report/")))
        (b / rel).unlink()
        (b / rel).symlink_to(outside / "secret.txt")
        manifest["files"][rel] = hashlib.sha256(b"private").hexdigest()
    else:
        path = b / target
        if target.endswith(".npz"):
            _mutate_npz(path, rng, outside)
        elif rng.random() < 0.7:
            path.write_text(json.dumps(_mutate_json(json.loads(path.read_text()), rng, weird)))
        else:
            raw = bytearray(path.read_bytes())
            raw[rng.randrange(len(raw))] = rng.choice(b"\xff\x00\"{[")
            path.write_bytes(bytes(raw))
        if isinstance(manifest.get("files"), dict):
            manifest["files"][target] = hashlib.sha256(path.read_bytes()).hexdigest()
    _write_raw_manifest(b, json.dumps(manifest))


def _assert_clean_outcome(r, where, watch, report_command="verify") -> None:
    assert r.exit_code in (0, 1, 3), (where, r.output)
    assert r.exception is None or isinstance(r.exception, SystemExit), (where, repr(r.exception))
    assert "Traceback" not in r.output, (where, r.output)
    if r.exit_code:  # one error line, or verify's report naming what failed
        errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 or (where[1] == report_command and "FAIL" in r.stdout), (where, r.output)
    assert watch.opened() == [], (where, "opened a file outside the bundle")


def _outside(tmp_path):
    """A folder beside the bundle with files named like bundle files: nothing may ever open them."""
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("secret.txt", "model.onnx", "tokenizer.json", "outputs.npz"):
        (outside / name).write_text("private")
    return outside


WEIRD = [None, -1, 0, 1e308, float("inf"), "", "../outside/secret.txt", "model.int8.onnx", [], {}, True, "x" * 300,
         2**63, "\r\nforged line"]


@pytest.mark.parametrize("family, rounds", [("encoder", 49), ("decoder", 21)])
def test_fuzzed_bundle_files_never_traceback_or_read_outside_the_bundle(factory, tmp_path, family, rounds):
    """Random mutations of a real bundle's manifest, probes, reference arrays and tokenizer, re-hashed so the
    checksums agree (an attacker controls every file): verify, infer/generate and inspect end with exit 0, 1 or
    3 and one line, and nothing outside the bundle is ever opened (files there are named as bundle files)."""
    if family == "decoder":
        source, _ = factory.decoder_bundle("llama")
        run = ["generate", "--max-new-tokens", "4"]
    else:
        source, _ = factory.bundle("bert", "text-classification")
        run = ["infer"]
    outside = _outside(tmp_path)
    rng = random.Random(12)
    weird = [*WEIRD, str(outside / "model.onnx")]
    targets = ["manifest", "reference/probes.json", "reference/inputs.npz", "reference/outputs.npz",
               "reference/base_outputs.npz", "tokenizer.json", "symlink"]
    watch = OpenWatch(outside)
    seen: dict[str, int] = {}
    try:
        for round_ in range(rounds):
            b = tmp_path / f"b{round_}"
            shutil.copytree(source, b)
            target = targets[round_ % len(targets)]
            _mutate_bundle(b, target, rng, weird, outside)
            for command in (["verify", str(b)], [run[0], str(b), "fine", *run[1:]], ["inspect", str(b)]):
                r = CliRunner().invoke(cli, command)
                _assert_clean_outcome(r, (target, command[0], round_), watch)
                seen[f"{target}:{r.exit_code}"] = seen.get(f"{target}:{r.exit_code}", 0) + 1
            shutil.rmtree(b)
    finally:
        watch.close()
    # The mutations reached the checks rather than bouncing off the first one: every target was refused at
    # least once.
    assert all(any(k.startswith(f"{t}:") and not k.endswith(":0") for k in seen) for t in targets), seen


def test_fuzzed_swappable_bundles_never_traceback_in_add_adapter(factory, tmp_path):
    """The same mutations of a swappable bundle (its adapters' reference arrays too), then add-adapter: exit 0,
    1 or 3 with one line, nothing outside the bundle opened, and a refused bundle is left as it was."""
    from helpers import make_adapter

    source, _ = factory.swap_bundle("encoder")
    base = factory.base("bert")
    third = make_adapter(base, "bert", "text-classification", tmp_path / "third", r=2, seed=3)
    outside = _outside(tmp_path)
    rng = random.Random(7)
    weird = [*WEIRD, str(outside / "model.onnx")]
    items = read_manifest(source)["adapters"]["items"]
    targets = ["manifest", "reference/probes.json", "reference/inputs.npz", "reference/outputs.npz",
               items["first"]["reference"], "symlink"]
    watch = OpenWatch(outside)
    try:
        for round_ in range(12):
            b = tmp_path / f"b{round_}"
            shutil.copytree(source, b)
            target = targets[round_ % len(targets)]
            _mutate_bundle(b, target, rng, weird, outside)
            before = {p.relative_to(b).as_posix(): p.read_bytes() for p in b.rglob("*") if p.is_file() and not p.is_symlink()}
            r = CliRunner().invoke(cli, ["add-adapter", str(b), "--adapter", f"third={third}", "--base", str(base),
                                         "-q"])
            _assert_clean_outcome(r, (target, "add-adapter", round_), watch)
            if r.exit_code:
                after = {p.relative_to(b).as_posix(): p.read_bytes() for p in b.rglob("*") if p.is_file() and not p.is_symlink()}
                assert after == before, (target, round_)
            shutil.rmtree(b)
    finally:
        watch.close()
