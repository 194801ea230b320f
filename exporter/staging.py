"""Building a bundle beside OUT (build side): the disk checks before any work, the staging folder under OUT's
lock, publishing it when every gate passed or keeping it as OUT.rejected, and one line for a failed write."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .bundle import make_staging, output_lock, publish, reject
from .errors import ExporterError, FileSystemError, ParityError, UserInputError, describe_os_error
from .report import Report
from .stages import quiet_libraries


def staged(out: Path, overwrite: bool, build: Callable[[Path], dict[str, Any]],
            hint: Callable[[dict[str, Any]], str] = lambda report: "") -> Report:
    """Build in a staging folder beside OUT; publish it when every gate passed, else keep it as OUT.rejected."""
    with output_lock(out), quiet_libraries():
        try:
            staging = make_staging(out)
        except OSError as e:
            raise disk_error(e, out) from None
        try:
            report = build(staging)
            if report["passed"]:
                publish(staging, out, overwrite)
            else:
                rejected = reject(staging, out)
                raise ParityError(
                    f"parity gate failed ({'; '.join(first_failures(report))}); nothing was written to {out}, "
                    f"diagnostics are in {rejected}{hint(report)}",
                    report,
                )
        except OSError as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise disk_error(e, out) from None
        except (UserInputError, ParityError):
            shutil.rmtree(staging, ignore_errors=True)
            raise
        except ExporterError as e:
            # A library that hit a full disk often reports something else (onnx: "wire format was corrupt" on
            # the truncated file it wrote): when the staging filesystem is full, that is the cause to name.
            full = filesystem_full(staging)
            shutil.rmtree(staging, ignore_errors=True)
            if full:
                raise disk_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), out) from e
            raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return Report(report)


def filesystem_full(folder: Path) -> bool:
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < FULL_BYTES or (st.f_files > 0 and st.f_favail == 0)


# A filesystem with less than this free is full for our purposes: no graph or tensor file fits.
FULL_BYTES = 1 << 20


def disk_error(e: OSError, out: Path) -> ExporterError:
    """A write that failed halfway: one line naming the cause and the fix (staging is already removed). The
    staging folder's own path is gone by now, so the message names the bundle file and the folder OUT goes in."""
    where, member = out.absolute().parent, None
    if e.filename:
        failed = Path(str(e.filename)).absolute()
        if where in failed.parents:
            parts = failed.relative_to(where).parts
            if parts[0].startswith(f".{out.name}.staging"):
                member = "/".join(parts[1:]) or None
        else:  # a file outside OUT's folder (a library's temporary file)
            where = failed
    what = f"the bundle ({member})" if member else "the bundle"
    return FileSystemError(f"cannot write {what}: {describe_os_error(e, where)} (nothing was written to {out})")


# Export needs room for the fp32 graph and each variant beside it (staging), plus slack for the reference.
VARIANT_SIZE_FACTOR = {"fp32": 1.0, "fp16": 0.5, "int8": 0.3, "int4": 0.2}


def check_free_space(base, modes: tuple[str, ...], out: Path) -> None:
    """Refuse up front when the output's filesystem cannot hold the bundle: inodes always, bytes for local bases
    (estimated from their weight files)."""
    target = next((p for p in (out.resolve().parent, *out.resolve().parents) if p.exists()), Path.cwd())
    st = os.statvfs(target)
    if st.f_files > 0 and st.f_favail < BUNDLE_INODES:
        raise FileSystemError(f"no free inodes in {target} ({st.f_favail} left, a bundle needs about "
                              f"{BUNDLE_INODES}); delete files there or choose another -o")
    if not base.is_local:
        return
    weights = sum(f.stat().st_size for f in Path(base.location).glob("*.safetensors"))
    need = int(weights * sum(VARIANT_SIZE_FACTOR[m] for m in ("fp32", *modes)) * 1.1) + 50_000_000
    free = shutil.disk_usage(target).free
    if free < need:
        raise FileSystemError(
            f"not enough free space in {target}: the bundle needs about {need / 1e9:.1f} GB, {free / 1e9:.1f} GB "
            "is free; free space or choose another -o"
        )


# Files and folders of a bundle with staging and lock (a swappable bundle with many adapters has more; the
# write itself then reports the shortage).
BUNDLE_INODES = 64


def first_failures(report: dict[str, Any]) -> list[str]:
    return [f"{v}: {r['failures'][0]}" for v, r in report["variants"].items() if r["failures"]][:3]
