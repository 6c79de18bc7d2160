"""A per-image chunk table: one bit per chunk, persisted as a checkpoint plus a checksummed journal.

The table answers "does this image hold its own copy of chunk c?" (cow, log) or "is chunk c dirty
on this leg?" (mirror).  In memory it is sparse: a dict of fixed-size bitmap pages (4 KiB, 32768
chunks each) holding only the pages with a bit set, so memory, checkpoints and loading cost what
is set, not the volume's size (a 1 PiB volume's empty table is one dict).

On storage it is two checkpoint slots (``NAME.ckpt0``/``.ckpt1``: a header with its own CRC, then
the non-empty pages, with a CRC over everything) and a journal (``NAME.journal``) of 32-byte
records.  Each record carries the epoch of the checkpoint it follows, its own index in the
journal and the index of the first record of the batch it was written with, and a CRC.
Batches are written and synced one after the other (group commit), so a valid record from a
batch that starts after index i proves that the record at i was once written and synced.

Recovery takes the valid slot with the newest epoch and replays the journal records of that
epoch, in order, up to the first one that is not valid.  What that one is decides the rest:

* zeroes or a record of an older epoch: the end of the journal, or a torn tail after a crash
  (a sector either holds what was written or what was there before), which is normal;
* a record of this epoch that fails its CRC (a flip anywhere in it: with the magic and epoch
  forced to this epoch's, the CRC tells), or zeroes where a later batch proves a record was
  synced: corruption.  The table is then ``damaged`` (a sentence saying why); the engine marks
  what it serves from it as damaged and never serves that as good.

A record is appended only after the data it describes is durable (the caller's job), and a
checkpoint is written only after the pending records reached the journal, so the older slot
plus the journal rebuild the table: a corrupt slot falls back to the other one with a
``warnings`` entry, and is damage only when the journal has already moved on past it.

Tables in the previous format (a dense bitmap per slot, 24-byte records) are read the way that
format was read, then rewritten in this one at once.
"""

from __future__ import annotations

import asyncio
import struct
import zlib
from collections.abc import Awaitable, Iterator

from owm.engine.groupsync import GroupSync
from owm.storage import Storage

# magic, epoch, op, index in the journal, index of its batch's first record, chunk, crc32
_RECORD = struct.Struct("<IIBxxxIIQI")
_RECORD_MAGIC = 0x4B4D574F  # "OWMK"
_SLOT_HEADER = struct.Struct("<IIQQII")  # magic, epoch, chunks, pages, crc of body, crc of header
_SLOT_MAGIC = 0x504D574F  # "OWMP"
_PAGE_INDEX = struct.Struct("<Q")
_SET, _CLEAR = 1, 2
GONE = ".gone"  # suffix of the tombstone a destroy writes before deleting the parts
_CHECKPOINT_AFTER = 65536  # journal records before the table is checkpointed
PAGE_BYTES = 4096
PAGE_SHIFT = 15  # chunks per page: 8 * PAGE_BYTES
PAGE_MASK = (1 << PAGE_SHIFT) - 1
_REPLAY_STEP = 4096  # records read per storage call during replay
# The previous format (a dense bitmap per slot, 24-byte records): read once, then rewritten.
_V1_RECORD = struct.Struct("<IIBxxxQI")  # magic, epoch, op, chunk, crc32 of the preceding fields
_V1_RECORD_MAGIC = 0x4F574D4A  # "OWMJ"
_V1_SLOT = struct.Struct("<IIQI")  # magic, epoch, chunk count, crc32 of the bitmap
_V1_SLOT_MAGIC = 0x4F574D43


def chunks_of_page(first: int, bits: int) -> Iterator[int]:
    """The chunks set in one page's bits (as ``ChunkTable.page_bits`` gives them), ascending."""
    words = memoryview(bits.to_bytes(PAGE_BYTES, "little")).cast("Q")
    for w, word in enumerate(words):
        if word:
            for b in range(64):
                if word >> b & 1:
                    yield first + w * 64 + b


class ChunkTable:
    def __init__(self, storage: Storage, name: str, chunks: int) -> None:
        self.storage = storage
        self.name = name
        self.chunks = chunks
        self.count = 0
        self._pages: dict[int, bytearray] = {}
        self._page_count: dict[int, int] = {}  # bits set per page: empty pages are dropped
        self._epoch = 1
        self._slot = 0  # the slot holding the current epoch's checkpoint
        self._journal_len = 0  # records in the journal for this epoch
        self._pending: list[tuple[int, int]] = []  # (op, chunk) not yet written to the journal
        self._force_checkpoint = False
        self._writing = False  # a journal or checkpoint write and sync is under way
        self._commit = GroupSync(self._write_and_sync)
        self.damaged: str | None = None  # why the loaded table cannot be trusted
        self.gone = False  # load found the tombstone of a destroy that a crash interrupted
        self.warnings: list[str] = []  # what load found and repaired
        self.writes = 0  # journal or checkpoint writes performed (for tests and status)
        # The engine's storage may want to know which tables have something to commit, so that
        # a flush visits those only (``SyncTracking.note_table``).
        self._note = getattr(storage, "note_table", None)

    # -- queries -----------------------------------------------------------------------------
    def has(self, chunk: int) -> bool:
        page = self._pages.get(chunk >> PAGE_SHIFT)
        if page is None:
            return False
        within = chunk & PAGE_MASK
        return bool(page[within >> 3] >> (within & 7) & 1)

    def unset(self, first: int, last: int) -> list[int]:
        """The chunks of first..last that are not set, ascending.  A page at a time, as
        ``set_range`` works, so a run that is all set costs one slice per page rather than a
        ``has`` per chunk."""
        out: list[int] = []
        c = first
        while c <= last:
            p = c >> PAGE_SHIFT
            end = min(last, p << PAGE_SHIFT | PAGE_MASK)
            page = self._pages.get(p)
            if page is None:
                out.extend(range(c, end + 1))
            else:
                lo, hi = c & PAGE_MASK, end & PAGE_MASK
                b0, b1 = lo >> 3, (hi >> 3) + 1
                gaps = ((1 << (hi - lo + 1)) - 1) << (lo & 7) & \
                    ~int.from_bytes(page[b0:b1], "little")
                base = (p << PAGE_SHIFT) + (b0 << 3)
                while gaps:
                    low = gaps & -gaps
                    out.append(base + low.bit_length() - 1)
                    gaps ^= low
            c = end + 1
        return out

    def __iter__(self) -> Iterator[int]:
        """The set chunks in ascending order, scanning 8 bytes at a time."""
        for p in sorted(self._pages):
            base = p << PAGE_SHIFT
            for w, word in enumerate(memoryview(self._pages[p]).cast("Q")):
                if word:
                    for b in range(64):
                        if word >> b & 1:
                            yield base + w * 64 + b

    def page_bits(self) -> Iterator[tuple[int, int]]:
        """(first chunk of the page, its bits as an int) for every non-empty page."""
        for p, page in self._pages.items():
            yield p << PAGE_SHIFT, int.from_bytes(page, "little")

    # -- updates -----------------------------------------------------------------------------
    def _flip(self, chunk: int, value: bool) -> bool:
        p, within = chunk >> PAGE_SHIFT, chunk & PAGE_MASK
        byte, mask = within >> 3, 1 << (within & 7)
        page = self._pages.get(p)
        if page is None:
            if not value:
                return False
            page = self._pages[p] = bytearray(PAGE_BYTES)
            self._page_count[p] = 0
        if bool(page[byte] & mask) == value:
            return False
        page[byte] ^= mask
        self.count += 1 if value else -1
        left = self._page_count[p] + (1 if value else -1)
        if left:
            self._page_count[p] = left
        else:
            del self._pages[p], self._page_count[p]
        return True

    def set(self, chunk: int) -> None:
        """Mark chunk; the record reaches the journal at the next commit."""
        if self._flip(chunk, True):
            self._pending.append((_SET, chunk))
            if self._note is not None:
                self._note(self)

    def set_range(self, first: int, last: int) -> None:
        """Mark chunks first..last (inclusive): a page at a time, on the bytes of the page the
        run covers as one integer, so a run already set costs one slice per page.  Each chunk it
        newly sets still gets its own journal record, in ascending order, as ``set`` gives."""
        pages, counts, pending = self._pages, self._page_count, self._pending
        added = 0
        c = first
        while c <= last:
            p = c >> PAGE_SHIFT
            end = min(last, p << PAGE_SHIFT | PAGE_MASK)
            lo, hi = c & PAGE_MASK, end & PAGE_MASK
            b0, b1 = lo >> 3, (hi >> 3) + 1
            page = pages.get(p)
            if page is None:
                page = pages[p] = bytearray(PAGE_BYTES)
                counts[p] = 0
            old = int.from_bytes(page[b0:b1], "little")
            mask = ((1 << (hi - lo + 1)) - 1) << (lo & 7)
            new = mask & ~old
            if new:
                page[b0:b1] = (old | mask).to_bytes(b1 - b0, "little")
                n = new.bit_count()
                counts[p] += n
                added += n
                if n == end - c + 1:
                    pending.extend([(_SET, chunk) for chunk in range(c, end + 1)])
                else:
                    base = (p << PAGE_SHIFT) + (b0 << 3)
                    while new:
                        low = new & -new
                        pending.append((_SET, base + low.bit_length() - 1))
                        new ^= low
            c = end + 1
        if added:
            self.count += added
            if self._note is not None:
                self._note(self)

    def clear(self, chunk: int) -> None:
        if self._flip(chunk, False):
            self._pending.append((_CLEAR, chunk))
            if self._note is not None:
                self._note(self)

    async def set_durable(self, chunk: int) -> None:
        self.set(chunk)
        await self.commit()

    @property
    def idle(self) -> bool:
        """Is every update made so far durable (nothing to commit, no commit under way)?"""
        return not (self._pending or self._force_checkpoint or self._writing)

    def commit(self) -> Awaitable[None]:
        """Make every update made so far durable (group-committed with concurrent callers).

        With nothing to commit it returns a finished future, not a coroutine, so that a flush
        over a thousand idle tables gathers no thousand tasks."""
        # With nothing pending a commit under way may still hold this caller's records: wait
        # for it (by joining the next one) rather than report them durable before they are.
        if not self.idle:
            return self._commit()
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def _write_and_sync(self) -> None:
        self._writing = True
        try:
            for _ in range(3):
                if not self._pending:
                    break
                # Every record reaches the journal before a checkpoint that holds its effect,
                # so that the older slot plus the journal can stand in for a corrupt newer slot.
                await self._append()
            if self._force_checkpoint or self._journal_len >= _CHECKPOINT_AFTER:
                self._force_checkpoint = False
                try:
                    await self._checkpoint()
                except BaseException:
                    self._force_checkpoint = True  # its records are journaled: retry it later
                    if self._note is not None:
                        self._note(self)
                    raise
        finally:
            self._writing = False

    async def _append(self) -> None:
        records, self._pending = self._pending, []
        first = self._journal_len
        # The epoch is the one in force when the batch is written, never when it was queued:
        # a record queued during a checkpoint belongs after that checkpoint.
        out = bytearray()
        for i, (op, chunk) in enumerate(records):
            head = _RECORD.pack(_RECORD_MAGIC, self._epoch, op, first + i, first, chunk, 0)[:-4]
            out += head
            out += struct.pack("<I", zlib.crc32(head))
        self._journal_len += len(records)
        self.writes += 1
        try:
            await self.storage.write(self.name + ".journal", first * _RECORD.size, out)
            await self.storage.sync(self.name + ".journal")
        except BaseException:
            # Not durable: the next commit writes them again, at the same place.
            self._pending[:0] = records
            self._journal_len = first
            if self._note is not None:
                self._note(self)
            raise

    async def _checkpoint(self) -> None:
        """Write the non-empty pages to the other slot under a new epoch; the journal restarts."""
        epoch, slot = self._epoch + 1, 1 - self._slot
        body = bytearray()
        pages = sorted(self._pages)
        for p in pages:
            body += _PAGE_INDEX.pack(p)
            body += self._pages[p]
        head = _SLOT_HEADER.pack(_SLOT_MAGIC, epoch, self.chunks, len(pages), zlib.crc32(body),
                                 0)[:-4]
        header = head + struct.pack("<I", zlib.crc32(head))
        name = f"{self.name}.ckpt{slot}"
        self.writes += 1
        await self.storage.write(name, 0, header + body)
        await self.storage.sync(name)
        self._epoch, self._slot, self._journal_len = epoch, slot, 0

    async def checkpoint(self) -> None:
        """Fold the journal into a checkpoint now (used at clean close)."""
        if self._journal_len or self._pending:
            self._force_checkpoint = True
            await self._commit()

    # -- persistence -------------------------------------------------------------------------
    def _max_pages(self) -> int:
        return (self.chunks + PAGE_MASK) >> PAGE_SHIFT

    async def _read_slot(self, name: str) -> tuple[int, dict[int, bytearray]] | None:
        """(epoch, pages) of a valid slot, None for a corrupt one."""
        raw = await self.storage.read(name, 0, _SLOT_HEADER.size)
        magic, epoch, chunks, npages, body_crc, head_crc = _SLOT_HEADER.unpack(raw)
        if (magic != _SLOT_MAGIC or zlib.crc32(raw[:-4]) != head_crc or chunks != self.chunks
                or npages > self._max_pages() or epoch < 2):
            return None
        size = _PAGE_INDEX.size + PAGE_BYTES
        body = await self.storage.read(name, _SLOT_HEADER.size, npages * size)
        if zlib.crc32(body) != body_crc:
            return None
        pages: dict[int, bytearray] = {}
        last = -1
        for i in range(npages):
            (p,) = _PAGE_INDEX.unpack_from(body, i * size)
            page = bytearray(body[i * size + _PAGE_INDEX.size : (i + 1) * size])
            if p <= last or p >= self._max_pages() or not any(page):
                return None
            pages[p] = page
            last = p
        return epoch, pages

    async def load(self) -> None:
        """Rebuild the table from storage after any shutdown, clean or not."""
        self.damaged, self.warnings, self.gone = None, [], False
        if self.storage.exists(self.name + GONE):
            # A destroy began: its owner no longer needed the content (cow: moved down; mirror:
            # copied), so what is left of the parts is neither read nor judged; the owner
            # finishes the destroy, and treats the table as empty (or, where an empty table
            # would claim too much, as unknown: see ``gone``'s users).
            self._pages, self._page_count, self.count = {}, {}, 0
            self.gone = True
            return
        best: tuple[int, int, dict[int, bytearray]] | None = None
        present, corrupt = 0, []
        for slot in (0, 1):
            name = f"{self.name}.ckpt{slot}"
            if not self.storage.exists(name):
                continue
            present += 1
            found = await self._read_slot(name)
            if found is None:
                corrupt.append(name)
            elif best is None or found[0] > best[0]:
                best = (found[0], slot, found[1])
        previous = best is None and await self._is_previous_format()
        if previous:
            await self._load_previous_format()
            corrupt = []
        elif best is not None:
            self._epoch, self._slot, self._pages = best[0], best[1], best[2]
        else:
            # No checkpoint yet (epoch 1); with both slots present and bad, nothing can stand in.
            self._epoch, self._slot, self._pages = 1, 1, {}
            if present == 2:
                self.damaged = f"both checkpoints of chunk table {self.name} are corrupt"
        self._journal_len = 0
        newer = False
        name = self.name + ".journal"
        if self.storage.exists(name) and not previous:
            newer = await self._replay(name)
        self._page_count = {}
        for p, page in list(self._pages.items()):
            n = int.from_bytes(page, "little").bit_count()
            if n:
                self._page_count[p] = n
            else:
                del self._pages[p]
        self.count = sum(self._page_count.values())
        if previous:
            # Rewrite it in this format now: a new checkpoint, then the old objects go.
            await self._checkpoint()
            await self.storage.delete(f"{self.name}.ckpt{1 - self._slot}")
            await self.storage.delete(name)
        try:
            self._judge_slots(corrupt, newer)
        finally:
            if self._force_checkpoint and self._note is not None:
                self._note(self)

    def _judge_slots(self, corrupt: list[str], newer: bool) -> None:
        if corrupt and self.damaged is None:
            if newer:
                self.damaged = (
                    f"checkpoint {corrupt[0]} is corrupt and the journal has moved on past the "
                    "other one"
                )
            else:
                self.warnings.append(
                    f"checkpoint {corrupt[0]} is corrupt; chunk table {self.name} was rebuilt "
                    "from the other checkpoint and its journal"
                )
                self._force_checkpoint = True  # rewrite the bad slot at the next commit

    async def _is_previous_format(self) -> bool:
        for suffix in (".ckpt0", ".ckpt1", ".journal"):
            name = self.name + suffix
            if self.storage.exists(name):
                magic = int.from_bytes(await self.storage.read(name, 0, 4), "little")
                if magic in (_V1_SLOT_MAGIC, _V1_RECORD_MAGIC):
                    return True
        return False

    async def _load_previous_format(self) -> None:
        """The table as the previous format's recovery rebuilt it: the newest valid slot, then
        that epoch's journal records up to the first bad one."""
        nbytes = (self.chunks + 7) // 8
        best: tuple[int, int, bytes] | None = None
        for slot in (0, 1):
            name = f"{self.name}.ckpt{slot}"
            if not self.storage.exists(name):
                continue
            raw = await self.storage.read(name, 0, _V1_SLOT.size + nbytes)
            magic, epoch, chunks, crc = _V1_SLOT.unpack_from(raw)
            bitmap = raw[_V1_SLOT.size :]
            valid = magic == _V1_SLOT_MAGIC and chunks == self.chunks and \
                zlib.crc32(bitmap) == crc
            if valid and (best is None or epoch > best[0]):
                best = (epoch, slot, bitmap)
        epoch, slot = (best[0], best[1]) if best is not None else (1, 1)
        bits = bytearray(best[2] if best is not None else nbytes)
        name = self.name + ".journal"
        offset = 0
        while self.storage.exists(name):
            raw = await self.storage.read(name, offset, _REPLAY_STEP * _V1_RECORD.size)
            for at in range(0, len(raw), _V1_RECORD.size):
                magic, rec_epoch, op, chunk, crc = _V1_RECORD.unpack_from(raw, at)
                if (magic != _V1_RECORD_MAGIC or rec_epoch != epoch or op not in (_SET, _CLEAR)
                        or zlib.crc32(raw[at : at + _V1_RECORD.size - 4]) != crc
                        or chunk >= self.chunks):
                    break
                if op == _SET:
                    bits[chunk >> 3] |= 1 << (chunk & 7)
                else:
                    bits[chunk >> 3] &= ~(1 << (chunk & 7)) & 0xFF
            else:
                offset += len(raw)
                await asyncio.sleep(0)
                continue
            break
        self._epoch, self._slot = epoch, slot
        self._pages = {}
        for p in range(0, len(bits), PAGE_BYTES):
            piece = bits[p : p + PAGE_BYTES]
            if any(piece):
                self._pages[p // PAGE_BYTES] = bytearray(piece.ljust(PAGE_BYTES, b"\0"))

    def _classify(self, rec: bytes, pos: int) -> str:
        """What the 32 bytes at journal index ``pos`` are: "ours" (a valid record of this epoch
        at its place), "zero", "stale" (an older epoch's record, intact or not), "newer" (a valid
        record of a later epoch) or "corrupt" (a record of this epoch that a flip damaged)."""
        magic, epoch, op, index, _batch, chunk, crc = _RECORD.unpack(rec)
        body = rec[:-4]
        if zlib.crc32(body) == crc and magic == _RECORD_MAGIC:
            if epoch == self._epoch:
                return "ours" if index == pos and op in (_SET, _CLEAR) and chunk < self.chunks \
                    else "corrupt"
            return "stale" if epoch < self._epoch else "newer"
        if not any(rec):
            return "zero"
        if magic == _RECORD_MAGIC and epoch == self._epoch:
            return "corrupt"  # a flip in op, index, batch, chunk, padding or the CRC
        # A flip in the magic or the epoch: the CRC tells whether this epoch's record it was.
        mine = struct.pack("<II", _RECORD_MAGIC, self._epoch)
        if zlib.crc32(mine + body[8:]) == crc:
            return "corrupt"
        return "stale"

    async def _replay(self, name: str) -> bool:
        """Apply this epoch's records; judge what follows them.  Returns True when a valid
        record of a newer epoch was seen (the newest checkpoint must have been lost)."""
        offset = 0
        pos = 0
        end: int | None = None  # index of the first record that is not ours
        end_kind = ""
        proof: int | None = None  # a valid record of this epoch after ``end``, of a later batch
        newer = False
        untidy = False  # records of this epoch (or damaged ones) lie beyond ``end``
        size = _RECORD.size
        while True:
            raw = await self.storage.read(name, offset, _REPLAY_STEP * size)
            if not any(raw):
                break
            for at in range(0, len(raw), size):
                rec = raw[at : at + size]
                kind = self._classify(rec, pos)
                newer = newer or kind == "newer"
                if end is None:
                    if kind == "ours":
                        _m, _e, op, _i, _b, chunk, _c = _RECORD.unpack(rec)
                        self._apply(op, chunk)
                        self._journal_len += 1
                    else:
                        end, end_kind = pos, kind
                        untidy = kind in ("corrupt", "newer")
                elif kind in ("ours", "corrupt"):
                    untidy = True
                    if kind == "ours" and proof is None and _RECORD.unpack(rec)[4] > end:
                        proof = pos
                pos += 1
            offset += len(raw)
            await asyncio.sleep(0)
        if end is not None and end_kind == "corrupt":
            self.damaged = (f"journal record {end} of chunk table {self.name} is corrupt, so the "
                            "table cannot be rebuilt past it")
        elif end is not None and proof is not None:
            self.damaged = (f"journal record {end} of chunk table {self.name} is missing but "
                            f"records written after it was synced follow (record {proof})")
        if untidy:
            # Records of this epoch lie behind the point where appending resumes (a torn tail):
            # a new epoch makes sure they are never read as part of the journal.
            self._force_checkpoint = True
        return newer

    def _apply(self, op: int, chunk: int) -> None:
        p, within = chunk >> PAGE_SHIFT, chunk & PAGE_MASK
        page = self._pages.get(p)
        if page is None:
            if op != _SET:
                return
            page = self._pages[p] = bytearray(PAGE_BYTES)
        if op == _SET:
            page[within >> 3] |= 1 << (within & 7)
        else:
            page[within >> 3] &= ~(1 << (within & 7)) & 0xFF

    def forget(self) -> None:
        """Drop what is pending: the table's objects are being deleted."""
        self._pending = []
        self._force_checkpoint = False

    async def destroy(self) -> None:
        # The parts go one by one, and a crash between two deletions would leave an older slot
        # beside a journal of a newer epoch: read as a damaged table, which damages every view
        # resolving through it.  A durable tombstone first makes the leftovers read as "gone".
        # An empty object, created durably (no data: it needs no room on a full disk).
        await self.storage.allocate(self.name + GONE, 0)
        for suffix in (".ckpt0", ".ckpt1", ".journal"):
            await self.storage.delete(self.name + suffix)
        await self.storage.delete(self.name + GONE)
        self._pages, self._page_count = {}, {}
        self.count = 0
        self._pending = []
