"""``owm backup copy`` between encrypted and plain repositories, through the CLI: the same key
(chunk files move as they are, byte for byte), different keys and plain <-> encrypted (chunks
re-sealed and renamed by the destination's hash, maps rewritten), every copied backup verifying
and restoring byte for byte at the destination; a wrong or missing key for either side is one
sentence, exit 2, and nothing is written at the destination.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import blake3
from backup_helpers import create, ok, ok_json, preserve, refused, write
from conftest import Daemon, cli_env, run_owm

CHUNK = 64 * 1024
SIZE = 2 << 20


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _chunk_files(repo: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (repo / "chunks").rglob("*") if p.is_file()}


def _checks_out(repo: Path, images: dict[str, bytes], *key: str | Path) -> None:
    """Verify passes, and every backup restores (the CLI, into a file) byte for byte."""
    assert ok_json(run_owm("backup", "verify", repo, *key, "--json"))["ok"]
    listed = ok_json(run_owm("backup", "list", repo, *key, "--json"))
    assert {b["id"] for b in listed} == set(images), listed
    for backup_id, image in images.items():
        target = repo.parent / "check.raw"
        ok(run_owm("restore", repo, backup_id, "--to", target, *key))
        assert target.read_bytes() == image, (repo, backup_id)
        target.unlink()


def _two_backups(daemon: Daemon, repo: Path, *key: str | Path) -> tuple[dict[str, bytes],
                                                                       list[bytes]]:
    """A full backup and an incremental one of a volume of random chunks and zeroes."""
    rng = random.Random("copy-keys")
    create(daemon, "vol", "2M")
    image = bytearray(SIZE)
    chunks = []
    writes = []
    for n in range(0, SIZE // CHUNK, 3):
        data = rng.randbytes(CHUNK)
        image[n * CHUNK:(n + 1) * CHUNK] = data
        writes.append((n * CHUNK, data))
        chunks.append(data)
    write(daemon, writes)
    images = {}
    first = ok_json(daemon.owm("backup", preserve(daemon), "--to", repo, *key, "--json"))["id"]
    images[first] = bytes(image)
    data = rng.randbytes(CHUNK)
    image[CHUNK:2 * CHUNK] = data
    chunks.append(data)
    write(daemon, [(CHUNK, data)])
    second = ok_json(daemon.owm("backup", preserve(daemon), "--to", repo, *key, "--json"))
    assert second["incremental"] is True
    images[second["id"]] = bytes(image)
    return images, chunks


def test_copies_between_plain_and_encrypted_and_between_keys(daemon: Daemon,
                                                             short_tmp: Path) -> None:
    k1, k2, k3 = (short_tmp / f"k{n}" for n in (1, 2, 3))
    enc = short_tmp / "enc"
    ok(run_owm("repo", "init", enc, "--encrypt", "--key-file", k1))
    images, chunks = _two_backups(daemon, enc, "--key-file", k1)

    # Same key: a destination created from an encrypted source shares its master key (wrapped
    # by its own key file), so the sealed chunk files move as they are.
    same = short_tmp / "same"
    doc = ok_json(run_owm("backup", "copy", enc, same, "--key-file", k1, "--dest-key-file", k3,
                          "--json"))
    assert doc["recoded"] is False and sorted(doc["copied"]) == sorted(images), doc
    assert _chunk_files(same) == _chunk_files(enc)
    assert "wrong passphrase or key file" in refused(run_owm("backup", "list", same,
                                                             "--key-file", k1), 2)
    _checks_out(same, images, "--key-file", k3)

    # Encrypted -> plain: chunks opened, stored plain under their plain BLAKE3.
    plain = short_tmp / "plain"
    doc = ok_json(run_owm("backup", "copy", enc, plain, "--key-file", k1, "--plain", "--json"))
    assert doc["recoded"] is True and doc["chunks_copied"] == len(chunks), doc
    assert set(_chunk_files(plain)) == {blake3.blake3(c).hexdigest() for c in chunks}
    _checks_out(plain, images)

    # Plain -> encrypted with a key of its own: nothing of the content or its plain hash shows.
    enc2 = short_tmp / "enc2"
    doc = ok_json(run_owm("backup", "copy", plain, enc2, "--encrypt", "--dest-key-file", k2,
                          "--json"))
    assert doc["recoded"] is True and doc["chunks_copied"] == len(chunks), doc
    blob = b"".join(p.read_bytes() + p.name.encode() for p in enc2.rglob("*") if p.is_file())
    for data in chunks:
        assert data[:32] not in blob and blake3.blake3(data).hexdigest()[:16].encode() not in blob
    _checks_out(enc2, images, "--key-file", k2)

    # Encrypted -> encrypted with different keys, into an existing repository that holds the
    # same content: every chunk is read and renamed, none needs writing, the backups arrive.
    ids = sorted(images)
    other = short_tmp / "other"
    ok(run_owm("repo", "init", other, "--encrypt", "--key-file", k2))
    doc = ok_json(run_owm("backup", "copy", enc, other, ids[1], "--key-file", k1,
                          "--dest-key-file", k2, "--json"))
    assert doc["recoded"] is True and doc["copied"] == ids, doc  # the parent came along
    assert doc["chunks_copied"] == len(chunks) and doc["chunks_present"] == len(chunks) - 1
    again = ok_json(run_owm("backup", "copy", plain, other, "--dest-key-file", k2, "--json"))
    assert again["copied"] == [] and again["chunks_copied"] == 0, again
    _checks_out(other, images, "--key-file", k2)
    # A passphrase destination, its passphrase from $OWM_DEST_REPO_PASSWORD.
    pw = short_tmp / "pw"
    env = cli_env(OWM_DEST_REPO_PASSWORD="correct horse")
    ok(run_owm("backup", "copy", enc, pw, "--key-file", k1, "--encrypt", env=env))
    ok(run_owm("backup", "verify", pw, env=cli_env(OWM_REPO_PASSWORD="correct horse")))


def test_a_wrong_key_on_either_side_is_one_sentence_and_writes_nothing(daemon: Daemon,
                                                                      short_tmp: Path) -> None:
    k1, k2, bad = short_tmp / "k1", short_tmp / "k2", short_tmp / "bad"
    bad.write_text("ff" * 32)
    enc = short_tmp / "enc"
    ok(run_owm("repo", "init", enc, "--encrypt", "--key-file", k1))
    images, _ = _two_backups(daemon, enc, "--key-file", k1)
    dst = short_tmp / "dst"
    ok(run_owm("repo", "init", dst, "--encrypt", "--key-file", k2))
    before_src, before_dst = _tree(enc), _tree(dst)
    new = short_tmp / "new"

    # The source's key wrong or missing: nothing is created or written.
    for where in (new, dst):
        line = refused(run_owm("backup", "copy", enc, where, "--key-file", bad,
                               "--dest-key-file", k2), 2)
        assert "wrong passphrase or key file" in line and str(enc) in line, line
        assert "--key-file" in refused(run_owm("backup", "copy", enc, where), 2)
    # The destination's key wrong or missing.
    line = refused(run_owm("backup", "copy", enc, dst, "--key-file", k1, "--dest-key-file",
                           bad), 2)
    assert "wrong passphrase or key file" in line and str(dst) in line, line
    line = refused(run_owm("backup", "copy", enc, dst, "--key-file", k1), 2)  # k1 tried for dst
    assert "wrong passphrase or key file" in line and str(dst) in line, line
    plain = short_tmp / "plain"
    ok(run_owm("repo", "init", plain))
    assert "--dest-key-file" in refused(run_owm("backup", "copy", plain, dst), 2)
    assert not new.exists()
    assert _tree(enc) == before_src and _tree(dst) == before_dst

    # Options that do not fit the repositories: one sentence each.
    assert "add --encrypt" in refused(run_owm("backup", "copy", plain, new, "--dest-key-file",
                                              k2))
    assert "drop --encrypt" in refused(run_owm("backup", "copy", enc, plain, "--key-file", k1,
                                               "--encrypt"))
    # Never decrypted by accident: an existing plain DST takes an encrypted SRC with --plain.
    assert "add --plain" in refused(run_owm("backup", "copy", enc, plain, "--key-file", k1))
    assert not any((plain / "backups").iterdir())
    assert "drop --plain" in refused(run_owm("backup", "copy", enc, dst, "--key-file", k1,
                                             "--dest-key-file", k2, "--plain"))
    assert "cannot go together" in refused(run_owm("backup", "copy", enc, new, "--encrypt",
                                                   "--plain"), 2)
    assert not new.exists() and _tree(dst) == before_dst
    # And with the right keys it goes through.
    ok(run_owm("backup", "copy", enc, dst, "--key-file", k1, "--dest-key-file", k2))
    _checks_out(dst, images, "--key-file", k2)
