"""A per-image chunk table: one bit per chunk, persisted as a checkpoint plus a checksummed journal.

The table answers "does this image hold its own copy of chunk c?" (cow, log) or "is chunk c dirty
on this leg?" (mirror).  In memory it is a bytearray bitmap, so a 1 TiB volume of 64 KiB chunks
costs 2 MiB and an empty table costs one allocation: no Python object per chunk.

On storage it is two checkpoint slots (``NAME.ckpt0``/``.ckpt1``, each epoch + bitmap + CRC) and
a journal (``NAME.journal``) of fixed 24-byte records tagged with the epoch of the checkpoint they
follow.  Recovery takes the valid slot with the newest epoch and replays journal records of that
epoch up to the first bad one.  A record is only ever appended after the data it describes is
durable (the caller's job), so a torn journal tail loses only unacknowledged entries.
"""

from __future__ import annotations

import asyncio
import struct
import zlib
from collections.abc import Iterator

from owm.engine.groupsync import GroupSync
from owm.storage import Storage

_RECORD = struct.Struct("<IIBxxxQI")  # magic, epoch, op, chunk, crc32 of the preceding fields
_RECORD_MAGIC = 0x4F574D4A  # "OWMJ"
_SLOT_HEADER = struct.Struct("<IIQI")  # magic, epoch, chunk count, crc32 of the bitmap
_SLOT_MAGIC = 0x4F574D43  # "OWMC"
_SET, _CLEAR = 1, 2
_CHECKPOINT_AFTER = 65536  # journal records before the table is checkpointed


def _record(epoch: int, op: int, chunk: int) -> bytes:
    head = _RECORD.pack(_RECORD_MAGIC, epoch, op, chunk, 0)[:-4]
    return head + struct.pack("<I", zlib.crc32(head))


class ChunkTable:
    def __init__(self, storage: Storage, name: str, chunks: int) -> None:
        self.storage = storage
        self.name = name
        self.chunks = chunks
        self.bits = bytearray((chunks + 7) // 8)
        self.count = 0
        self._epoch = 1
        self._slot = 0  # the slot holding the current epoch's checkpoint
        self._journal_len = 0  # records in the journal for this epoch
        self._pending: list[bytes] = []  # records not yet written to the journal
        self._force_checkpoint = False
        self._writing = False  # a journal write and sync is under way
        self._commit = GroupSync(self._write_and_sync)

    # -- queries -----------------------------------------------------------------------------
    def has(self, chunk: int) -> bool:
        return bool(self.bits[chunk >> 3] & (1 << (chunk & 7)))

    def __iter__(self) -> Iterator[int]:
        """The set chunks in ascending order, scanning 8 bytes at a time."""
        bits = self.bits
        full = len(bits) // 8
        words = memoryview(bits)[: full * 8].cast("Q")
        for w, word in enumerate(words):
            if word:
                base = w * 64
                for b in range(64):
                    if word >> b & 1:
                        yield base + b
        for i in range(full * 8, len(bits)):
            byte = bits[i]
            for b in range(8):
                if byte >> b & 1:
                    yield i * 8 + b

    # -- updates -----------------------------------------------------------------------------
    def _flip(self, chunk: int, value: bool) -> bool:
        byte, mask = chunk >> 3, 1 << (chunk & 7)
        if bool(self.bits[byte] & mask) == value:
            return False
        self.bits[byte] ^= mask
        self.count += 1 if value else -1
        return True

    def set(self, chunk: int) -> None:
        """Mark chunk; the record reaches the journal at the next commit."""
        if self._flip(chunk, True):
            self._pending.append(_record(self._epoch, _SET, chunk))

    def clear(self, chunk: int) -> None:
        if self._flip(chunk, False):
            self._pending.append(_record(self._epoch, _CLEAR, chunk))

    async def set_durable(self, chunk: int) -> None:
        self.set(chunk)
        await self.commit()

    async def commit(self) -> None:
        """Make every update made so far durable (group-committed with concurrent callers)."""
        # With nothing pending a commit under way may still hold this caller's records: wait
        # for it (by joining the next one) rather than report them durable before they are.
        if self._pending or self._writing:
            await self._commit()

    async def _write_and_sync(self) -> None:
        self._writing = True
        try:
            if self._force_checkpoint or self._journal_len >= _CHECKPOINT_AFTER:
                self._force_checkpoint = False
                await self._checkpoint()
            else:
                await self._append()
        finally:
            self._writing = False

    async def _append(self) -> None:
        records, self._pending = self._pending, []
        if not records:
            return
        offset = self._journal_len * _RECORD.size
        self._journal_len += len(records)
        try:
            await self.storage.write(self.name + ".journal", offset, b"".join(records))
            await self.storage.sync(self.name + ".journal")
        except BaseException:
            # Not durable: the next commit writes them again, at the same place.
            self._pending[:0] = records
            self._journal_len = offset // _RECORD.size
            raise

    async def _checkpoint(self) -> None:
        """Write the whole bitmap to the other slot under a new epoch; the journal restarts."""
        taken, self._pending = self._pending, []  # the bitmap already holds their effect
        epoch, slot = self._epoch + 1, 1 - self._slot
        bitmap = bytes(self.bits)
        header = _SLOT_HEADER.pack(_SLOT_MAGIC, epoch, self.chunks, zlib.crc32(bitmap))
        name = f"{self.name}.ckpt{slot}"
        try:
            await self.storage.write(name, 0, header + bitmap)
            await self.storage.sync(name)
        except BaseException:
            self._pending[:0] = taken  # not durable: the next commit journals them after all
            raise
        self._epoch, self._slot, self._journal_len = epoch, slot, 0
        # Updates made while the slot was written are not in it: they follow it in the journal,
        # under its epoch (replay ignores records of any other).
        self._pending = [_record(epoch, op, chunk)
                         for _magic, _epoch, op, chunk, _crc in map(_RECORD.unpack, self._pending)]

    async def checkpoint(self) -> None:
        """Fold the journal into a checkpoint now (used at clean close)."""
        if self._journal_len or self._pending:
            self._force_checkpoint = True
            await self._commit()

    # -- persistence -------------------------------------------------------------------------
    async def load(self) -> None:
        """Rebuild the table from storage after any shutdown, clean or not."""
        best: tuple[int, int, bytes] | None = None
        for slot in (0, 1):
            name = f"{self.name}.ckpt{slot}"
            if not self.storage.exists(name):
                continue
            raw = await self.storage.read(name, 0, _SLOT_HEADER.size + len(self.bits))
            magic, epoch, chunks, crc = _SLOT_HEADER.unpack_from(raw)
            bitmap = raw[_SLOT_HEADER.size :]
            if magic != _SLOT_MAGIC or chunks != self.chunks or zlib.crc32(bitmap) != crc:
                continue
            if best is None or epoch > best[0]:
                best = (epoch, slot, bitmap)
        if best is not None:
            self._epoch, self._slot, bitmap = best
            self.bits[:] = bitmap
        else:
            self._epoch, self._slot = 1, 1
            self.bits[:] = bytes(len(self.bits))
        self._journal_len = 0
        name = self.name + ".journal"
        if self.storage.exists(name):
            await self._replay(name)
        self.count = int.from_bytes(self.bits, "little").bit_count()

    async def _replay(self, name: str) -> None:
        step = 4096 * _RECORD.size
        offset = 0
        while True:
            raw = await self.storage.read(name, offset, step)
            for pos in range(0, len(raw), _RECORD.size):
                magic, epoch, op, chunk, crc = _RECORD.unpack_from(raw, pos)
                head = raw[pos : pos + _RECORD.size - 4]
                if (magic != _RECORD_MAGIC or epoch != self._epoch or zlib.crc32(head) != crc
                        or op not in (_SET, _CLEAR) or chunk >= self.chunks):
                    return
                byte, mask = chunk >> 3, 1 << (chunk & 7)
                if op == _SET:
                    self.bits[byte] |= mask
                else:
                    self.bits[byte] &= ~mask & 0xFF
                self._journal_len += 1
            offset += step
            await asyncio.sleep(0)

    async def destroy(self) -> None:
        for suffix in (".ckpt0", ".ckpt1", ".journal"):
            await self.storage.delete(self.name + suffix)
        self.bits[:] = bytes(len(self.bits))
        self.count = 0
