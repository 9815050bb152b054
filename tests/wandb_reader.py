"""Read an offline wandb run (``run-<id>.wandb``) back without a network (field notes §7).

The file is a LevelDB-log: 32 KiB blocks of chunks, each with a 7-byte header
``checksum(4, little-endian masked CRC32C) length(2, little-endian) type(1)``; type FULL=1 holds a
whole record, FIRST=2 / MIDDLE=3 / LAST=4 hold its pieces; a block tail shorter than a header is
zero padding. wandb prefixes the first block with its own 7-byte header (``:W&B`` magic, a
version, and a byte); every record is a ``wandb.proto.wandb_internal_pb2.Record`` protobuf.
Checksums are not verified (the test reads a file written a second earlier).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
WANDB_MAGIC = b":W&B"


def read_chunks(data: bytes) -> list[bytes]:
    """Reassemble the log's records (raw bytes) from its block framing."""
    records: list[bytes] = []
    pending: bytearray | None = None
    pos = HEADER if data[:4] == WANDB_MAGIC else 0
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:
            pos += left_in_block  # zero padding at the end of a block
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        payload = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        if kind == FULL:
            records.append(bytes(payload))
        elif kind == FIRST:
            pending = bytearray(payload)
        elif kind == MIDDLE and pending is not None:
            pending += payload
        elif kind == LAST and pending is not None:
            pending += payload
            records.append(bytes(pending))
            pending = None
        else:
            raise ValueError(f"corrupt wandb log: chunk type {kind} at offset {pos - HEADER - length}")
    return records


def read_records(path: str | Path) -> list[Any]:
    """Every ``Record`` protobuf of a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    out = []
    for raw in read_chunks(Path(path).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        out.append(record)
    return out


def read_finished_records(path: str | Path, wait_seconds: float = 120.0) -> list[Any]:
    """Like :func:`read_records`, once the run's ``exit`` record is in the file.

    ``wandb.finish()`` can return before wandb's service process has flushed the log to disk (seen
    on a loaded 2-core machine: the file read back with 0 history rows, then all of them a moment
    later). The ``exit`` record is the last one wandb writes, so its presence means the log is
    complete; this waits for it (a synchronisation, not a timing assertion) and raises if it never
    comes.
    """
    deadline = time.monotonic() + wait_seconds
    while True:
        records = read_records(path) if Path(path).exists() else []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: no exit record after {wait_seconds:.0f} s; the wandb run never finished")
        time.sleep(0.5)


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """The rows passed to ``wandb.log`` (history records) of a finished run, keys joined with '/' and
    values JSON-decoded."""
    rows = []
    for record in read_finished_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows
