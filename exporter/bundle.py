"""The bundle on disk: staging beside OUT, the manifest with hashes, atomic publish, reading it back.

Only this module touches the final output folder. Torch-free: the device side reads bundles with it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import (
    BundleError,
    FileSystemError,
    OutputExistsError,
    TamperedBundleError,
    UserInputError,
    describe_os_error,
)
from .formats import MANIFEST, MANIFEST_SHA, SCHEMA_VERSION, SIGNATURE, sha256_file
from .schema import MANIFEST_SCHEMA

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
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FileSystemError(f"cannot create the folder for -o {out}: {describe_os_error(e)}") from None
    # Keyed by the resolved path (two exports through a symlinked folder are one OUT), and never through a
    # planted symlink (O_NOFOLLOW: the lock would otherwise create or truncate its target).
    real = out.parent.resolve() / out.name
    lock_path = real.parent / f".{real.name}.lock"
    try:
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserInputError(f"{lock_path} is a symlink; remove it (the lock is never followed)") from None
        raise FileSystemError(f"cannot write beside -o {out}: {describe_os_error(e, lock_path.parent)}") from None
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
    """A fresh folder on the same filesystem as OUT, so publishing is a rename. Called under OUT's lock, so any
    older staging folder of OUT is a leftover of a killed export (SIGKILL, power loss): removed first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{glob.escape(out.name)}.staging-*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))


# File systems allow 255-byte names; ".NAME.staging-XXXXXXXX" and "NAME.rejected-XXXXXXXX" add up to 25.
MAX_OUT_NAME = 230


def is_bundle(folder: Path) -> bool:
    """A folder this tool wrote: its manifest names export-adapter (an empty folder also counts as replaceable)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and str(manifest.get("created_by", "")).startswith("export-adapter")


def check_out(out: Path, overwrite: bool, inputs: tuple[Path, ...] = ()) -> None:
    """OUT may be new, or (with --overwrite) an earlier bundle or an empty folder: never a folder of the user's
    own files, never `.`, `/`, the home folder or one of their parents, never a folder holding an input."""
    if len(out.name.encode()) > MAX_OUT_NAME:
        raise UserInputError(f"-o {out.name[:40]}...: the folder name is {len(out.name.encode())} bytes; the staging "
                             f"folder and lock beside it add up to 25, so use at most {MAX_OUT_NAME}")
    target = out.resolve()
    protected = {Path("/"), Path.home().resolve(), Path.cwd().resolve()}
    if target in protected or any(target in p.parents for p in protected):
        raise UserInputError(f"-o {out}: is {target}, which holds your work (the current, home or root folder, or "
                             "a parent of one); choose a new folder for the bundle")
    for item in inputs:
        src = Path(item).resolve()
        if src == target or target in src.parents:
            raise UserInputError(f"-o {out}: holds an input of this export ({item}); choose another folder")
        if src.is_dir() and src in target.parents:
            raise UserInputError(f"-o {out}: is inside an input folder of this export ({item}); choose another "
                                 "folder")
    _check_writable(out)
    if not out.exists():
        return
    if not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it, or choose another -o")
    if out.is_symlink() or not out.is_dir():
        raise UserInputError(f"{out} exists and is not a folder; choose another -o")
    if not is_bundle(out) and any(out.iterdir()):
        raise UserInputError(f"-o {out}: exists and is not an export-adapter bundle (no manifest of ours); "
                             "--overwrite only replaces a bundle or an empty folder, choose another -o")


def _check_writable(out: Path) -> None:
    """Refuse before any work when the folder OUT goes in cannot be written (the export would fail at its end)."""
    parent = next((p for p in (out.absolute().parent, *out.absolute().parents) if p.exists()), None)
    if parent is None:
        return
    try:
        read_only = bool(os.statvfs(parent).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        raise FileSystemError(f"-o {out}: {parent} is on a read-only filesystem; choose a location on a writable one")
    # access() honours the caller's real permissions (root passes, as its writes would).
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FileSystemError(f"-o {out}: cannot write in {parent} (permission denied); choose a folder you may "
                              "write, or fix its permissions")


def publish(staging: Path, out: Path, overwrite: bool) -> None:
    """Swap the finished staging folder into place; an existing OUT is removed only after the swap."""
    # mkdtemp made staging 0700; a published bundle is a normal folder (others may read it, as the umask says).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
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
    if rejected.exists() and (is_bundle(rejected) or not any(rejected.iterdir())):
        shutil.rmtree(rejected)
    elif rejected.exists():  # a folder of the user's that happens to have that name: keep it
        rejected = Path(tempfile.mkdtemp(prefix=f"{out.name}.rejected-", dir=out.parent))
        os.rmdir(rejected)
    os.rename(staging, rejected)
    return rejected


# No file in a bundle is larger than this (a 2 GB graph keeps its weights in one external data file; 64 GiB
# covers a 30B model in fp16). A manifest naming a larger file is not hashed at all.
MAX_FILE_BYTES = 64 << 30
# A manifest is a few kB (a swappable bundle with many adapters some 100 kB); a larger one is not parsed.
MAX_MANIFEST_BYTES = 16 << 20


def member_problem(root: Path, rel: object) -> str | None:
    """Why a path a manifest names cannot be a bundle file (it is untrusted), or None. A bundle file is a
    relative, normalised path inside the bundle to a regular file (no symlink anywhere on the way, no FIFO or
    device) within MAX_FILE_BYTES."""
    import posixpath
    import stat

    if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel:
        return f"{rel!r}: not a file path"
    if rel.startswith("/") or posixpath.normpath(rel) != rel or rel.split("/")[0] in ("..", "."):
        return f"{rel}: not a relative path inside the bundle"
    here = root
    for part in rel.split("/"):
        here = here / part
        try:
            st = os.lstat(here)
        except FileNotFoundError:
            return f"{rel}: missing"
        except OSError as e:
            return f"{rel}: cannot be read ({e.strerror})"
        if stat.S_ISLNK(st.st_mode):
            return f"{rel}: is a symlink (a bundle holds only regular files)"
    if not stat.S_ISREG(st.st_mode):
        return f"{rel}: not a regular file"
    if st.st_size > MAX_FILE_BYTES:
        return f"{rel}: {st.st_size} bytes, over the {MAX_FILE_BYTES >> 30} GiB a bundle file may have"
    return None


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file in the bundle except the manifest and its checksum. A symlink or any other
    non-regular entry is refused: hashing it would vouch for whatever it points at."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink() or not (p.is_dir() or p.is_file()):
            raise BundleError(f"{root}: {rel} is a symlink or not a regular file; a bundle holds only regular "
                              "files, remove it")
        if p.is_file() and rel not in (MANIFEST, MANIFEST_SHA, SIGNATURE):
            out[rel] = sha256_file(p)
    return out


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
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise TamperedBundleError(f"{path}: {path.stat().st_size} bytes, far larger than a manifest; the bundle is "
                                  "damaged or tampered with, re-export it")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise TamperedBundleError(f"{path}: not valid JSON ({str(e)[:80]}); the bundle is damaged, re-export "
                                  "it") from None
    except OSError as e:
        raise BundleError(f"{path}: cannot be read ({e.strerror})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("schema_version"), int):
        raise TamperedBundleError(f"{path}: no schema_version; the bundle is damaged, re-export it")
    if manifest["schema_version"] > SCHEMA_VERSION:
        raise BundleError(
            f"{root}: bundle schema_version {manifest['schema_version']} is newer than this export-adapter "
            f"reads ({SCHEMA_VERSION}); upgrade export-adapter on this device"
        )
    from .validate import schema_errors

    errors = schema_errors(manifest, MANIFEST_SCHEMA)
    if errors:
        raise TamperedBundleError(f"{path}: {errors[0]}" + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")
                                  + "; the manifest breaks its schema: the bundle is damaged or tampered with, "
                                  "re-export it")
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
    if (root / SIGNATURE).is_symlink():
        problems.append(f"{SIGNATURE}: is a symlink")
    sha_problem = member_problem(root, MANIFEST_SHA)
    if sha_problem:
        problems.append(sha_problem)
    else:
        # bytes, not text: a flipped byte here is a damaged bundle (exit 3), not a UnicodeDecodeError
        recorded = (root / MANIFEST_SHA).read_bytes().split()[:1]
        if recorded != [sha256_file(root / MANIFEST).encode()]:
            problems.append(f"{MANIFEST}: does not match {MANIFEST_SHA} (edited after export)")
    files = manifest.get("files")
    if not isinstance(files, dict):
        return [*problems, f"{MANIFEST}: files is not an object of path -> sha256"]
    for rel, digest in sorted(files.items()):
        problem = member_problem(root, rel)
        if problem:
            problems.append(problem)
        elif sha256_file(root / rel) != digest:
            problems.append(f"{rel}: sha256 differs from the manifest (modified or corrupted)")
    listed = set(files)
    for rel in sorted(referenced_files(manifest)):
        if rel not in listed:
            problems.append(f"{rel}: used by the manifest but not among its hashed files (tampered)")
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            problems.append(f"{p.relative_to(root).as_posix()}: is a symlink (a bundle holds only regular files)")
    return problems


def referenced_files(manifest: dict[str, Any]) -> set[str]:
    """Every file the manifest points a reader at (variants, reference, tokenizer, adapters)."""
    out: set[str] = set()

    def add(x: object) -> None:
        if isinstance(x, str):
            out.add(x)

    for entry in (manifest.get("variants") or {}).values():
        if isinstance(entry, dict):
            add(entry.get("file"))
            add(entry.get("ort_file"))
            for d in entry.get("data_files") or []:
                add(d)
    for key in ("probes", "inputs", "outputs", "base_outputs"):
        add((manifest.get("reference") or {}).get(key))
    add((manifest.get("tokenizer") or {}).get("file"))
    for item in ((manifest.get("adapters") or {}).get("items") or {}).values():
        if isinstance(item, dict):
            add(item.get("file"))
            add(item.get("reference"))
    return out
