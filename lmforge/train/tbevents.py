"""A dependency-free TensorBoard scalar writer (`events.out.tfevents.*` files).

TensorBoard reads TFRecord files of `Event` protocol buffers. Scalars need only three message
fields, so we encode them by hand instead of pulling in TensorFlow or tensorboard's protobufs.
"""

from __future__ import annotations

import math
import os
import socket
import struct
import time
from pathlib import Path


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint((number << 3) | wire_type) + payload


def _length_delimited(number: int, data: bytes) -> bytes:
    return _field(number, 2, _varint(len(data)) + data)


def _event(wall_time: float, step: int, *, file_version: str | None = None, summary: bytes | None = None) -> bytes:
    msg = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        msg += _length_delimited(3, file_version.encode())
    if summary is not None:
        msg += _length_delimited(5, summary)
    return msg


class ScalarWriter:
    """Appends scalars to one event file in `log_dir`, flushed after every write."""

    def __init__(self, log_dir: str | os.PathLike):
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self._file = open(log_dir / name, "ab")
        self._write(_event(time.time(), 0, file_version="brain.Event:2"))

    def _write(self, record: bytes) -> None:
        header = struct.pack("<Q", len(record))
        self._file.write(header + struct.pack("<I", _masked_crc(header)) + record + struct.pack("<I", _masked_crc(record)))
        self._file.flush()

    def add_scalars(self, step: int, values: dict[str, float]) -> None:
        summary = b"".join(
            _length_delimited(1, _length_delimited(1, tag.encode()) + _field(2, 5, struct.pack("<f", _float32(v))))
            for tag, v in values.items() if v is not None
        )
        self._write(_event(time.time(), step, summary=summary))

    def close(self) -> None:
        self._file.close()


_FLOAT32_MAX = 3.4028234663852886e38


def _float32(v) -> float:
    """A scalar as TensorBoard's float32: past its range, infinite (a diverging run's grad norm,
    an LR range test's loss) rather than an OverflowError."""
    v = float(v)
    return math.copysign(math.inf, v) if math.isfinite(v) and abs(v) > _FLOAT32_MAX else v
