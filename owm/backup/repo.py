"""The owm backup repository: a directory of content-addressed chunks and one manifest per backup.

Layout::

    REPO/owm-repo.json          what this directory is (format, hash, compression)
    REPO/lock                   flock: backups, verifies and restores share it, delete excludes
    REPO/chunks/ab/ab12…ef      one zstd frame per distinct chunk, named by the BLAKE3 of its
                                content (so chunks are shared between backups and volumes)
    REPO/backups/ID.json        the manifest of backup ID (see manifest.py)
    REPO/backups/ID.HASH.map    its chunk map (HASH: the start of the map's own BLAKE3)
    REPO/backups/ID.lock        flock held while backup ID is being written

Durability: a chunk file appears under its name only by an atomic rename of a finished file,
and a manifest says "complete" only after every chunk it names has been synced (one syncfs of
the repository's file system) and the manifest itself is written to a temporary file, synced,
renamed and its directory synced.  A killed backup therefore leaves at most an "incomplete"
manifest (which a rerun resumes) and some unreferenced chunks; it never leaves a false
"complete".  Deleting a backup removes its manifest, then every chunk no remaining manifest
names (complete or not).

Paths: every path of a backup is derived from the name of its manifest file (``ID.json``) and
checked to stay inside ``REPO/backups``; nothing inside a manifest (its ``id``, ``parent`` or
map file name) is ever used to build a path.  A manifest whose ``id`` differs from its file
name is damaged.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import blake3
import zstandard

from owm.backup.crypto import (
    OVERHEAD,
    KeySource,
    RepoCipher,
    default_key,
    new_encryption,
    open_encryption,
)
from owm.backup.manifest import (
    DIGEST_SIZE,
    ChunkMap,
    DamagedManifest,
    Manifest,
    map_name,
    valid_id,
)
from owm.common.errors import AlreadyExists, InvalidRequest, NotFound, WrongState
from owm.common.files import fsync_dir, write_atomically

log = logging.getLogger("owm.backup")

MARKER = "owm-repo.json"
REPO_FORMAT = "owm-backup-repository"
REPO_VERSION = 1
DEFAULT_LEVEL = 3
_TMP = ".tmp"
_BAD = ".bad"  # a chunk file verify found damaged, kept aside for inspection until a delete
_GC = ".gc"  # a chunk a garbage collection moved aside and has not decided on yet
_GC_SLACK = 2.0  # seconds: file times come from a coarser clock than time.time()
# Temporary files in the repository: a link planted at their name is never followed.
_WRITE_NEW = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC


class ChunkDamaged(Exception):
    """A stored chunk is missing, undecodable, of the wrong length or fails its hash."""


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _syncfs_call() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syncfs
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return None


_SYNCFS = _syncfs_call()


def sync_filesystem(path: Path) -> None:
    """Make every write to ``path``'s file system durable (syncfs; sync where there is none)."""
    if _SYNCFS is None:  # pragma: no cover - not Linux
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _SYNCFS(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), str(path))
    finally:
        os.close(fd)


@dataclass
class DeleteResult:
    id: str
    chunks_removed: int
    bytes_freed: int
    chunks_kept_because: str | None = None  # why no chunk could be removed

    def to_json(self) -> dict[str, Any]:
        return {"deleted": self.id, "chunks_removed": self.chunks_removed,
                "bytes_freed": self.bytes_freed, "chunks_kept_because": self.chunks_kept_because}


class Repository:
    """An owm backup repository on a local file system.  Chunk methods are thread-safe."""

    def __init__(self, root: Path, config: dict[str, Any],
                 cipher: RepoCipher | None = None) -> None:
        self.root = root
        self.config = config
        self.cipher = cipher  # None: an unencrypted repository
        self.level = int(config.get("compression_level", DEFAULT_LEVEL))
        self._local = threading.local()
        self._dirs: dict[str, int] = {}
        self._dirs_lock = threading.Lock()

    # -- opening ----------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path | str, *, create: bool = False, encrypt: bool = False,
             key: KeySource | None = None, like: RepoCipher | None = None) -> Repository:
        """Open (or with ``create`` make) a repository; an encrypted one is unlocked with
        ``key`` (default: the process's, see crypto.set_default_key) before anything else.
        A repository created with ``like`` (and ``encrypt``) gets that cipher's master key,
        wrapped by ``key``: the two then hold the same chunk files under the same names."""
        root = Path(path)
        marker = root / MARKER
        key = key if key is not None else default_key()
        if not marker.exists():
            if not create:
                if not root.exists():
                    raise NotFound(f"there is no backup repository at {root}")
                raise NotFound(f"{root} is not an owm backup repository (it has no {MARKER})")
            return cls._create(root, key if encrypt else None, like)
        try:
            config = json.loads(marker.read_bytes())
        except (OSError, ValueError) as exc:
            raise InvalidRequest(f"{marker} cannot be read ({exc})") from None
        if not isinstance(config, dict) or config.get("format") != REPO_FORMAT:
            raise InvalidRequest(f"{root} is not an owm backup repository")
        if config.get("version") != REPO_VERSION:
            raise InvalidRequest(f"{root} is a version {config.get('version')} repository; "
                                 f"this owm reads version {REPO_VERSION}")
        if "encryption" not in config:
            if encrypt:
                raise InvalidRequest(f"{root} is a repository that is not encrypted")
            return cls(root, config)
        return cls(root, config, open_encryption(config["encryption"], key, str(root)))

    @classmethod
    def _create(cls, root: Path, key: KeySource | None,
                like: RepoCipher | None = None) -> Repository:
        if root.exists() and not root.is_dir():
            raise InvalidRequest(f"{root} exists and is not a directory")
        if root.is_dir() and any(root.iterdir()):
            raise InvalidRequest(f"{root} is a directory that is not empty and not an owm "
                                 "backup repository")
        cipher = None
        encryption: dict[str, Any] | None = None
        if key is not None:  # first, so that a missing key leaves nothing behind
            encryption, cipher = new_encryption(key, str(root), like)
        root.mkdir(parents=True, exist_ok=True)
        for sub in ("chunks", "backups"):
            (root / sub).mkdir(exist_ok=True)
        for n in range(256):
            (root / "chunks" / f"{n:02x}").mkdir(exist_ok=True)
        config = {"format": REPO_FORMAT, "version": REPO_VERSION, "hash": "blake3",
                  "compression": "zstd", "compression_level": DEFAULT_LEVEL,
                  "created_at": utc_now()}
        if encryption is not None:
            config["encryption"] = encryption
        (root / "lock").touch()
        sync_filesystem(root)
        write_atomically(root / MARKER, json.dumps(config, indent=1).encode())
        log.info("created %sbackup repository %s", "encrypted " if cipher else "", root)
        return cls(root, config, cipher)

    # -- locking ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, exclusive: bool, wait: float = 30.0) -> Iterator[None]:
        """Share the repository (backup, verify, restore) or own it (delete)."""
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        what = ("a backup, verify or restore is using it" if exclusive
                                else "a delete is running in it")
                        raise WrongState(f"the repository {self.root} is busy: {what}") from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)

    # -- chunks -----------------------------------------------------------------------------
    def chunk_path(self, digest: bytes) -> Path:
        name = digest.hex()
        return self.root / "chunks" / name[:2] / name

    def chunk_id(self, data: bytes | bytearray | memoryview) -> bytes:
        """The name of a chunk: its BLAKE3, keyed with the repository's id key if encrypted."""
        if self.cipher is not None:
            return self.cipher.chunk_id(data)
        return blake3.blake3(data).digest()

    def _dir(self, name: str) -> int:
        """A descriptor of the chunk's directory: spares a path walk per chunk operation."""
        fds = self._dirs
        fd = fds.get(name[:2])
        if fd is None:
            with self._dirs_lock:
                fd = fds.get(name[:2])
                if fd is None:
                    fd = os.open(self.root / "chunks" / name[:2],
                                 os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                    fds[name[:2]] = fd
        return fd

    def close(self) -> None:
        with self._dirs_lock:
            fds, self._dirs = self._dirs, {}
        for fd in fds.values():
            os.close(fd)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def has_chunk(self, digest: bytes) -> bool:
        """Whether the chunk is stored; a chunk found is touched (its mtime set to now), which
        keeps a concurrent garbage collection from removing it (see :meth:`collect_garbage`)."""
        name = digest.hex()
        try:
            os.utime(name, dir_fd=self._dir(name))
        except FileNotFoundError:
            return False
        return True

    def _compressor(self) -> zstandard.ZstdCompressor:
        comp = getattr(self._local, "comp", None)
        if comp is None:
            comp = self._local.comp = zstandard.ZstdCompressor(level=self.level)
        return comp

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        dec = getattr(self._local, "dec", None)
        if dec is None:
            dec = self._local.dec = zstandard.ZstdDecompressor()
        return dec

    def put_chunk(self, digest: bytes, data: bytes | bytearray | memoryview) -> int:
        """Store one chunk (compressed) under its digest; returns the bytes written."""
        packed = self._compressor().compress(data)
        if self.cipher is not None:
            packed = self.cipher.seal("chunk", digest.hex(), packed)
        return self.put_stored(digest, packed)

    def put_stored(self, digest: bytes, packed: bytes) -> int:
        """Store a chunk file's bytes as they are (see :meth:`read_stored`); returns their
        length.  Only for bytes another repository with this one's keys stored under the same
        name (a copy): nothing here checks them."""
        name = digest.hex()
        where = self._dir(name)
        tmp = f".{name[:16]}.{os.getpid()}.{threading.get_ident()}{_TMP}"
        fd = os.open(tmp, _WRITE_NEW, 0o644, dir_fd=where)
        try:
            view = memoryview(packed)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=where, dst_dir_fd=where)
        return len(packed)

    def get_chunk(self, digest: bytes, length: int) -> bytes:
        """The content of a chunk, checked against its digest and length (ChunkDamaged if not)."""
        return self.decode(digest, self.read_stored(digest), length)

    def read_stored(self, digest: bytes) -> bytes:
        """The bytes of a chunk's file as stored (compressed, sealed if encrypted), unchecked."""
        name = digest.hex()
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._dir(name))
        except FileNotFoundError:
            try:
                # A collection killed (or out of space) between moving it aside and putting it
                # back: the content is still there, and the next collection puts it back.
                fd = os.open(name + _GC, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._dir(name))
            except FileNotFoundError:
                raise ChunkDamaged("its chunk file is missing") from None
        try:
            # One fstat and (almost always) one read: no file object per chunk.
            size = os.fstat(fd).st_size
            parts = [os.read(fd, size)]
            while parts[-1]:
                size -= len(parts[-1])
                if size <= 0:
                    break
                parts.append(os.read(fd, size))
        except OSError as exc:
            raise ChunkDamaged(f"its chunk file cannot be read ({exc.strerror})") from None
        finally:
            os.close(fd)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def decode(self, digest: bytes, packed: bytes, length: int) -> bytes:
        """The content of chunk ``digest`` from its file's bytes, checked (ChunkDamaged)."""
        name = digest.hex()
        if self.cipher is not None:
            opened = self.cipher.open("chunk", name, packed)
            if opened is None:
                raise ChunkDamaged("its chunk file fails authentication (changed, or not this "
                                   "chunk)")
            packed = opened
        try:
            data = self._decompressor().decompress(packed, max_output_size=length)
        except zstandard.ZstdError as exc:
            raise ChunkDamaged(f"its chunk file cannot be decompressed ({exc})") from None
        if len(data) != length:
            raise ChunkDamaged(f"its chunk holds {len(data)} bytes instead of {length}")
        if self.chunk_id(data) != digest:
            raise ChunkDamaged("its content does not match its hash")
        return data

    def chunk_present(self, digest: bytes, length: int) -> bool:
        """Cheap: the chunk file exists and starts a zstd frame of ``length`` bytes.

        An incremental backup checks every chunk it keeps from its parent this way (a read of a
        few bytes, not of the chunk); damage inside a chunk is ``verify``'s to find, and verify
        moves such a chunk aside (:meth:`quarantine_chunk`) so the next backup stores it anew.
        """
        name = digest.hex()
        try:
            # Touched by name first: a concurrent garbage collection then leaves it alone, or
            # has already moved it away and the open fails (see :meth:`collect_garbage`).
            os.utime(name, dir_fd=self._dir(name))
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._dir(name))
        except OSError:
            return False
        try:
            if self.cipher is not None:
                # Sealed: its frame header cannot be read without opening it all.
                return os.fstat(fd).st_size > OVERHEAD
            head = os.read(fd, 18)  # the longest zstd frame header
        except OSError:
            return False
        finally:
            os.close(fd)
        try:
            return bool(zstandard.frame_content_size(head) == length)
        except zstandard.ZstdError:
            return False

    def quarantine_chunk(self, digest: bytes) -> None:
        """Move a damaged chunk file aside (``NAME.bad``, as Proxmox Backup Server does): backups
        that use it stay damaged, and the next backup that meets the chunk stores it again,
        which repairs them."""
        name = digest.hex()
        where = self._dir(name)
        with contextlib.suppress(FileNotFoundError):
            os.rename(name, name + _BAD, src_dir_fd=where, dst_dir_fd=where)

    def chunk_ok(self, digest: bytes, length: int) -> bool:
        try:
            self.get_chunk(digest, length)
        except ChunkDamaged:
            return False
        return True

    def sync(self) -> None:
        """Make every chunk written so far durable (one syncfs for the whole file system)."""
        sync_filesystem(self.root)

    # -- manifests --------------------------------------------------------------------------
    def _backup_file(self, name: str) -> Path:
        """``REPO/backups/NAME``, refused unless it is a plain name inside that directory."""
        backups = self.root / "backups"
        path = backups / name
        if "/" in name or name in ("", ".", "..") or \
                path.parent.resolve() != backups.resolve():
            raise InvalidRequest(f"'{name}' is not a file of the repository's backups")
        return path

    def _checked_id(self, backup_id: str) -> str:
        if not valid_id(backup_id):
            raise InvalidRequest(f"'{backup_id}' cannot be a backup id (letters, digits, '.', "
                                 "'_', '@' and '-' only)")
        return backup_id

    def _manifest_path(self, backup_id: str) -> Path:
        return self._backup_file(f"{self._checked_id(backup_id)}.json")

    def _lock_path(self, backup_id: str) -> Path:
        return self._backup_file(f"{self._checked_id(backup_id)}.lock")

    def manifest_ids(self) -> list[str]:
        """The id of every manifest file: its name, which is where every path comes from."""
        return sorted(p.name[: -len(".json")] for p in (self.root / "backups").glob("*.json")
                      if not p.name.startswith("."))

    def load(self, backup_id: str) -> Manifest:
        where = f"the manifest of backup {backup_id}"
        if not valid_id(backup_id):
            raise DamagedManifest(f"{where} has a file name that cannot be a backup id")
        path = self._manifest_path(backup_id)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"the repository has no backup '{backup_id}'") from None
        raw = self._unseal("manifest", backup_id, raw, where)
        manifest = Manifest.loads(raw, where, self._load_map)
        if manifest.id != backup_id:
            raise DamagedManifest(f"{where} names itself '{manifest.id}', not its file name")
        return manifest

    def _load_map(self, manifest: Manifest) -> ChunkMap:
        assert manifest.map_blake3 is not None
        where = f"backup {manifest.id}"
        name = map_name(manifest.id, manifest.map_blake3)
        try:
            data = self._backup_file(name).read_bytes()
        except FileNotFoundError:
            raise DamagedManifest(f"the chunk map file of {where} is missing") from None
        data = self._unseal("map", name, data, f"the chunk map file of {where}")
        return ChunkMap.unpack(data, manifest.chunks, manifest.map_blake3, where,
                               manifest.map_file_blake3)

    def _map_files(self, backup_id: str) -> list[Path]:
        self._checked_id(backup_id)
        return [p for p in (self.root / "backups").glob(f"{backup_id}.*.map")
                if p.name[len(backup_id) + 1:-len(".map")].isalnum()]

    def manifests(self) -> tuple[list[Manifest], list[tuple[str, str]]]:
        """Every readable manifest, and (id, reason) of those that cannot be read."""
        good: list[Manifest] = []
        bad: list[tuple[str, str]] = []
        for backup_id in self.manifest_ids():
            try:
                good.append(self.load(backup_id))
            except (DamagedManifest, NotFound) as exc:
                bad.append((backup_id, str(exc)))
        return good, bad

    def _seal(self, kind: str, name: str, data: bytes) -> bytes:
        return data if self.cipher is None else self.cipher.seal(kind, name, data)

    def _unseal(self, kind: str, name: str, data: bytes, where: str) -> bytes:
        if self.cipher is None:
            return data
        opened = self.cipher.open(kind, name, data)
        if opened is None:
            raise DamagedManifest(f"{where} fails authentication (changed, or not this "
                                  f"backup's)")
        return opened

    def save(self, manifest: Manifest) -> None:
        """Write a manifest and its map atomically and durably (the manifest's rename commits).

        Call it only after the chunks the map names are synced.
        """
        packed, digest = manifest.chunk_map.pack()
        name = map_name(manifest.id, digest)
        map_path = self._backup_file(name)
        write_atomically(map_path, self._seal("map", name, packed))
        manifest.map_file, manifest.map_blake3 = name, digest
        manifest.map_file_blake3 = blake3.blake3(packed).hexdigest()
        manifest.verified = True
        write_atomically(self._manifest_path(manifest.id),
                         self._seal("manifest", manifest.id, manifest.dumps()))
        for old in self._map_files(manifest.id):
            if old.name != name:
                with contextlib.suppress(FileNotFoundError):
                    old.unlink()

    def manifest_bytes(self, manifest: Manifest) -> int:
        """Bytes the manifest and its map take on disk."""
        total = self._manifest_path(manifest.id).stat().st_size
        if manifest.map_file:
            total += (self.root / "backups" / manifest.map_file).stat().st_size
        return total

    def resolve_id(self, ref: str) -> str | None:
        """The file id ``ref`` names exactly or as a unique prefix, without reading it."""
        ids = self.manifest_ids()
        if ref in ids:
            return ref
        matches = [i for i in ids if i.startswith(ref)]
        return matches[0] if len(matches) == 1 else None

    def resolve(self, ref: str) -> Manifest:
        """A backup by id, by unique id prefix, or by image name (its newest complete backup)."""
        ids = self.manifest_ids()
        if ref in ids:
            return self.load(ref)
        if "@" in ref and "-" not in ref.rpartition("@")[2]:
            of_image = [m for m in self.manifests()[0] if m.image == ref and m.complete]
            if of_image:
                return max(of_image, key=lambda m: (m.completed_at or "", m.id))
        matches = [i for i in ids if i.startswith(ref)]
        if len(matches) == 1:
            return self.load(matches[0])
        if matches:
            raise InvalidRequest(f"'{ref}' names {len(matches)} backups; give more of the id")
        raise NotFound(f"the repository {self.root} has no backup '{ref}'")

    # -- running backups --------------------------------------------------------------------
    def new_id(self, image: str) -> tuple[str, int]:
        """Claim a fresh backup id for ``image``; returns it with its held lock's descriptor."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        for n in range(1, 1000):
            backup_id = f"{image}-{stamp}" if n == 1 else f"{image}-{stamp}-{n}"
            if not valid_id(backup_id):
                raise InvalidRequest(f"'{image}' cannot name a backup")
            try:
                fd = os.open(self._lock_path(backup_id),
                             os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                continue
            if self._manifest_path(backup_id).exists():
                os.close(fd)
                continue
            fcntl.flock(fd, fcntl.LOCK_EX)
            return backup_id, fd
        raise AlreadyExists(f"too many backups of {image} started in the same second")

    def claim(self, backup_id: str) -> int | None:
        """Take the running-lock of an existing backup (to resume it); None if it is running."""
        fd = os.open(self._lock_path(backup_id), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def running(self, backup_id: str) -> bool:
        """Whether some process is writing backup ``backup_id`` right now."""
        path = self._lock_path(backup_id)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def finish(self, backup_id: str, fd: int) -> None:
        """Let go of a backup's running-lock once it is complete (the lock file goes too)."""
        with contextlib.suppress(FileNotFoundError):
            if self._manifest_path(backup_id).exists():
                self._lock_path(backup_id).unlink()
        os.close(fd)

    # -- deleting ---------------------------------------------------------------------------
    def delete(self, ref: str) -> DeleteResult:
        """Remove one backup and every chunk that no other backup (complete or not) uses.

        A damaged backup can be deleted by its exact id.  While another backup is damaged no
        chunk is removed (which chunks it needs cannot be known); the backup itself still goes.
        """
        with self.locked(exclusive=True, wait=5.0):
            if ref in self.manifest_ids():
                # The exact id of a manifest file: that file's backup, damaged or not.  Every
                # path below comes from this name, never from what the manifest says.
                target = self._checked_id(ref)
            else:
                try:
                    target = self.resolve(ref).id  # load() checked: the file's own name
                except DamagedManifest as exc:
                    raise InvalidRequest(f"{exc}; delete it by its exact id") from None
            if self.running(target):
                raise WrongState(f"backup {target} is still being written")
            try:
                references: tuple[set[str], set[str]] | None = self._references(exclude=target)
                why = None
            except WrongState as exc:
                references, why = None, str(exc)
            manifest_path = self._manifest_path(target)
            doomed = [*self._map_files(target), self._lock_path(target)]
            manifest_path.unlink()
            fsync_dir(self.root / "backups")
            for path in doomed:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            removed, freed = self._sweep(*references) if references is not None else (0, 0)
        log.info("deleted backup %s: %d chunks removed", target, removed)
        return DeleteResult(target, removed, freed, why)

    def collect_garbage(self) -> tuple[int, int]:
        """Remove chunks no manifest names, and leftovers of killed writers; safe while backups
        run (they hold the shared lock only) and resumable when killed.

        A backup touches every stored chunk it decides to keep (``has_chunk``,
        ``chunk_present``: the mtime set to now, by name) after taking its running-lock, and
        every chunk it writes is new.  The collection takes a cutoff: the oldest running-lock's
        time, or now, whichever is older.  Then it reads every manifest (complete or not) and
        moves each chunk none names aside (``NAME.gc``, one rename), and only then looks at the
        moved file's mtime: touched since the cutoff, it goes back; otherwise it is removed.
        A backup's touch either came before the rename (the mtime says so) or found no file
        (and the backup stores the chunk again).  A killed collection leaves ``.gc`` files,
        which the next one puts back or removes by the same rule.  Raises WrongState (and
        removes nothing) while a manifest is damaged: which chunks it needs cannot be known.

        When the repository's lock can be had exclusively at once (no backup, verify, restore
        or prune holds it, this process included), nothing can run beside the collection and
        it removes everything unnamed, however recent.
        """
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                cutoff = min(time.time(), self._oldest_writer()) - _GC_SLACK
            else:
                cutoff = float("inf")
            return self._sweep(*self._references(), cutoff=cutoff)
        finally:
            os.close(fd)

    def _oldest_writer(self) -> float:
        """When the oldest backup still running took its running-lock (inf: none runs)."""
        oldest = float("inf")
        for path in (self.root / "backups").glob("*.lock"):
            backup_id = path.name[: -len(".lock")]
            if not valid_id(backup_id):
                continue
            try:
                since = path.stat().st_mtime
            except FileNotFoundError:
                continue
            if self.running(backup_id):
                oldest = min(oldest, since)
        return oldest

    def remove_manifest(self, backup_id: str) -> None:
        """Remove one backup's manifest (durably, first), then its map and lock files; its
        chunks are left to :meth:`collect_garbage`."""
        target = self._checked_id(backup_id)
        if self.running(target):
            raise WrongState(f"backup {target} is still being written")
        doomed = [*self._map_files(target), self._lock_path(target)]
        with contextlib.suppress(FileNotFoundError):
            self._manifest_path(target).unlink()
        fsync_dir(self.root / "backups")
        for path in doomed:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _references(self, exclude: str | None = None) -> tuple[set[str], set[str]]:
        """Chunk names and map files every backup but ``exclude`` uses (WrongState if unsure)."""
        live: set[str] = set()
        maps: set[str] = set()
        for backup_id in self.manifest_ids():
            if backup_id == exclude:
                continue
            try:
                manifest = self.load(backup_id)
                live.update(d.hex() for d in manifest.chunk_map.digests())
            except NotFound:
                continue  # removed meanwhile (a concurrent backup replaced nothing: ids are new)
            except DamagedManifest as exc:
                raise WrongState(f"backup {backup_id} is damaged ({exc})") from None
            if manifest.map_file:
                maps.add(manifest.map_file)
        return live, maps

    def _sweep(self, live: set[str], maps: set[str],
               cutoff: float = float("inf")) -> tuple[int, int]:
        """Remove what ``live`` and ``maps`` do not name and was not touched since ``cutoff``
        (the default: everything unnamed, for a caller that holds the lock exclusively)."""
        removed = freed = 0
        stop_after = _gc_stop_after()
        moved = 0
        for sub in sorted((self.root / "chunks").iterdir()):
            if not sub.is_dir():
                continue
            where = os.open(sub, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                for name in sorted(os.listdir(where)):
                    if name.endswith(_GC):
                        removed_here = self._settle_moved(where, name[: -len(_GC)], live,
                                                          cutoff)
                    elif name.endswith((_TMP, _BAD)):
                        if name.endswith(_BAD) or _mtime(where, name) < cutoff:
                            with contextlib.suppress(FileNotFoundError):
                                os.unlink(name, dir_fd=where)
                        continue
                    elif len(name) == 2 * DIGEST_SIZE and name not in live:
                        try:
                            os.rename(name, name + _GC, src_dir_fd=where, dst_dir_fd=where)
                        except FileNotFoundError:
                            continue
                        moved += 1
                        if stop_after is not None and moved >= stop_after:
                            time.sleep(3600)  # a test kills the collection here
                        removed_here = self._settle_moved(where, name, live, cutoff)
                    else:
                        continue
                    if removed_here is not None:
                        removed += 1
                        freed += removed_here
            finally:
                os.close(where)
        for path in (self.root / "backups").iterdir():
            name = path.name
            if name.endswith(_TMP) or (name.endswith(".map") and name not in maps):
                with contextlib.suppress(FileNotFoundError):
                    if path.stat().st_mtime < cutoff:
                        path.unlink()
        self.sync()
        return removed, freed

    @staticmethod
    def _settle_moved(where: int, name: str, live: set[str], cutoff: float) -> int | None:
        """Decide a chunk moved aside to ``NAME.gc``: back under its name when a manifest names
        it or a backup touched it since ``cutoff``, else removed (returns the bytes freed)."""
        moved = name + _GC
        try:
            info = os.stat(moved, dir_fd=where)
        except FileNotFoundError:
            return None
        if name in live or info.st_mtime >= cutoff:
            # A backup may have stored it again meanwhile: the same content, either will do.
            os.rename(moved, name, src_dir_fd=where, dst_dir_fd=where)
            return None
        os.unlink(moved, dir_fd=where)
        return info.st_size


def _mtime(where: int, name: str) -> float:
    try:
        return os.stat(name, dir_fd=where).st_mtime
    except FileNotFoundError:
        return float("inf")


def _gc_stop_after() -> int | None:
    """A test hook: $OWM_TEST_GC_STOP_AFTER=N makes a collection stall after moving N chunks
    aside, so that a test can kill it there.  Unset in service."""
    value = os.environ.get("OWM_TEST_GC_STOP_AFTER")
    return int(value) if value and value.isdigit() else None


def is_repository(path: Path) -> bool:
    return (path / MARKER).is_file()

