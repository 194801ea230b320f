"""The library's exception hierarchy.

Every error a user can cause is an ``ExporterError`` with a one-line message that names the problem and
the fix; the CLI prints ``error: <message>`` and exits with ``exit_code``. Anything else escaping the library
is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os

# The CLI's exit codes (docs/exit-codes.md): 130/143 are the shell's 128 + SIGINT/SIGTERM.
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_PARITY, EXIT_SIGINT, EXIT_SIGTERM = 0, 1, 2, 3, 130, 143


class ExporterError(Exception):
    """Base class: a failure the user can act on."""

    exit_code = 1


class UserInputError(ExporterError):
    """A path, flag or file the user gave is missing or malformed."""


class UsageError(UserInputError):
    """A command-line value that cannot work here (a provider this machine lacks, more threads than cores)."""

    exit_code = 2


class UnsafeFormatError(ExporterError):
    """A file would need unpickling (arbitrary code execution) and the user has not opted in."""


class MismatchError(ExporterError):
    """The adapter does not fit the base model (missing module, wrong shape, wrong base)."""


class NonFiniteError(ExporterError):
    """NaN or inf in the base, the adapter or the merged weights."""


class UnsupportedError(ExporterError):
    """An architecture, task or adapter type this version cannot export."""


class MissingExtraError(ExporterError):
    """The command needs the full toolkit (torch, transformers, peft, onnx) and only the device profile is installed."""


class OutputExistsError(ExporterError):
    """OUT exists and --overwrite was not given, or another export holds its lock."""


class FileSystemError(ExporterError):
    """The operating system refused a read or a write: permissions, a read-only filesystem, no space or inodes."""


# What the user can do about the system errors a run meets; anything else is named by its strerror.
_OS_ERROR_FIXES = {
    errno.EACCES: "check its permissions, or run as a user who may use it",
    errno.EPERM: "check its permissions, or run as a user who may use it",
    errno.EROFS: "the filesystem is read-only; choose a location on a writable one",
    errno.ENOSPC: "free some space (or inodes) on that device, or choose another location",
    errno.EDQUOT: "your disk quota is used up; free some space or choose another location",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n)",
    errno.EIO: "the device reported an I/O error; check the disk",
}


def describe_os_error(e: OSError, path: object = None) -> str:
    """One line for an OSError: the path, the system's words, the fix."""
    where = path if path is not None else (e.filename if e.filename is not None else "a file")
    reason = e.strerror or (os.strerror(e.errno) if e.errno else type(e).__name__)
    fix = _OS_ERROR_FIXES.get(e.errno or -1)
    return f"{where}: {reason}" + (f"; {fix}" if fix else "")


class BundleError(ExporterError):
    """A bundle cannot be read: not a bundle, newer schema, runtime too old."""


class TamperedBundleError(BundleError):
    """A bundle's own files contradict its contract (a manifest that is not valid JSON or breaks its schema): it
    was damaged or tampered with, which verification reports as a failure (exit 3), like a flipped byte."""

    exit_code = 3


class ParityError(ExporterError):
    """A parity gate or a bundle verification failed. Carries the report."""

    exit_code = 3

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = report


FULL_MODULES = ("torch", "transformers", "peft", "onnx", "safetensors")
RECIPE_MODULES = ("yaml", "pydantic")


def require_full(feature: str, modules: tuple[str, ...] = FULL_MODULES) -> None:
    """Fail with one line when the full toolkit is missing, instead of an ImportError deep in a stage."""
    missing = []
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise MissingExtraError(
            f"{feature} needs the full toolkit ({', '.join(missing)} not installed); "
            "install it with: pip install -c constraints.txt 'export-adapter[full]'"
        )
