"""P3: the Redis loader against a raw pipelined writer of the same commands on the same server (its ceiling).

The reference sends the commands the loader sends, in the key layout its docstring gives (per 16,384 rows, ZADD of
the block index, then DEL and HSET per row, since a key written again is a whole new row) over one raw pipelined
socket, as the loader does; they are built per row in Python before the timed span, so the reference times only the
socket and the server. Both write into Redis database 15 under keys of their own (a prefix per run, deleted between
rounds by a prefix scan: the server is shared, so nothing is flushed). The reference is checked by a server-side
script over its index, the loader through its own ``read``: row count, sum of ``log_index`` and the number of
non-null fields must match the Arrow data.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import redis

from amp_dagster.loaders.base import TableRef
from amp_dagster.loaders.redis import RedisLoader
from amp_dagster.ranges import RowRange

from ..services import REDIS_URL, require_redis
from .harness import GOALS, Case, batches, compare, logs_table

DB = 15
CHUNK = 16_384
PREFIX = f"amp_bench_{os.getpid()}"  # keys of this run only: the server is shared
TABLE = TableRef("logs", namespace="eth", key=("block_num", "log_index"))
AREA = f"{PREFIX}_raw:{{eth:logs}}:g0".encode()  # the reference's own keys, shaped like the loader's
CHECK = """local rows, sum, fields = 0, 0, 0
for _, k in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local key = KEYS[1] .. ':' .. k
  rows = rows + 1
  sum = sum + tonumber(redis.call('HGET', key, 'log_index'))
  fields = fields + redis.call('HLEN', key)
end
return {rows, sum, fields}"""


def _command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def _text(value) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def reference_commands(table: pa.Table) -> tuple[list[bytes], int]:
    """The loader's commands, built the obvious way (per row, in Python), and the reply lines they produce."""
    ints = table.set_column(3, "timestamp", pc.cast(table["timestamp"], pa.int64()))
    chunks, lines = [], 0
    for batch in ints.to_batches(max_chunksize=CHUNK):
        rows = batch.to_pylist()
        members = [b"%d:%d" % (r["block_num"], r["log_index"]) for r in rows]
        zadd = [a for r, m in zip(rows, members, strict=True) for a in (b"%d" % r["_block_num"], m)]
        parts = [_command(b"ZADD", AREA, *zadd)]
        for row, member in zip(rows, members, strict=True):
            fields = [a for name, v in row.items() if v is not None for a in (name.encode(), _text(v))]
            parts.append(_command(b"DEL", AREA + b":" + member) + _command(b"HSET", AREA + b":" + member, *fields))
        chunks.append(b"".join(parts))
        lines += 1 + 2 * len(rows)
    return chunks, lines


def raw_writer(chunks: list[bytes], lines: int) -> None:
    url = urlsplit(REDIS_URL)
    with socket.create_connection((url.hostname, url.port or 6379)) as sock:
        sock.sendall(_command(b"SELECT", b"%d" % DB))
        seen = -1  # the SELECT's reply
        for chunk in chunks:
            sock.sendall(chunk)
        while seen < lines:
            data = sock.recv(1 << 20)
            assert data and b"\n-" not in data and not data.startswith(b"-"), data[:200]
            seen += data.count(b"\n")


def main(rows: int, rounds: int) -> None:
    require_redis()
    table = logs_table(rows)
    url = REDIS_URL.rsplit("/", 1)[0] + f"/{DB}"
    client = redis.Redis.from_url(url)
    loader = RedisLoader(url, prefix=PREFIX)
    chunks, lines = reference_commands(table)
    want = [rows, pc.sum(table["log_index"].cast(pa.int64())).as_py(), _fields(table)]
    low, high = pc.min_max(table["_block_num"]).values()
    whole = RowRange(low.as_py(), high.as_py())

    def fresh() -> None:
        _drop(client)
        loader.ensure_table(TABLE, table.schema)

    def check_raw() -> None:
        got = client.eval(CHECK, 1, AREA)
        assert got == want, f"reference stored {got} != {want} (rows, sum of log_index, fields)"

    def check_loader() -> None:
        stored = total = fields = 0
        for batch in loader.read(TABLE):
            stored += batch.num_rows
            total += pc.sum(batch["log_index"].cast(pa.int64())).as_py() or 0
            fields += _fields(batch)
        got = [stored, total, fields]
        assert got == want, f"loader stored {got} != {want} (rows, sum of log_index, fields)"

    reference, mine = "raw pipelined socket, prebuilt (reference)", "RedisLoader.write (append)"
    staged = "RedisLoader.write(replace=range), staged: no goal"
    try:
        result = compare(
            "P3 Redis: loader vs a raw pipelined writer of the same commands",
            rows,
            [
                Case(reference, lambda: raw_writer(chunks, lines), fresh, check_raw),
                Case(mine, lambda: loader.write(TABLE, batches(table)), fresh, check_loader),
                Case(staged, lambda: loader.write(TABLE, batches(table), replace=whole), fresh, check_loader),
            ],
            rounds,
        )
        result.goal(GOALS["P3"], mine, reference)
    finally:
        loader.close()
        _drop(client)


def _fields(data: pa.Table | pa.RecordBatch) -> int:
    """The hash fields the rows make: one per non-null value."""
    return data.num_rows * data.num_columns - sum(column.null_count for column in data.columns)


def _drop(client: redis.Redis) -> None:
    """Delete every key of this run (the loader's and the reference's), and nothing else."""
    for keys in _pages(client.scan_iter(match=f"{PREFIX}*", count=10_000), 10_000):
        client.unlink(*keys)


def _pages(keys, size: int):
    page = []
    for key in keys:
        page.append(key)
        if len(page) == size:
            yield page
            page = []
    if page:
        yield page
