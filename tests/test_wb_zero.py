"""The all-zero test on the copy path (``Engine.all_zero``), which decides whether a copied chunk
is written or punched as a hole: right for every length and position of a non-zero byte."""

from __future__ import annotations

import pytest

from owm.engine.cow import CowEngine
from owm.storage.simulated import SimulatedStorage


@pytest.mark.parametrize("length", [1, 511, 4096, 65536, 65537, 3 * 65536 + 100])
def test_all_zero_finds_any_non_zero_byte(length: int) -> None:
    engine = CowEngine(SimulatedStorage(), 1 << 24, 65536)
    assert engine.all_zero(bytes(length))
    assert engine.all_zero(memoryview(bytearray(length)))
    for at in {0, length // 2, length - 1}:
        data = bytearray(length)
        data[at] = 1
        assert not engine.all_zero(bytes(data)), at
        assert not engine.all_zero(memoryview(data)), at
