"""The customer-key secret: the key format and tag, the hash at rest, the signature of
cached verifications, and rotation to a new secret.

Key format: "ak_" + base64url(32 random bytes || 6-byte tag), where the tag is an HMAC
of the random part under the secret. Every use of the secret has its own subkey, derived
from it under a distinct label, so no value made for one purpose is valid for another.

Rotation: `server.key_secret_previous_env` names a second secret that is still accepted.
A key whose tag is made with it is hashed with it too (that is how it is stored), so keys
issued before the rotation keep working, unchanged, until that secret is removed; new keys
are made with the current one. A key cannot be moved to the new secret behind its
holder's back: its tag is part of the text the customer holds. See docs/keys.md.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

PREFIX = "ak_"
RANDOM_BYTES = 32
_TAG_BYTES = 6
_ENCODED_LEN = 51  # base64url of 38 bytes, unpadded
_SHAPE = re.compile(rf"ak_[A-Za-z0-9_-]{{{_ENCODED_LEN}}}")
KEY_LEN = len(PREFIX) + _ENCODED_LEN


class KeySecret:
    """One server secret, split into one subkey for each thing it protects."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the key secret must be at least 16 bytes")
        self._hash_key = hmac.new(secret, b"tollway key hash v1", hashlib.sha256).digest()
        self._tag_key = hmac.new(secret, b"tollway key tag v1", hashlib.sha256).digest()
        self._entry_key = hmac.new(secret, b"tollway key cache entry v1", hashlib.sha256).digest()

    # hmac.digest: the one-shot C function; an hmac.new object per call cost more than
    # the hashing (both run on every /v1 request).
    def tag(self, random_part: bytes) -> bytes:
        return hmac.digest(self._tag_key, random_part, "sha256")[:_TAG_BYTES]

    def hash(self, key: str) -> str:
        return hmac.digest(self._hash_key, key.encode("ascii"), "sha256").hex()

    def mint(self) -> str:
        rnd = secrets.token_bytes(RANDOM_BYTES)
        return PREFIX + base64.urlsafe_b64encode(rnd + self.tag(rnd)).rstrip(b"=").decode("ascii")

    # --- signed cache entries ----------------------------------------------------------------
    #
    # What a worker shares through Redis is believed only with a signature bound to the key
    # hash it is stored for (an entry copied onto another key is refused) and to the moment
    # it stops being valid (an old entry put back is refused once that moment passes).

    def seal(self, key_hash: str, payload: str, until_ms: int) -> str:
        return f"{payload}|{until_ms}|{self._signature(key_hash, payload, until_ms)}"

    def unseal(self, key_hash: str, value: str) -> tuple[str, int] | None:
        """(payload, until_ms) when this secret signed `value` for `key_hash`; else None."""
        if not value.isascii():
            return None
        payload, _, rest = value.rpartition("|")
        payload, _, until = payload.rpartition("|")
        if not (rest and until.isdigit() and len(until) < 19):
            return None
        good = self._signature(key_hash, payload, int(until))
        return (payload, int(until)) if hmac.compare_digest(good, rest) else None

    def _signature(self, key_hash: str, payload: str, until_ms: int) -> str:
        message = f"{key_hash}|{until_ms}|{payload}".encode("ascii")
        return base64.urlsafe_b64encode(hmac.digest(self._entry_key, message, "sha256")).rstrip(b"=").decode()

    def __repr__(self) -> str:
        return "KeySecret('***')"


def tag_secret(key: str, secrets_in_order: tuple[KeySecret, ...]) -> KeySecret | None:
    """The secret whose tag `key` carries (current first), or None: no I/O, so random and
    forged keys stop here. Checks length, alphabet and the canonical base64 spelling too."""
    if len(key) != KEY_LEN or not _SHAPE.fullmatch(key):
        return None
    body = key[len(PREFIX):]
    raw = base64.urlsafe_b64decode(body + "=")
    # The last character carries 2 unused bits; only the canonical spelling is a key.
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != body:
        return None
    rnd, tag = raw[:RANDOM_BYTES], raw[RANDOM_BYTES:]
    for s in secrets_in_order:
        if hmac.compare_digest(tag, s.tag(rnd)):
            return s
    return None


def load_key_secret(env_name: str, sqlite_file: Path | None) -> tuple[KeySecret, str | None]:
    """From the environment; in embedded mode, else from a generated 0600 file next to the
    database. Returns the secret and a startup notice (or None)."""
    value, notice = load_secret(env_name, sqlite_file, ".tollway-key-secret", "customer-key secret")
    return KeySecret(value), notice


def load_secret(env_name: str, sqlite_file: Path | None, file_name: str, what: str) -> tuple[bytes, str | None]:
    """A server secret from `env_name`; in embedded mode, else from `file_name` next to the
    database, generated (mode 0600) on first use. Returns it and a startup notice (or None)."""
    value = os.environ.get(env_name)
    if value:
        return value.encode(), None
    if sqlite_file is None:
        raise ValueError(
            f"environment variable {env_name} is not set; every worker must share one {what} "
            f"(generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    path = sqlite_file.parent / file_name
    notice = None
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written under a private name, then linked into place: a process starting at the
        # same moment either wins the link or reads the complete file, never half of it.
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_urlsafe(32).encode())
        try:
            os.link(tmp, path)
            notice = (f"generated the {what} at {path} (mode 0600); back it up with the "
                      f"database, or set {env_name} instead")
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    elif path.stat().st_mode & 0o077:
        notice = f"the {what} {path} is readable by other users; chmod 600 it"
    return path.read_bytes().strip(), notice


def load_previous_secret(env_name: str, current: KeySecret) -> tuple[KeySecret | None, str | None]:
    """The secret still accepted during a rotation (None when `env_name` is empty or unset),
    and a start-up notice saying a rotation is in progress."""
    value = os.environ.get(env_name) if env_name else None
    if not value:
        return None, None
    try:
        previous = KeySecret(value.encode())
    except ValueError as exc:
        raise ValueError(f"environment variable {env_name}: {exc}") from None
    if previous.hash("ak_") == current.hash("ak_"):
        return None, f"{env_name} is the same as the current key secret; it is ignored"
    return previous, (f"key secret rotation: keys made with {env_name} are still accepted; "
                      f"unset it once every such key has been reissued")
