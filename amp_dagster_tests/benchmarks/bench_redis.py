"""P3: the Redis loader against a raw pipelined writer of the same commands on the same server (its ceiling).

The reference commands (per 16,384 rows, ZADD of the index, then DEL and HSET per row, since a key written again
is a whole new row) are built per row in Python before the timed span, so the reference times only the socket and
the server. Both cases write the same keys in Redis database 15, which the benchmark flushes between cases. Each
case is checked by a server-side script over the index: row count, sum of ``log_index`` and the number of hash
fields must match the Arrow data.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import redis

from amp_dagster.loaders.base import TableRef
from amp_dagster.loaders.redis import RedisLoader
from amp_dagster.ranges import RowRange

from ..services import REDIS_URL, require_redis
from .harness import Case, batches, compare, logs_table

DB = 15
CHUNK = 16_384
TABLE = TableRef("logs", namespace="eth", key=("block_num", "log_index"))
AREA = b"amp_bench:{eth:logs}:g0"
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
    loader = RedisLoader(url, prefix="amp_bench")
    chunks, lines = reference_commands(table)
    nulls = sum(table[f"topic{i}"].null_count for i in range(4))
    want = [rows, pc.sum(table["log_index"].cast(pa.int64())).as_py(), rows * table.num_columns - nulls]
    low, high = pc.min_max(table["_block_num"]).values()
    whole = RowRange(low.as_py(), high.as_py())

    def fresh() -> None:
        client.flushdb()
        loader.ensure_table(TABLE, table.schema)

    def check() -> None:
        got = client.eval(CHECK, 1, AREA)
        assert got == want, f"stored {got} != {want} (rows, sum of log_index, fields)"

    compare(
        "P3 Redis: loader vs a raw pipelined writer of the same commands",
        rows,
        [
            Case("raw pipelined socket, prebuilt (reference)", lambda: raw_writer(chunks, lines), fresh, check),
            Case("RedisLoader.write (append)", lambda: loader.write(TABLE, batches(table)), fresh, check),
            Case(
                "RedisLoader.write(replace=range) (staged)",
                lambda: loader.write(TABLE, batches(table), replace=whole),
                fresh,
                check,
            ),
        ],
        rounds,
    )
    client.flushdb()
    loader.close()
