"""Signing key files: written once (0600, never overwritten), read with clear errors.

A private key file that group or others can access is refused (exit 2, like ssh), unless the
caller passes ``insecure_permissions`` (``--insecure-key-permissions``).

Private key file (JSON)::

    {"_type": "deltaship.private-key", "spec_version": 1, "scheme": "ed25519",
     "name": "...", "keyid": "<hex sha256 of the public key>", "seed": "<hex 32 bytes>"}

The public file is the same with ``_type: deltaship.public-key`` and ``public`` instead of
``seed``.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from manifest.errors import AlreadyExistsError, KeyFileError, TrustError
from manifest.metadata import Root
from manifest.signing import PublicKey, SigningKey

__all__ = [
    "check_key_permissions",
    "check_signers",
    "generate_key_files",
    "load_public_key",
    "load_signing_key",
    "load_signing_keys",
]


def _write_new(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError as e:
        raise AlreadyExistsError(f"{path} already exists: refusing to overwrite a key") from e
    except OSError as e:
        raise KeyFileError(f"cannot create {path}: {e.strerror}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def generate_key_files(out_dir: str | os.PathLike[str], name: str) -> tuple[Path, Path, str]:
    """Create ``NAME.key`` (0600) and ``NAME.pub`` in ``out_dir``; returns paths and key id."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = SigningKey.generate(name)
    priv_path, pub_path = out / f"{name}.key", out / f"{name}.pub"
    if priv_path.exists() or pub_path.exists():
        raise AlreadyExistsError(f"{priv_path} or {pub_path} already exists: refusing to overwrite")
    base = {"spec_version": 1, "scheme": "ed25519", "name": name, "keyid": key.keyid}
    priv = {**base, "_type": "deltaship.private-key", "seed": key.seed.hex()}
    pub = {**base, "_type": "deltaship.public-key", "public": key.public_key.public.hex()}
    _write_new(priv_path, json.dumps(priv, indent=2).encode() + b"\n", 0o600)
    _write_new(pub_path, json.dumps(pub, indent=2).encode() + b"\n", 0o644)
    return priv_path, pub_path, key.keyid


def _read(path: str | os.PathLike[str], what: str) -> dict[str, object]:
    try:
        doc = json.loads(Path(path).read_text("utf-8"))
    except FileNotFoundError as e:
        raise KeyFileError(f"{what} {path} does not exist") from e
    except OSError as e:
        raise KeyFileError(f"cannot read {what} {path}: {e.strerror}") from e
    except ValueError as e:
        raise KeyFileError(f"{path} is not a deltaship key file (bad JSON)") from e
    if not isinstance(doc, dict):
        raise KeyFileError(f"{path} is not a deltaship key file")
    return doc


def _key_bytes(path: str | os.PathLike[str], value: object, what: str) -> bytes:
    """32 bytes written in hex (an ed25519 seed or public key)."""
    try:
        raw = bytes.fromhex(str(value))
    except ValueError as e:
        raise KeyFileError(f"{path}: {what} is not hex") from e
    if len(raw) != 32:
        raise KeyFileError(f"{path}: {what} must be 32 bytes")
    return raw


def check_key_permissions(path: str | os.PathLike[str]) -> None:
    """Refuse a private key file that group or others may read or write (as ssh does).

    A missing file is left to the reader, which says so.
    """
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return
    except OSError as e:
        raise KeyFileError(f"cannot read private key {path}: {e.strerror}") from e
    if mode & 0o077:
        raise KeyFileError(
            f"private key {path} has mode {mode:04o}: group or others can access it; "
            f"run `chmod 600 {path}` (or pass --insecure-key-permissions)"
        )


def load_signing_key(
    path: str | os.PathLike[str], *, insecure_permissions: bool = False
) -> SigningKey:
    """The private key in ``path``; refused if group or others can access the file, unless
    ``insecure_permissions``."""
    doc = _read(path, "private key")
    if doc.get("_type") != "deltaship.private-key" or not isinstance(doc.get("seed"), str):
        hint = " (that is the public half: pass the .key file)" if "public" in doc else ""
        raise KeyFileError(f"{path} is not a deltaship private key{hint}")
    if not insecure_permissions:
        check_key_permissions(path)
    key = SigningKey(_key_bytes(path, doc["seed"], "the seed"), str(doc.get("name", "")))
    if doc.get("keyid") not in (None, key.keyid):
        raise KeyFileError(f"{path}: its keyid does not match its seed (corrupted file?)")
    return key


def load_public_key(path: str | os.PathLike[str]) -> PublicKey:
    doc = _read(path, "public key")
    if doc.get("_type") == "deltaship.private-key":
        return load_signing_key(path, insecure_permissions=True).public_key
    if doc.get("_type") != "deltaship.public-key" or not isinstance(doc.get("public"), str):
        raise KeyFileError(f"{path} is not a deltaship public key")
    return PublicKey(_key_bytes(path, doc["public"], "the public key"), str(doc.get("name", "")))


def load_signing_keys(
    paths: Sequence[Path], *, insecure_permissions: bool = False
) -> list[SigningKey]:
    """The keys given with ``--key`` (at least one); see :func:`load_signing_key`."""
    if not paths:
        raise KeyFileError("no signing key given: pass --key FILE (made by `keygen`)")
    return [load_signing_key(p, insecure_permissions=insecure_permissions) for p in paths]


def check_signers(
    root: Root, keys: Sequence[SigningKey], roles: str | Sequence[str], paths: Sequence[Path]
) -> None:
    """Check that ``keys`` (read from ``paths``) can sign for ``roles``: each key listed in one
    of those roles of the trust root, and enough of them for each role's threshold."""
    names = (roles,) if isinstance(roles, str) else tuple(roles)
    wanted = {kid for n in names for kid in root.roles[n].keyids}
    for key, path in zip(keys, paths, strict=True):
        if key.keyid not in wanted:
            raise TrustError(
                f"key {path} (id {key.keyid[:16]}) is not one of the trust root's "
                f"{' or '.join(repr(n) for n in names)} keys: use a key the store was "
                "initialised with"
            )
    given = {k.keyid for k in keys}
    for n in names:
        role = root.roles[n]
        have = len(given & set(role.keyids))
        if have < role.threshold:
            raise TrustError(
                f"the trust root needs {role.threshold} {n!r} signatures; the key(s) given "
                f"make {have}: pass more --key options (or use --draft FILE and `sign`)"
            )
