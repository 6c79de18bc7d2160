"""When a small buffered write to a disk file may run on the event loop itself.

A 4 KiB write into the page cache costs the kernel a few microseconds, and handing it to a
writer thread costs several times that: the hop, and the GIL passed back and forth between the
loop and the writer, each hand-off a wake-up of the other core. Measured on ext4 (fio 4K random
writes at queue depth 16, a filled cow volume, pages dropped first): 21-25K IOPS at 45 us of
server CPU per write through the writer thread, 77K at 13 us inline.

But the loop must not wait for the disk, and ext4 refuses ``RWF_NOWAIT`` for buffered writes, so
the kernel cannot be asked to refuse instead of blocking. A buffered write blocks when the
kernel throttles writers because too much of memory is dirty (``balance_dirty_pages``), and,
rarely and briefly, on the journal or on page reclaim. :class:`InlineWriteGuard` allows inline
writes only

* while the dirty and under-writeback memory stays below half of the kernel's background
  writeback threshold (read from ``/proc`` every 100 ms): throttling starts well above it, so a
  disk that cannot keep up, or hangs, moves every write back to the writer thread before any
  writer is throttled;
* and not within a back-off period after the kernel blocked inline writes anyway: one that
  took longer than ``STALL``, or slow ones (over ``SLOW``) adding up to more than ``BUDGET``
  within a second. The back-off is 1 s, doubling while it keeps happening, up to 60 s. A
  block of a few milliseconds now and then is common on ext4 (measured: about one of 3-4 ms
  per 5 s job, at journal commits) and costs the loop less than a back-off costs throughput,
  so the loop may lose at most ``BUDGET`` per second to it.

The storage also writes inline only when no queued write to the same file is outstanding, so
that writes to a file stay in the order they were issued.

May import ``owm.common`` only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("owm.storage")

SLOW = 0.001  # seconds: an inline write that took longer was blocked by the kernel
STALL = 0.02  # ... and one that took longer than this sends writes to the writer at once
BUDGET = 0.02  # seconds of slow inline writes allowed per second before a back-off
FIRST_BACKOFF, MAX_BACKOFF = 1.0, 60.0
CHECK_EVERY = 0.1  # seconds between looks at the dirty memory
DIRTY_SHARE = 0.5  # inline while dirty + writeback < this share of the background threshold


def dirty_state() -> tuple[int, int]:
    """(bytes dirty or under writeback, the kernel's background writeback threshold in bytes),
    from ``/proc``; raises OSError or ValueError when they cannot be read."""
    fields: dict[str, int] = {}
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            key, _, rest = line.partition(":")
            if key in ("Dirty", "Writeback", "MemAvailable"):
                fields[key] = int(rest.split()[0]) * 1024
    with open("/proc/sys/vm/dirty_background_bytes") as f:
        threshold = int(f.read())
    if not threshold:
        with open("/proc/sys/vm/dirty_background_ratio") as f:
            threshold = fields["MemAvailable"] * int(f.read()) // 100
    return fields["Dirty"] + fields["Writeback"], threshold


class InlineWriteGuard:
    """Whether a small write may run on the loop now (see the module docstring)."""

    def __init__(self, state: Callable[[], tuple[int, int]] = dirty_state,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._state = state
        self._clock = clock
        self._ok = False
        self._next_check = 0.0
        self._until = 0.0  # inline writes are off until then (a back-off)
        self._backoff = FIRST_BACKOFF
        self._last_stall = float("-inf")
        self._window = float("-inf")  # start of the current second of slow-write accounting
        self._slow = 0.0

    def allows(self) -> bool:
        now = self._clock()
        if now < self._until:
            return False
        if now >= self._next_check:
            self._look(now)
        return self._ok

    def _look(self, now: float) -> None:
        self._next_check = now + CHECK_EVERY
        try:
            dirty, threshold = self._state()
        except (OSError, ValueError, KeyError):
            self._ok = False  # cannot tell: the writer thread never blocks the loop
            return
        ok = dirty < threshold * DIRTY_SHARE
        if ok != self._ok and not ok:
            log.info("inline disk writes off: %d MiB dirty, over %d%% of the background "
                     "writeback threshold", dirty >> 20, int(DIRTY_SHARE * 100))
        self._ok = ok

    def took(self, seconds: float) -> None:
        """An inline write took ``seconds``: one blocked long, or too many blocked a little,
        start a back-off."""
        if seconds <= SLOW:
            return
        now = self._clock()
        if now - self._window > 1.0:
            self._window, self._slow = now, 0.0
        self._slow += seconds
        if seconds <= STALL and self._slow <= BUDGET:
            return
        self._slow = 0.0
        if now - self._last_stall > 4 * MAX_BACKOFF:
            self._backoff = FIRST_BACKOFF  # the last stall is long past: start afresh
        self._last_stall = now
        self._until = now + self._backoff
        log.warning("inline disk writes blocked (the last took %.1f ms): writes go through "
                    "the writer thread for %.0f s", seconds * 1e3, self._backoff)
        self._backoff = min(self._backoff * 2, MAX_BACKOFF)
