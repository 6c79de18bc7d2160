"""Encryption at rest for an owm backup repository.

An encrypted repository has one random 256-bit *master key*.  It is stored in the repository's
config (``owm-repo.json``, under ``"encryption"``) only wrapped: sealed with ChaCha20-Poly1305
under a *wrapping key* that is either derived from a passphrase with scrypt (salt and cost in the
config) or derived from the content of a key file.  Two keys come from the master key (BLAKE3
``derive_key`` mode, so neither reveals the other):

* the *object key* seals every chunk, manifest and chunk map;
* the *id key* names chunks: a chunk's name is the keyed BLAKE3 of its content, so equal chunks
  still deduplicate, but a name says nothing about the content to whoever lacks the key.

A sealed object is ``MAGIC (4) | VERSION (1) | nonce (12) | ChaCha20-Poly1305(plaintext)`` with a
fresh random nonce each time, and the object's kind and name (``chunk``/hex name,
``manifest``/backup id, ``map``/file name) as associated data: a chunk moved under another
name, or a manifest put in place of another, fails authentication like a flipped byte does.
What stays visible: file names of backups (volume name and time), sizes, and how many chunks.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import blake3

from owm.common.errors import InvalidRequest, OwmError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305


def _aead(key: bytes) -> ChaCha20Poly1305:
    # Imported on first use: only encrypted repositories pay for loading cryptography (about
    # 50 ms of every command's start-up).
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    return ChaCha20Poly1305(key)


def _invalid_tag() -> type[Exception]:
    from cryptography.exceptions import InvalidTag

    return InvalidTag

MAGIC = b"owmE"
VERSION = 1
NONCE_SIZE = 12
TAG_SIZE = 16
HEADER_SIZE = len(MAGIC) + 1 + NONCE_SIZE
OVERHEAD = HEADER_SIZE + TAG_SIZE
KEY_SIZE = 32
CIPHER = "chacha20-poly1305"
CHUNK_ID = "blake3-keyed"
# scrypt cost: 2**15 * 8 * 128 bytes = 32 MiB of memory per derivation (OWASP's minimum).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 15, 8, 1
PASSWORD_ENV = "OWM_REPO_PASSWORD"

_OBJECT_CONTEXT = "owm backup repository 2026-12 object encryption key"
_ID_CONTEXT = "owm backup repository 2026-12 chunk id key"
_KEY_FILE_CONTEXT = "owm backup repository 2026-12 key file wrapping key"
_WRAP_AAD = b"owm-repo master key v1"


class WrongKey(OwmError):
    """The passphrase or key file does not open the repository's master key."""


class KeyNeeded(OwmError):
    """The repository is encrypted and no key was given."""


@dataclass(frozen=True)
class KeySource:
    """Where the key of an encrypted repository comes from: a key file, else a passphrase
    (asked for only when an encrypted repository is opened)."""

    key_file: Path | None = None
    passphrase: Callable[[], str | None] | None = None
    # How messages name this key to the user (``owm backup copy`` has a second one).
    option: str = "--key-file"
    password_env: str = PASSWORD_ENV

    def get_passphrase(self) -> str | None:
        if self.passphrase is not None:
            return self.passphrase()
        return os.environ.get(self.password_env) or None


_default = KeySource()


def set_default_key(source: KeySource) -> None:
    """The key source every repository this process opens uses (set once by the CLI)."""
    global _default
    _default = source


def default_key() -> KeySource:
    return _default


def _aad(kind: str, name: str) -> bytes:
    return b"owm-object-v1\0" + kind.encode() + b"\0" + name.encode()


class RepoCipher:
    """The keys of one open encrypted repository: names chunks, seals and opens objects."""

    def __init__(self, master: bytes) -> None:
        if len(master) != KEY_SIZE:
            raise ValueError("a master key is 32 bytes")
        self._master = master
        self._aead = _aead(blake3.blake3(master, derive_key_context=_OBJECT_CONTEXT)
                                      .digest())
        self._id_key = blake3.blake3(master, derive_key_context=_ID_CONTEXT).digest()

    def chunk_id(self, data: bytes | bytearray | memoryview) -> bytes:
        return blake3.blake3(data, key=self._id_key).digest()

    def same_key(self, other: RepoCipher) -> bool:
        """Whether ``other`` has this master key: each opens what the other sealed, under the
        same chunk names (two repositories share one when a copy created the second)."""
        import hmac  # here: a plain repository's commands need not load OpenSSL's hashes

        return hmac.compare_digest(self._master, other._master)

    def seal(self, kind: str, name: str, plaintext: bytes | bytearray | memoryview,
             nonce: bytes | None = None) -> bytes:
        """``plaintext`` sealed as object ``kind``/``name`` (``nonce`` only for known answers)."""
        nonce = os.urandom(NONCE_SIZE) if nonce is None else nonce
        return (MAGIC + bytes([VERSION]) + nonce
                + self._aead.encrypt(nonce, bytes(plaintext), _aad(kind, name)))

    def open(self, kind: str, name: str, sealed: bytes) -> bytes | None:
        """The plaintext of a sealed object, or None if it is not authentic as ``kind``/``name``."""
        if len(sealed) < OVERHEAD or not sealed.startswith(MAGIC) or sealed[4] != VERSION:
            return None
        nonce = sealed[5:HEADER_SIZE]
        try:
            return self._aead.decrypt(nonce, sealed[HEADER_SIZE:], _aad(kind, name))
        except _invalid_tag():
            return None


# -- the master key and its wrapping -----------------------------------------------------------
def _scrypt(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    import hashlib

    return hashlib.scrypt(passphrase.encode(), salt=salt, n=n, r=r, p=p, dklen=KEY_SIZE,
                          maxmem=256 * n * r + (1 << 20))


def read_key_file(path: Path) -> bytes:
    """The wrapping key a key file gives (any file of at least 32 bytes; see new_key_file)."""
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        raise InvalidRequest(f"the key file {path} does not exist") from None
    except OSError as exc:
        raise InvalidRequest(f"the key file {path} cannot be read ({exc.strerror})") from None
    if len(content.strip()) < KEY_SIZE:
        raise InvalidRequest(f"the key file {path} is too short to be a key (at least 32 "
                             "bytes)")
    return blake3.blake3(content.strip(), derive_key_context=_KEY_FILE_CONTEXT).digest()


def new_key_file(path: Path) -> None:
    """Create ``path`` (never over an existing file) with 32 random bytes in hex, mode 0600."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except FileExistsError:
        raise InvalidRequest(f"{path} already exists") from None
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(KEY_SIZE).hex() + "\n")
        f.flush()
        os.fsync(f.fileno())


def _wrap_aad(block: dict[str, Any]) -> bytes:
    """The wrapped key is bound to how it is wrapped: changing the KDF settings breaks it."""
    params = ",".join(f"{k}={block[k]}" for k in sorted(block) if k != "wrapped")
    return _WRAP_AAD + b"\0" + params.encode()


def new_encryption(source: KeySource, where: str,
                   like: RepoCipher | None = None) -> tuple[dict[str, Any], RepoCipher]:
    """A fresh master key (or ``like``'s, for a repository that is to share another's chunks
    as they are) wrapped as ``source`` says: the config block and the open cipher."""
    master = os.urandom(KEY_SIZE) if like is None else like._master
    block: dict[str, Any] = {"cipher": CIPHER, "chunk_id": CHUNK_ID}
    if source.key_file is not None:
        if not source.key_file.exists():
            new_key_file(source.key_file)
        wrapping = read_key_file(source.key_file)
        block["key"] = "key-file"
    else:
        passphrase = source.get_passphrase()
        if not passphrase:
            raise KeyNeeded(f"an encrypted repository needs a key: give {source.option} F or "
                            f"set {source.password_env} to create {where}")
        salt = os.urandom(16)
        block.update(key="passphrase", kdf="scrypt", salt=salt.hex(), n=SCRYPT_N, r=SCRYPT_R,
                     p=SCRYPT_P)
        wrapping = _scrypt(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    nonce = os.urandom(NONCE_SIZE)
    block["wrapped"] = (nonce + _aead(wrapping).encrypt(nonce, master,
                                                                   _wrap_aad(block))).hex()
    return block, RepoCipher(master)


def open_encryption(block: Any, source: KeySource, where: str) -> RepoCipher:
    """Unwrap the master key of repository ``where`` (WrongKey, KeyNeeded, InvalidRequest)."""
    if not isinstance(block, dict) or block.get("cipher") != CIPHER or \
            block.get("chunk_id") != CHUNK_ID or block.get("key") not in ("key-file",
                                                                         "passphrase"):
        raise InvalidRequest(f"{where} is encrypted in a way this owm does not know")
    try:
        wrapped = bytes.fromhex(str(block["wrapped"]))
    except (KeyError, ValueError):
        raise InvalidRequest(f"the encryption settings of {where} are damaged") from None
    if block["key"] == "key-file":
        if source.key_file is None:
            raise KeyNeeded(f"{where} is encrypted with a key file; give it with "
                            f"{source.option} F")
        wrapping = read_key_file(source.key_file)
    else:
        if source.key_file is not None:
            raise WrongKey(f"{where} is encrypted with a passphrase, not a key file; drop "
                           f"{source.option} and give the passphrase (or set "
                           f"{source.password_env})")
        passphrase = source.get_passphrase()
        if not passphrase:
            raise KeyNeeded(f"{where} is encrypted; give its passphrase (set "
                            f"{source.password_env})")
        try:
            salt = bytes.fromhex(str(block["salt"]))
            n, r, p = int(block["n"]), int(block["r"]), int(block["p"])
        except (KeyError, ValueError):
            raise InvalidRequest(f"the encryption settings of {where} are damaged") from None
        if not (1 < n <= 1 << 20 and n & (n - 1) == 0 and 0 < r <= 32 and 0 < p <= 16):
            raise InvalidRequest(f"the encryption settings of {where} are damaged")
        wrapping = _scrypt(passphrase, salt, n, r, p)
    try:
        master = _aead(wrapping).decrypt(wrapped[:NONCE_SIZE], wrapped[NONCE_SIZE:],
                                                    _wrap_aad(block))
    except (_invalid_tag(), ValueError):
        raise WrongKey(f"the key does not open the repository {where} (wrong passphrase or "
                       "key file)") from None
    return RepoCipher(master)
