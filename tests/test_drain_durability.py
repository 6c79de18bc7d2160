"""A clean close that drains an image: the session's writes are durable before the close is
recorded, so a power failure at any storage call of that close never leaves an image labelled
transaction-consistent without the closing session's last (acknowledged, unflushed) write.
"""

from __future__ import annotations

from pathlib import Path

from faults import SimPool

from owm.storage.simulated import PowerLost

CHUNK = 65536


async def _scenario(root: Path, crash_at: int | None) -> tuple[dict, bytes, bool]:
    sim = SimPool(root)
    pool = await sim.open()
    await pool.create_volume("v", CHUNK * 8, method="cow", chunk_size=CHUNK)
    volume = pool.volume("v")
    old = await volume.open_session("old")
    await old.write(0, b"A" * 4096, fua=True)
    await pool.preserve("v")
    await old.write(0, b"B" * 4096)  # acknowledged, never flushed: the transaction's last write
    storages = list(sim.storages.values())
    base = [s.calls for s in storages]
    crashed = False
    if crash_at is not None:
        for s, b in zip(storages, base, strict=True):
            s.crash_at = b + crash_at
    try:
        await old.close(clean=True)
    except PowerLost:
        crashed = True
    if crash_at is None:
        calls = sum(s.calls - b for s, b in zip(storages, base, strict=True))
        await pool.close()
        return {"calls": calls}, b"", crashed
    pool = await sim.crash()
    image = pool.volume("v").image(0)
    reader = await pool.volume("v").open_reader(0) if image.state != "broken" else None
    data = await reader.read(0, 4096) if reader is not None else b""
    if reader is not None:
        await reader.close()
    row = {"state": image.state, "consistency": image.consistency}
    await pool.close()
    return row, data, crashed


async def test_power_loss_during_a_draining_close_never_yields_a_false_label(
        tmp_path: Path) -> None:
    counted, _, _ = await _scenario(tmp_path / "dry", None)
    total = int(counted["calls"])
    assert total > 0
    for n in range(1, total + 2):
        row, data, _ = await _scenario(tmp_path / f"crash{n}", n)
        if row["state"] == "drained" and row["consistency"] == "transaction-consistent":
            assert data == b"B" * 4096, (n, row, data[:1])
        else:
            assert row["state"] in ("drained-unclean", "draining"), (n, row)
