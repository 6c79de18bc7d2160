"""The reference model of DESIGN.md: the semantics every engine and the server are tested against.

It keeps every view as a plain bytearray and applies the rules literally; it is meant to be
obviously right, not fast.  A volume starts with generation 0; ``preserve`` freezes the live
generation's view as a preserved image and makes a new live generation.  A write by a session of
generation k lands in every view from k up to the live one; a read by generation k reads view k.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Model:
    size: int
    views: dict[int, bytearray] = field(default_factory=dict)  # generation -> image bytes
    live: int = 0
    sessions: dict[int, int] = field(default_factory=dict)  # session id -> generation

    def __post_init__(self) -> None:
        if not self.views:
            self.views[0] = bytearray(self.size)

    def open_session(self, session: int) -> int:
        self.sessions[session] = self.live
        return self.live

    def close_session(self, session: int) -> None:
        del self.sessions[session]

    def preserve(self) -> int:
        """Freeze the live view as image N (returned); later sessions get generation N+1."""
        preserved = self.live
        self.live += 1
        self.views[self.live] = bytearray(self.views[preserved])
        return preserved

    def write(self, generation: int, offset: int, data: bytes) -> None:
        for k, view in self.views.items():
            if k >= generation:
                view[offset : offset + len(data)] = data

    def zero(self, generation: int, offset: int, length: int) -> None:
        self.write(generation, offset, bytes(length))

    def read(self, generation: int, offset: int, length: int) -> bytes:
        return bytes(self.views[generation][offset : offset + length])

    def drained(self, image: int) -> bool:
        return image != self.live and all(g > image for g in self.sessions.values())

    def release(self, image: int) -> None:
        assert self.drained(image), "only a drained image may be released"
        del self.views[image]

    def cutover(self, image: int) -> None:
        """Rebind every open session of generation <= image to the next view after it."""
        successor = min(k for k in self.views if k > image)
        for session, generation in self.sessions.items():
            if generation <= image:
                self.sessions[session] = successor


@dataclass
class GroupModel:
    """Consistency groups over several volumes' models, the rules of DESIGN.md literally.

    A group preserve is one cut: every member's model is preserved at the same instant (no
    session opens between two members' preserves), so a session opened before the cut is of
    its volume's old generation and every later one of the new.  Set ``G@N`` names one image
    per member; it is drained when every member image is.
    """

    volumes: dict[str, Model] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)  # group -> member volumes
    sets: dict[str, dict[int, dict[str, int]]] = field(default_factory=dict)  # G -> N -> images
    next_set: dict[str, int] = field(default_factory=dict)

    def create_group(self, name: str, members: list[str]) -> None:
        assert all(m in self.volumes for m in members)
        assert not any(m in ms for ms in self.groups.values() for m in members)
        self.groups[name] = sorted(members)
        self.sets[name] = {}
        self.next_set.setdefault(name, 0)

    def preserve_group(self, name: str) -> tuple[int, dict[str, int]]:
        number = self.next_set[name]
        self.next_set[name] += 1
        images = {m: self.volumes[m].preserve() for m in self.groups[name]}
        self.sets[name][number] = images
        return number, images

    def set_drained(self, name: str, number: int) -> bool:
        return all(self.volumes[m].drained(g) for m, g in self.sets[name][number].items())

    def cutover_set(self, name: str, number: int) -> None:
        for m, g in self.sets[name][number].items():
            self.volumes[m].cutover(g)

    def release_set(self, name: str, number: int) -> None:
        assert self.set_drained(name, number), "only a drained set may be released"
        for m, g in self.sets[name].pop(number).items():
            self.volumes[m].release(g)
