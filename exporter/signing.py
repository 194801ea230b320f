"""Authenticity: a detached Ed25519 signature of manifest.json (which hashes every other file).

``export --sign KEY`` writes manifest.json.sig; ``verify --trusted-key PUB`` checks it before anything else
and refuses an unsigned or mis-signed bundle. manifest.json.sha256 only catches accidents: whoever can edit
the manifest can edit it too. Needs the ``cryptography`` package (the ``sign`` extra; part of ``full``).
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from .errors import MissingExtraError, TamperedBundleError, UserInputError
from .formats import MANIFEST, SIGNATURE

# Ed25519 signatures are 64 bytes; the file holds them base64-encoded with a short header line.
MAX_SIGNATURE_BYTES = 4096
# An encrypted private key is opened with this environment variable's value (never a command-line argument).
PASSWORD_ENV = "EXPORT_ADAPTER_SIGNING_PASSWORD"


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise MissingExtraError("signing needs the cryptography package: pip install 'export-adapter[sign]'") from None
    return serialization, ed25519, InvalidSignature


def _read(path: Path, what: str, limit: int = 1 << 16) -> bytes:
    try:
        data = Path(path).read_bytes()[: limit + 1]
    except FileNotFoundError:
        raise UserInputError(f"{what} {path}: not found") from None
    except OSError as e:
        raise UserInputError(f"{what} {path}: cannot be read ({e.strerror})") from None
    if len(data) > limit:
        raise UserInputError(f"{what} {path}: too large for a key file")
    return data


def key_id(public_raw: bytes) -> str:
    """A short fingerprint of a public key, for reports (sha256 of its 32 raw bytes, first 16 hex digits)."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


def _public_raw(key) -> bytes:
    serialization, _, _ = _crypto()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_private_key(path: Path):
    serialization, ed25519, _ = _crypto()
    password = os.environ.get(PASSWORD_ENV)
    try:
        key = serialization.load_pem_private_key(_read(path, "--sign key"), password.encode() if password else None)
    except TypeError:
        raise UserInputError(f"--sign {path}: the key is encrypted; set {PASSWORD_ENV} to its password") from None
    except ValueError:
        raise UserInputError(f"--sign {path}: not a PEM private key (or a wrong {PASSWORD_ENV}); make one with "
                             "`export-adapter keygen KEY.pem`") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise UserInputError(f"--sign {path}: not an Ed25519 key; bundles are signed with Ed25519 only")
    return key


def load_public_key(path: Path):
    serialization, ed25519, _ = _crypto()
    try:
        key = serialization.load_pem_public_key(_read(path, "--trusted-key"))
    except ValueError:
        raise UserInputError(f"--trusted-key {path}: not a PEM public key (the .pub.pem that keygen wrote)") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise UserInputError(f"--trusted-key {path}: not an Ed25519 public key")
    return key


def sign_bundle(root: Path, key_path: Path) -> str:
    """Write root/manifest.json.sig for the manifest as it is now; returns the signing key's id."""
    key = load_private_key(key_path)
    signature = key.sign((root / MANIFEST).read_bytes())
    kid = key_id(_public_raw(key.public_key()))
    (root / SIGNATURE).write_text(f"ed25519 {kid}\n{base64.b64encode(signature).decode()}\n", encoding="ascii")
    return kid


def check_signature(root: Path, public_key_path: Path) -> str:
    """The signer's key id when manifest.json carries a valid signature by this key; else TamperedBundleError
    (exit 3): unsigned, mis-signed, or signed by someone else."""
    _, _, invalid = _crypto()
    key = load_public_key(public_key_path)
    kid = key_id(_public_raw(key))
    sig_path = root / SIGNATURE
    if sig_path.is_symlink() or not sig_path.is_file():
        raise TamperedBundleError(f"{root}: not signed ({SIGNATURE} missing) but --trusted-key asks for a signature "
                                  f"by {kid}; refuse it, or re-export with --sign")
    raw = sig_path.read_bytes()[: MAX_SIGNATURE_BYTES + 1]
    try:
        header, body = raw.decode("ascii").split("\n")[:2]
        signature = base64.b64decode(body, validate=True)
        if not header.startswith("ed25519 "):
            raise ValueError(header)
    except ValueError:
        raise TamperedBundleError(f"{root / SIGNATURE}: not a signature file; the bundle is damaged or "
                                  "tampered with") from None
    manifest = root / MANIFEST
    if manifest.is_symlink() or not manifest.is_file():
        raise TamperedBundleError(f"{root}: {MANIFEST} missing or not a regular file")
    try:
        key.verify(signature, manifest.read_bytes())
    except invalid:
        raise TamperedBundleError(f"{root}: the signature does not match {MANIFEST} for the trusted key {kid}: the "
                                  "bundle changed after signing, or someone else signed it; do not use it") from None
    return kid


def keygen(private_path: Path) -> tuple[Path, Path]:
    """A new Ed25519 key pair: PRIVATE (mode 0600) and PRIVATE with .pub.pem for the devices."""
    serialization, ed25519, _ = _crypto()
    private_path = Path(private_path)
    public_path = private_path.with_name(private_path.name.removesuffix(".pem") + ".pub.pem")
    for p in (private_path, public_path):
        if p.exists():
            raise UserInputError(f"{p} already exists; choose another name (a key is never overwritten)")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path
