"""A RawFile that loses unsynced writes, and can crash at any operation.

Writes go to `current` at once (what reads see) and to a pending list; only
sync() makes them durable. crash() returns what a disk might hold after a
power cut: the durable bytes plus any subset of the pending operations, in
order (the kernel and the device may write back any of them). `fail_at=k`
raises Crash instead of performing the k-th operation, so a test can stop a
workload at every durability step in turn.
"""

from __future__ import annotations

import random


class Crash(Exception):
    pass


class CrashFile:
    def __init__(self, data: bytes = b"", fail_at: int | None = None, name: str = "<crash>") -> None:
        self.durable = bytearray(data)
        self.current = bytearray(data)
        self.pending: list[tuple[str, int, bytes]] = []
        self.ops = 0
        self.fail_at = fail_at
        self.name = name

    def _step(self) -> None:
        if self.fail_at is not None and self.ops == self.fail_at:
            raise Crash(f"crash at operation {self.ops}")
        self.ops += 1

    def pread(self, length: int, offset: int) -> bytes:
        return bytes(self.current[offset:offset + length])

    def pwrite(self, data, offset: int) -> None:
        self._step()
        data = bytes(data)
        _apply(self.current, ("write", offset, data))
        self.pending.append(("write", offset, data))

    def size(self) -> int:
        return len(self.current)

    def truncate(self, size: int) -> None:
        self._step()
        _apply(self.current, ("truncate", size, b""))
        self.pending.append(("truncate", size, b""))

    def sync(self) -> None:
        self._step()
        self.durable = bytearray(self.current)
        self.pending.clear()

    def close(self) -> None:
        pass

    def data_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        return [(offset, length)]

    def crash(self, rng: random.Random) -> bytes:
        """The bytes that survive: durable plus a random ordered subset of pending."""
        out = bytearray(self.durable)
        for op in self.pending:
            if rng.random() < 0.5:
                _apply(out, op)
        return bytes(out)


def _apply(buf: bytearray, op: tuple[str, int, bytes]) -> None:
    kind, offset, data = op
    if kind == "truncate":
        if offset < len(buf):
            del buf[offset:]
        else:
            buf.extend(bytes(offset - len(buf)))
        return
    end = offset + len(data)
    if end > len(buf):
        buf.extend(bytes(end - len(buf)))
    buf[offset:end] = data
