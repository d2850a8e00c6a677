"""ed25519 keys, key ids and signatures over canonical JSON (pynacl).

A key id is the lowercase hex sha256 of the raw 32-byte public key. A signature is the hex of
the 64-byte ed25519 signature of ``canonical_json(signed)``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import nacl.exceptions
import nacl.signing

from .canonical import canonical_json

__all__ = ["SIGNATURE_BYTES", "PublicKey", "SigningKey", "key_id"]

SIGNATURE_BYTES = 64  # an ed25519 signature


def key_id(public: bytes) -> str:
    return hashlib.sha256(public).hexdigest()


@dataclass(frozen=True)
class PublicKey:
    """A verifying key as listed in the trust root."""

    public: bytes
    name: str = ""

    @property
    def keyid(self) -> str:
        return key_id(self.public)

    def verify(self, signed: dict[str, Any], signature_hex: str) -> bool:
        return self.verify_bytes(canonical_json(signed), signature_hex)

    def verify_bytes(self, message: bytes, signature_hex: str) -> bool:
        """Check a signature of ``message`` (the canonical JSON of a ``signed`` object)."""
        if len(signature_hex) != 2 * SIGNATURE_BYTES:
            return False
        try:
            sig = bytes.fromhex(signature_hex)
            nacl.signing.VerifyKey(self.public).verify(message, sig)
        except (
            ValueError, TypeError, nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError
        ):
            return False
        return True


@dataclass(frozen=True)
class SigningKey:
    """A private key; ``seed`` is the 32-byte ed25519 seed."""

    seed: bytes
    name: str = ""

    @classmethod
    def generate(cls, name: str = "") -> SigningKey:
        return cls(bytes(nacl.signing.SigningKey.generate()), name)

    @property
    def public_key(self) -> PublicKey:
        return PublicKey(bytes(nacl.signing.SigningKey(self.seed).verify_key), self.name)

    @property
    def keyid(self) -> str:
        return self.public_key.keyid

    def sign(self, signed: dict[str, Any]) -> dict[str, str]:
        sig = nacl.signing.SigningKey(self.seed).sign(canonical_json(signed)).signature
        return {"keyid": self.keyid, "sig": sig.hex()}
