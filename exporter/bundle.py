"""The bundle on disk: staging beside OUT, the manifest with hashes, atomic publish, reading it back.

Only this module touches the final output folder. Torch-free: the device side reads bundles with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import BundleError, OutputExistsError, UserInputError
from .loading import sha256_file

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
MANIFEST_SHA = "manifest.json.sha256"
PARITY_JSON = "parity.json"
PARITY_MD = "parity.md"
REFERENCE_DIR = "reference"
PROBES_JSON = f"{REFERENCE_DIR}/probes.json"
INPUTS_NPZ = f"{REFERENCE_DIR}/inputs.npz"
OUTPUTS_NPZ = f"{REFERENCE_DIR}/outputs.npz"
# The base model's outputs on the probes (no adapter), so a quantized variant can show it kept the adapter.
BASE_OUTPUTS_NPZ = f"{REFERENCE_DIR}/base_outputs.npz"


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """An exclusive lock beside OUT so two exports cannot race for it; released if the process dies."""
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out.parent / f".{out.name}.lock"
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputExistsError(
                f"{out}: another export is writing this folder right now; wait for it or choose another -o"
            ) from None
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
        os.close(fd)


def make_staging(out: Path) -> Path:
    """A fresh folder on the same filesystem as OUT, so publishing is a rename."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))


def check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it, or choose another -o")
    if out.exists() and not out.is_dir():
        raise UserInputError(f"{out} exists and is not a folder; choose another -o")


def publish(staging: Path, out: Path, overwrite: bool) -> None:
    """Swap the finished staging folder into place; an existing OUT is removed only after the swap."""
    if out.exists():
        check_out(out, overwrite)
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / "bundle")
        try:
            os.rename(staging, out)
        except BaseException:
            os.rename(old / "bundle", out)  # put the previous bundle back: OUT is never left missing
            shutil.rmtree(old, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, out)


def reject(staging: Path, out: Path) -> Path:
    """Keep a failed export's diagnostics in OUT.rejected (replacing an older one); OUT stays untouched."""
    rejected = out.with_name(out.name + ".rejected")
    if rejected.exists():
        shutil.rmtree(rejected)
    os.rename(staging, rejected)
    return rejected


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file in the bundle except the manifest and its checksum."""
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in (MANIFEST, MANIFEST_SHA)
    }


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n", encoding="utf-8")


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    write_json(root / MANIFEST, manifest)
    # Integrity, not security: anyone who can edit the manifest can edit this line too.
    (root / MANIFEST_SHA).write_text(f"{sha256_file(root / MANIFEST)}  {MANIFEST}\n", encoding="utf-8")


def read_manifest(root: Path) -> dict[str, Any]:
    """Load and check the manifest: a bundle, of a schema this version reads, on a new enough runtime."""
    root = Path(root)
    if not root.is_dir():
        raise UserInputError(f"{root}: bundle folder not found")
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"{root}: not a bundle ({MANIFEST} missing); pass the folder written by export")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON ({e}); the bundle is damaged, re-export it") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("schema_version"), int):
        raise BundleError(f"{path}: no schema_version; the bundle is damaged, re-export it")
    if manifest["schema_version"] > SCHEMA_VERSION:
        raise BundleError(
            f"{root}: bundle schema_version {manifest['schema_version']} is newer than this export-adapter "
            f"reads ({SCHEMA_VERSION}); upgrade export-adapter on this device"
        )
    need = manifest.get("min_onnxruntime")
    if need:
        import onnxruntime

        have = onnxruntime.__version__
        if _version_tuple(have) < _version_tuple(need):
            raise BundleError(
                f"{root}: needs onnxruntime >= {need} (opset {manifest.get('opset')}), this device has {have}; "
                "upgrade onnxruntime"
            )
    return manifest


def _version_tuple(v: str) -> tuple[int, ...]:
    parts = []
    for p in v.split("+")[0].split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_integrity(root: Path, manifest: dict[str, Any]) -> list[str]:
    """Every problem with the bundle's files, each naming the file; empty when intact."""
    problems = []
    sha_file = root / MANIFEST_SHA
    if not sha_file.is_file():
        problems.append(f"{MANIFEST_SHA}: missing")
    else:
        recorded = sha_file.read_text(encoding="utf-8").split()[:1]
        if recorded != [sha256_file(root / MANIFEST)]:
            problems.append(f"{MANIFEST}: does not match {MANIFEST_SHA} (edited after export)")
    for rel, digest in sorted((manifest.get("files") or {}).items()):
        p = root / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(p) != digest:
            problems.append(f"{rel}: sha256 differs from the manifest (modified or corrupted)")
    return problems
