"""Who may sign a run's audit trail, and who can check it.

- **Ed25519** (the default story, "prove it to someone else"): the owner holds a private key
  (``$AMINT_SIGNING_KEY``, a PEM file) while training; anyone holding only the public key (a PEM file,
  ``audit.public_key`` / ``$AMINT_PUBLIC_KEY``) verifies. A public key cannot forge a signature.
- **HMAC-SHA256** (optional, ``$AMINT_AUDIT_KEY``, a shared secret): whoever can check it can also forge it,
  so it proves only that a holder of the secret wrote the trail.

A :class:`Signer` signs entry hashes; a :class:`Verifier` lists what is wrong with an entry's signatures
for every key it holds. A verifier holding a key accepts no entry without a valid signature of that key:
an unsigned, partly signed or re-signed trail is refused, never downgraded to "unsigned".
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNING_KEY_ENV = "AMINT_SIGNING_KEY"  # path to the owner's Ed25519 private key (PEM, PKCS8)
PUBLIC_KEY_ENV = "AMINT_PUBLIC_KEY"  # path to the Ed25519 public key a verifier trusts (PEM)
HMAC_KEY_ENV = "AMINT_AUDIT_KEY"  # optional shared secret (HMAC-SHA256)
ED25519, HMAC = "ed25519", "hmac-sha256"  # the fields an entry's signatures are stored in: "sig", "hmac"


class SigningKeyError(ValueError):
    """A key file is missing, unreadable or not an Ed25519 key (one line naming the file)."""


def fingerprint(public: Ed25519PublicKey) -> str:
    """``sha256:<hex>`` of the raw 32-byte public key: what a report prints and an auditor compares."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def generate_keypair(directory: str | os.PathLike, name: str = "amint_signing_key") -> tuple[Path, Path]:
    """Write ``<name>.pem`` (private, mode 0600, never overwritten) and ``<name>.pub.pem``; return both paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    private_path, public_path = directory / f"{name}.pem", directory / f"{name}.pub.pem"
    for path in (private_path, public_path):
        if path.exists():
            raise FileExistsError(f"key file exists, not overwriting it: {path}")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path


def _read_key_file(path: str | os.PathLike, what: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise SigningKeyError(f"{what} not found: {path}")
    return path.read_bytes()


def load_private_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file."""
    try:
        key = serialization.load_pem_private_key(_read_key_file(path, "signing key"), password=None)
    except (ValueError, TypeError) as e:
        raise SigningKeyError(f"signing key {path} is not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"signing key {path} is not an Ed25519 key ({type(key).__name__})")
    return key


def load_public_key(path: str | os.PathLike) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file."""
    try:
        key = serialization.load_pem_public_key(_read_key_file(path, "public key"))
    except ValueError as e:
        raise SigningKeyError(f"public key {path} is not a PEM public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"public key {path} is not an Ed25519 key ({type(key).__name__})")
    return key


def _env_path(name: str) -> str | None:
    return os.environ.get(name) or None


def _hmac_secret() -> bytes | None:
    secret = os.environ.get(HMAC_KEY_ENV, "")
    return secret.encode() if secret else None


def _hmac(digest: str, secret: bytes) -> str:
    return hmac.new(secret, digest.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Verifier:
    """The keys a reader of a trail trusts: an Ed25519 public key and/or an HMAC secret (or none)."""

    public: Ed25519PublicKey | None = None
    hmac_secret: bytes | None = None

    @classmethod
    def from_env(cls, public_key: str | os.PathLike | None = None) -> Verifier:
        """``public_key`` (a path), else ``$AMINT_PUBLIC_KEY``, else the public half of ``$AMINT_SIGNING_KEY``;
        plus ``$AMINT_AUDIT_KEY``."""
        path = public_key or _env_path(PUBLIC_KEY_ENV)
        if path:
            public = load_public_key(path)
        else:
            private = _env_path(SIGNING_KEY_ENV)
            public = load_private_key(private).public_key() if private else None
        return cls(public, _hmac_secret())

    @property
    def holds_key(self) -> bool:
        return self.public is not None or self.hmac_secret is not None

    def describe(self) -> dict[str, Any]:
        """What this verifier checks, for a report (the fingerprint, never a secret)."""
        return {"ed25519": fingerprint(self.public) if self.public else None, "hmac": self.hmac_secret is not None}

    def problems(self, entry: dict[str, Any], digest: str) -> list[str]:
        """What is wrong with ``entry``'s signatures of ``digest`` for every key held ([] when all verify)."""
        found = []
        if self.public is not None:
            sig = entry.get("sig")
            if not sig:
                found.append("has no Ed25519 signature (unsigned or stripped)")
            elif not _ed25519_ok(self.public, str(sig), digest):
                found.append("Ed25519 signature does not verify with the public key given")
        if self.hmac_secret is not None:
            mac = entry.get("hmac")
            if not mac:
                found.append(f"has no HMAC ({HMAC_KEY_ENV}) signature (unsigned or stripped)")
            elif not hmac.compare_digest(str(mac), _hmac(digest, self.hmac_secret)):
                found.append(f"HMAC does not verify with {HMAC_KEY_ENV}")
        return found


def _ed25519_ok(public: Ed25519PublicKey, sig: str, digest: str) -> bool:
    try:
        public.verify(base64.b64decode(sig, validate=True), digest.encode())
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Signer:
    """The keys a training job signs its trail with (``$AMINT_SIGNING_KEY``, ``$AMINT_AUDIT_KEY``), or none."""

    private: Ed25519PrivateKey | None = None
    hmac_secret: bytes | None = None

    @classmethod
    def from_env(cls) -> Signer:
        path = _env_path(SIGNING_KEY_ENV)
        return cls(load_private_key(path) if path else None, _hmac_secret())

    @property
    def verifier(self) -> Verifier:
        """The verifier for this signer's own trail (resume checks the chain it continues)."""
        return Verifier(self.private.public_key() if self.private else None, self.hmac_secret)

    def declaration(self) -> dict[str, Any]:
        """The start entry's ``signing`` field: schemes and the public key's fingerprint and PEM."""
        declared: dict[str, Any] = {}
        if self.private is not None:
            public = self.private.public_key()
            declared[ED25519] = {"fingerprint": fingerprint(public), "public_key": public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()}
        if self.hmac_secret is not None:
            declared[HMAC] = True
        return declared

    def signatures(self, digest: str) -> dict[str, str]:
        """The signature fields of an entry whose hash is ``digest``."""
        fields = {}
        if self.private is not None:
            fields["sig"] = base64.b64encode(self.private.sign(digest.encode())).decode()
        if self.hmac_secret is not None:
            fields["hmac"] = _hmac(digest, self.hmac_secret)
        return fields
