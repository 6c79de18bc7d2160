"""Encrypted backup repositories: the format's known answers, the CLI end to end against a real
daemon (init, backup, list, verify, restore byte for byte), a wrong or missing key (one
sentence, exit 2, nothing written), one tampered byte in a chunk or a manifest (verify names
it), a chunk swapped under another's name, and a scan of every file of the repository for
plaintext chunk content and for the chunks' plain BLAKE3 hashes.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from subprocess import CompletedProcess

import blake3
from backup_helpers import create, ok, ok_json, preserve, refused, write
from conftest import Daemon, cli_env, run_owm
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from owm.backup.crypto import KeySource, RepoCipher, open_encryption, read_key_file
from owm.backup.repo import Repository

CHUNK = 64 * 1024
SIZE = 4 << 20
MASTER = bytes(range(32))
NONCE = bytes(range(100, 112))
# Pinned: any change to the format changes these (and must come with a new format version).
KNOWN_SEALED = ("6f776d45016465666768696a6b6c6d6e6f9795cf0cb6f76f8fd421004af7546e49c050cb5bec"
                "69277a37ba")
KNOWN_ID = "619853e73235da85aa39cb261e63fcc96cc418d4b5be79e028f14b4b6ab6a1fc"
KNOWN_KEY_FILE_KEY = "91c1abd4f03536a71cf0caa482780e6e2c8e51653f968c8eb16cf0592f20a715"


def test_known_answers_of_the_format(tmp_path: Path) -> None:
    cipher = RepoCipher(MASTER)
    sealed = cipher.seal("chunk", "ab" * 32, b"hello, owm", nonce=NONCE)
    assert sealed.hex() == KNOWN_SEALED
    assert cipher.chunk_id(b"owm").hex() == KNOWN_ID
    # The documented layout, rebuilt from the primitives.
    id_key = blake3.blake3(MASTER, derive_key_context="owm backup repository 2026-12 chunk id "
                                                      "key").digest()
    assert cipher.chunk_id(b"owm") == blake3.blake3(b"owm", key=id_key).digest()
    assert cipher.chunk_id(b"owm") != blake3.blake3(b"owm").digest()
    object_key = blake3.blake3(MASTER, derive_key_context="owm backup repository 2026-12 "
                                                          "object encryption key").digest()
    aad = b"owm-object-v1\0chunk\0" + ("ab" * 32).encode()
    assert sealed == b"owmE\x01" + NONCE + ChaCha20Poly1305(object_key).encrypt(
        NONCE, b"hello, owm", aad)
    assert cipher.open("chunk", "ab" * 32, sealed) == b"hello, owm"
    # Another name or kind, or one flipped byte: not authentic.
    assert cipher.open("chunk", "cd" * 32, sealed) is None
    assert cipher.open("manifest", "ab" * 32, sealed) is None
    for where in (0, 5, len(sealed) // 2, len(sealed) - 1):
        flipped = bytearray(sealed)
        flipped[where] ^= 1
        assert cipher.open("chunk", "ab" * 32, bytes(flipped)) is None
    assert cipher.seal("chunk", "x", b"same") != cipher.seal("chunk", "x", b"same")

    # The master key wrapped by a key file, as the config stores it.
    key_file = tmp_path / "k"
    key_file.write_text("00" * 32 + "\n")
    wrapping = read_key_file(key_file)
    assert wrapping.hex() == KNOWN_KEY_FILE_KEY
    block = {"cipher": "chacha20-poly1305", "chunk_id": "blake3-keyed", "key": "key-file"}
    wrap_aad = (b"owm-repo master key v1\0"
                b"chunk_id=blake3-keyed,cipher=chacha20-poly1305,key=key-file")
    block["wrapped"] = (NONCE + ChaCha20Poly1305(wrapping).encrypt(NONCE, MASTER, wrap_aad)).hex()
    opened = open_encryption(block, KeySource(key_file=key_file), "r")
    assert opened.chunk_id(b"owm").hex() == KNOWN_ID


def _tree(root: Path) -> dict[str, str]:
    """Every file of a repository and the hash of its content."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _seed(daemon: Daemon, rng: random.Random) -> tuple[bytes, list[bytes]]:
    """A volume of random (incompressible) chunks and some zeroes; its bytes and chunks."""
    create(daemon, "vol", "4M")
    image = bytearray(SIZE)
    writes = []
    for n in range(0, SIZE // CHUNK, 2):
        data = rng.randbytes(CHUNK)
        image[n * CHUNK:(n + 1) * CHUNK] = data
        writes.append((n * CHUNK, data))
    write(daemon, writes)
    return bytes(image), [d for _, d in writes]


def test_encrypted_repository_end_to_end(daemon: Daemon, short_tmp: Path) -> None:
    image, chunks = _seed(daemon, random.Random("enc"))
    name = preserve(daemon)
    repo, key = short_tmp / "repo", short_tmp / "repo.key"
    doc = ok_json(daemon.owm("repo", "init", repo, "--encrypt", "--key-file", key, "--json"))
    assert doc["encrypted"] is True and doc["key"] == "key-file"
    assert key.stat().st_mode & 0o077 == 0  # created, private
    backup_id = ok_json(daemon.owm("backup", name, "--to", repo, "--key-file", key, "--json"))["id"]
    listed = ok_json(daemon.owm("backup", "list", repo, "--key-file", key, "--json"))
    assert [r["id"] for r in listed] == [backup_id]
    ok(daemon.owm("backup", "verify", repo, "--key-file", key))
    out = short_tmp / "back.raw"
    ok(daemon.owm("restore", repo, backup_id, "--to", out, "--key-file", key))
    assert out.read_bytes() == image

    # Nothing of the content, nor of its plain hashes, is anywhere in the repository.
    blob = b"".join([p.read_bytes() + p.name.encode() for p in repo.rglob("*") if p.is_file()]
                    + [str(p.relative_to(repo)).encode() for p in repo.rglob("*")])
    for data in chunks:
        digest = blake3.blake3(data).digest()
        assert data[:32] not in blob and data[CHUNK // 2:CHUNK // 2 + 32] not in blob
        assert digest not in blob and digest.hex().encode() not in blob
        assert digest.hex()[:16].encode() not in blob

    # Another volume with the same content stores no new chunk: keyed names still deduplicate.
    create(daemon, "twin", "4M")
    write(daemon, [(n * CHUNK, image[n * CHUNK:(n + 1) * CHUNK]) for n in range(SIZE // CHUNK)
                   if n % 2 == 0], export="twin")
    twin = ok_json(daemon.owm("backup", preserve(daemon, "twin"), "--to", repo, "--key-file",
                              key, "--json"))
    assert twin["chunks_new"] == 0 and twin["chunks_reused"] == len(chunks), twin

    # `owm backup --encrypt` creates a new repository encrypted, like `owm repo init`.
    other, other_key = short_tmp / "other", short_tmp / "other.key"
    ok(daemon.owm("backup", name, "--to", other, "--encrypt", "--key-file", other_key))
    assert "encryption" in json.loads((other / "owm-repo.json").read_bytes())
    assert "--key-file" in refused(daemon.owm("backup", "list", other), 2)
    assert "wrong passphrase or key file" in refused(
        daemon.owm("backup", "list", other, "--key-file", key), 2)
    assert len(ok_json(daemon.owm("backup", "list", other, "--key-file", other_key,
                                  "--json"))) == 1

    # The scan does find them in an unencrypted repository (so it would catch a leak).
    plain = short_tmp / "plain"
    ok(daemon.owm("backup", name, "--to", plain))
    plain_blob = b"".join(p.read_bytes() + p.name.encode() for p in plain.rglob("*")
                          if p.is_file())
    assert blake3.blake3(chunks[0]).hexdigest().encode() in plain_blob


def test_wrong_or_missing_key_is_one_sentence_and_writes_nothing(daemon: Daemon,
                                                                short_tmp: Path) -> None:
    _seed(daemon, random.Random("wrong"))
    name = preserve(daemon)
    repo, key, other = short_tmp / "repo", short_tmp / "k1", short_tmp / "k2"
    ok(daemon.owm("repo", "init", repo, "--encrypt", "--key-file", key))
    other.write_text("ff" * 32)
    backup_id = ok_json(daemon.owm("backup", name, "--to", repo, "--key-file", key, "--json"))["id"]
    before = _tree(repo)
    for args in (("backup", name, "--to", repo), ("backup", "list", repo),
                 ("backup", "verify", repo), ("backup", "delete", repo, backup_id),
                 ("restore", repo, backup_id, "--to", short_tmp / "x.raw")):
        line = refused(daemon.owm(*args, "--key-file", other), 2)
        assert "wrong passphrase or key file" in line, line
        line = refused(daemon.owm(*args), 2)
        assert "--key-file" in line, line
    assert _tree(repo) == before
    assert not (short_tmp / "x.raw").exists()
    assert preserve(daemon) == "vol@1"  # the daemon is fine and nothing was taken

    # A passphrase repository: the right one opens it, a wrong one is refused.
    prepo = short_tmp / "prepo"
    good = cli_env(OWM_REPO_PASSWORD="correct horse")
    bad = cli_env(OWM_REPO_PASSWORD="wrong horse")

    def owm(*args: str | Path, env: dict[str, str] | None = None) -> CompletedProcess[str]:
        return run_owm("--pool", daemon.pool, *args, env=env)
    ok(owm("repo", "init", prepo, "--encrypt", env=good))
    config = json.loads((prepo / "owm-repo.json").read_bytes())["encryption"]
    assert config["kdf"] == "scrypt" and config["n"] >= 1 << 15
    ok(owm("backup", name, "--to", prepo, env=good))
    assert len(ok_json(owm("backup", "list", prepo, "--json", env=good))) == 1
    before = _tree(prepo)
    assert "wrong passphrase" in refused(owm("backup", name, "--to", prepo, env=bad), 2)
    assert "passphrase" in refused(owm("backup", "list", prepo), 2)
    assert _tree(prepo) == before
    # Unencrypted repositories ignore the passphrase and keep working unchanged.
    ok(owm("backup", name, "--to", short_tmp / "plain", env=good))


def test_tampered_chunk_and_manifest_are_named_by_verify(daemon: Daemon,
                                                         short_tmp: Path) -> None:
    _seed(daemon, random.Random("tamper"))
    name = preserve(daemon)
    repo, key = short_tmp / "repo", short_tmp / "k"
    ok(daemon.owm("repo", "init", repo, "--encrypt", "--key-file", key))
    first = ok_json(daemon.owm("backup", name, "--to", repo, "--key-file", key, "--json"))["id"]
    write(daemon, [(CHUNK, b"\x01" * CHUNK)])
    second = ok_json(daemon.owm("backup", preserve(daemon), "--to", repo, "--key-file", key,
                                "--json"))["id"]

    repository = Repository.open(repo, key=KeySource(key_file=key))
    entries = dict(repository.load(first).chunk_map.entries())
    # One flipped byte in the middle of the chunk of chunk 4.
    victim = repository.chunk_path(entries[4])
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x20
    victim.write_bytes(bytes(data))
    # Chunk 6's file replaced by chunk 8's (a valid sealed chunk, but not under this name).
    repository.chunk_path(entries[6]).write_bytes(repository.chunk_path(entries[8]).read_bytes())
    result = daemon.owm("backup", "verify", repo, first, "--key-file", key)
    assert result.returncode == 1, result
    assert f"offset {4 * CHUNK} (chunk 4" in result.stderr, result.stderr
    assert f"offset {6 * CHUNK} (chunk 6" in result.stderr, result.stderr
    assert "fails authentication" in result.stderr
    assert "Traceback" not in result.stderr

    # One flipped byte in the second backup's manifest.
    manifest = repo / "backups" / f"{second}.json"
    data = bytearray(manifest.read_bytes())
    data[len(data) // 2] ^= 0x01
    manifest.write_bytes(bytes(data))
    result = daemon.owm("backup", "verify", repo, "--key-file", key, "--json")
    doc = json.loads(result.stdout)
    bad = {b["id"]: b for b in doc["backups"]}
    assert bad[second]["state"] == "damaged"
    assert "fails authentication" in bad[second]["damaged"]
    # A manifest copied in place of another's is not taken for it either.
    manifest.write_bytes((repo / "backups" / f"{first}.json").read_bytes())
    result = daemon.owm("backup", "verify", repo, second, "--key-file", key)
    assert result.returncode == 1 and second in result.stderr and "authentication" in \
        result.stderr, result
