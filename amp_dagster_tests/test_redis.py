"""Redis-specific behaviour, checked with plain redis-py reads: key layout, index consistency, TTL, streams, guards."""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import redis

from amp_dagster.errors import ConfigError, NotSupportedError, SchemaMismatchError, TerminalError
from amp_dagster.loaders.base import RowRange, TableRef

from . import data, services
from .stores.redis import RedisHarness

LOG_KEY = ("block_num", "log_index")
SORT_LOGS = [("block_num", "ascending"), ("log_index", "ascending")]


@pytest.fixture
def store(tmp_path):
    services.require_redis()
    harness = RedisHarness(tmp_path)
    yield harness
    harness.cleanup()


@pytest.fixture
def client():
    with redis.Redis.from_url(services.REDIS_URL) as c:
        yield c


def _base(store: RedisHarness, name: str, namespace: str | None = None) -> bytes:
    return f"{store.namespace}:{{{namespace or store.namespace}:{name}}}".encode()


def _live(client, store: RedisHarness, name: str = "logs") -> bytes:
    return _base(store, name) + b":" + client.hget(_base(store, name) + b":meta", "live")


def _assert_index_matches_rows(client, store: RedisHarness, name: str = "logs") -> int:
    """Every index member has its hash and every row hash has its member, scored by its range value."""
    area = _live(client, store, name)
    members = dict(client.zrange(area, 0, -1, withscores=True))
    rows = {k[len(area) + 1 :] for k in client.scan_iter(match=area + b":*", count=1000)}
    assert set(members) == rows
    for member, score in list(members.items())[:50]:
        assert int(client.hget(area + b":" + member, "_block_num")) == score
    return len(rows)


def test_layout_is_one_hash_per_row_plus_a_block_index(store, client):
    loader, table = store.loader(), store.table("logs", key=LOG_KEY)
    logs = data.logs(0, 9)
    loader.ensure_table(table, logs.schema)
    loader.write(table, logs)
    meta = client.hgetall(_base(store, "logs") + b":meta")
    assert meta[b"form"] == b"hash" and meta[b"key"] == b'["block_num", "log_index"]'
    assert pa.ipc.read_schema(pa.py_buffer(meta[b"schema"])) == logs.schema
    area = _live(client, store)
    row = logs.slice(3, 1).to_pylist()[0]
    stored = client.hgetall(area + b":%d:%d" % (row["block_num"], row["log_index"]))
    assert stored[b"tx_hash"] == row["tx_hash"]  # bytes stay raw
    assert stored[b"_block_num"] == str(row["_block_num"]).encode()
    assert stored[b"timestamp"] == str(pc.cast(logs["timestamp"], pa.int64())[3].as_py()).encode()
    for topic in ("topic1", "topic2", "topic3"):  # a null is an absent field
        assert (topic.encode() in stored) == (row[topic] is not None)
    assert client.zscore(area, b"%d:%d" % (row["block_num"], row["log_index"])) == row["_block_num"]
    assert _assert_index_matches_rows(client, store) == logs.num_rows


def test_keys_without_key_columns_are_unique_across_appends(store, client):
    loader, table = store.loader(), store.table("logs")  # no key columns
    logs = data.logs(0, 4)
    loader.ensure_table(table, logs.schema)
    loader.write(table, logs)
    loader.write(table, logs)  # the same rows again: appended, not merged
    assert _assert_index_matches_rows(client, store) == 2 * logs.num_rows
    members = client.zrange(_live(client, store), 0, -1)
    assert all(m.count(b":") == 2 for m in members)  # <range value>:<write number>:<row number>
    assert loader.read(table).read_all().num_rows == 2 * logs.num_rows


def test_key_values_with_separators_do_not_collide(store, client):
    loader, table = store.loader(), store.table("names", key=("a", "b"))
    rows = pa.table(
        {
            "_block_num": pa.array([1, 2, 3], pa.uint64()),
            "a": ["x:y", "x", "x%3Ay"],
            "b": ["z", "y:z", "z"],
        }
    )
    loader.ensure_table(table, rows.schema)
    loader.write(table, rows)
    assert sorted(client.zrange(_live(client, store, "names"), 0, -1)) == [b"x%253Ay:z", b"x%3Ay:z", b"x:y%3Az"]
    assert loader.read(table).read_all().sort_by("_block_num").equals(rows)


def test_table_names_with_separators_do_not_share_keys(store):
    loader = store.loader()
    first = TableRef("b", namespace=store.namespace + ":a", key=("cursor",), range_column="cursor")
    second = TableRef("a:b", namespace=store.namespace, key=("cursor",), range_column="cursor")
    for ref, count in ((first, 3), (second, 5)):
        loader.ensure_table(ref, data.cursor_rows(0, 1).schema)
        loader.write(ref, data.cursor_rows(0, count))
    assert loader.read(first).read_all().num_rows == 3
    assert loader.read(second).read_all().num_rows == 5


def test_index_stays_consistent_through_deletes_replaces_and_refreshes(store, client):
    loader, table = store.loader(), store.table("logs", key=LOG_KEY)
    logs = data.logs(0, 99)
    loader.ensure_table(table, logs.schema)
    loader.write(table, logs)
    loader.write(table, data.logs(20, 39, seed=3), replace=RowRange(20, 39))
    deleted = loader.delete(table, RowRange(80))
    assert deleted == pc.sum(pc.greater_equal(logs["_block_num"], 80)).as_py()
    outside = pc.or_(pc.less(logs["_block_num"], 20), pc.greater(logs["_block_num"], 39))
    kept = pa.concat_tables([logs.filter(outside), data.logs(20, 39, seed=3)])
    kept = kept.filter(pc.less(kept["_block_num"], 80))
    assert _assert_index_matches_rows(client, store) == kept.num_rows
    before = client.dbsize()
    loader.replace_table(table, data.logs(0, 9))
    assert _assert_index_matches_rows(client, store) == data.logs(0, 9).num_rows
    assert client.dbsize() == before - kept.num_rows + data.logs(0, 9).num_rows  # the old area is gone
    assert not [f for f in client.hkeys(_base(store, "logs") + b":meta") if f.startswith(b"stage:")]


def test_failed_replace_range_drops_its_staged_rows(store, client):
    loader, table = store.loader(), store.table("logs", key=LOG_KEY)
    logs = data.logs(0, 49)
    loader.ensure_table(table, logs.schema)
    loader.write(table, logs)
    keys = set(store.keys())
    with pytest.raises(TerminalError, match="outside the range"):
        loader.write(table, data.in_batches(logs, 100), replace=RowRange(0, 29))
    assert set(store.keys()) == keys
    assert _assert_index_matches_rows(client, store) == logs.num_rows


def test_a_crashed_stage_is_removed_by_the_next_full_refresh(store, client):
    loader, table = store.loader(), store.table("logs", key=LOG_KEY)
    logs = data.logs(0, 9)
    loader.ensure_table(table, logs.schema)
    meta, stage = _base(store, "logs") + b":meta", _base(store, "logs") + b":g99"
    # what a process killed mid-stage leaves behind: staged rows and index, listed in meta
    client.zadd(stage, {b"1:1": 1})
    client.hset(stage + b":1:1", "_block_num", 1)
    client.hset(meta, b"stage:g99", 1)
    loader.replace_table(table, logs)
    area = _live(client, store)
    assert set(store.keys()) == {meta, area} | {area + b":" + m for m in client.zrange(area, 0, -1)}
    assert not [f for f in client.hkeys(meta) if f.startswith(b"stage:")]


def test_upsert_replaces_the_whole_row(store, client):
    loader, table = store.loader(), store.table("logs", key=LOG_KEY)
    logs = data.logs(0, 9)
    loader.ensure_table(table, logs.schema)
    loader.write(table, logs)
    row = logs.filter(pc.is_valid(logs["topic1"])).slice(0, 1)
    cleared = row.set_column(
        row.schema.get_field_index("topic1"), "topic1", pa.nulls(1, row.schema.field("topic1").type)
    )
    loader.upsert(table, cleared)
    key = _live(client, store) + b":%d:%d" % (row["block_num"][0].as_py(), row["log_index"][0].as_py())
    assert client.hget(key, "topic1") is None  # not the old value left behind
    got = loader.read(table).read_all().sort_by(SORT_LOGS)
    assert got.num_rows == logs.num_rows and got.filter(pc.is_null(got["topic1"])).num_rows == (
        logs.filter(pc.is_null(logs["topic1"])).num_rows + 1
    )


def test_ttl_expires_rows_and_reads_skip_them(store, client):
    loader, table = store.loader(ttl=3600), store.table("logs", key=LOG_KEY)
    logs = data.logs(0, 19)
    loader.ensure_table(table, logs.schema)
    loader.write(table, logs)
    area = _live(client, store)
    members = client.zrange(area, 0, -1)
    assert all(0 < client.ttl(area + b":" + m) <= 3600 for m in members)
    assert client.ttl(area) == -1 and client.ttl(_base(store, "logs") + b":meta") == -1
    gone = members[:5]
    for m in gone:
        client.pexpire(area + b":" + m, 1)
    time.sleep(0.05)
    assert loader.read(table).read_all().num_rows == logs.num_rows - len(gone)
    assert loader.delete(table, RowRange(0)) == logs.num_rows - len(gone)  # counts rows, not stale members
    assert client.zcard(area) == 0
    with pytest.raises(ConfigError, match="ttl"):
        store.loader(ttl=0)


def test_score_precision_guard(store):
    loader, table = store.loader(), store.table("items", range_column="cursor", key=("cursor",))
    edge = pa.table({"cursor": pa.array([2**53, -(2**53)], pa.int64()), "name": ["max", "min"]})
    loader.ensure_table(table, edge.schema)
    loader.write(table, edge)
    assert loader.delete(table, RowRange(2**53, 2**60)) == 1
    assert loader.delete(table, RowRange(2**53 + 1)) == 0
    beyond = pa.table({"cursor": pa.array([2**53 + 1], pa.int64()), "name": ["x"]})
    with pytest.raises(TerminalError, match=r"'cursor' reaches 9007199254740993, beyond ±2\^53"):
        loader.write(table, beyond)
    assert loader.read(table).read_all().to_pylist() == [{"cursor": -(2**53), "name": "min"}]


def test_stream_form(store, client):
    loader, table = store.loader(form="stream"), store.table("logs")
    assert not loader.capabilities.atomic_replace_range and not loader.capabilities.upsert
    logs = data.logs(0, 29)
    loader.ensure_table(table, logs.schema)
    loader.write(table, data.logs(0, 19))
    area = _live(client, store)
    entries = client.xrange(area)
    assert len(entries) == data.logs(0, 19).num_rows
    first = data.logs(0, 19).slice(0, 1).to_pylist()[0]
    assert entries[0][0].split(b"-")[0] == str(first["_block_num"]).encode()
    assert entries[0][1][b"tx_hash"] == first["tx_hash"]
    loader.write(table, data.logs(20, 29))
    assert loader.delete(table, RowRange(25)) == logs.num_rows - logs.filter(pc.less(logs["_block_num"], 25)).num_rows
    loader.write(table, data.logs(20, 29, seed=1), replace=RowRange(20, 29))  # the tail, twice
    loader.write(table, data.logs(20, 29, seed=1), replace=RowRange(20, 29))
    got = loader.read(table).read_all()
    assert got.equals(logs)
    assert loader.read(table, RowRange(5, 9)).read_all().equals(data.logs(5, 9))
    with pytest.raises(TerminalError, match="replaces only the tail"):
        loader.write(table, data.logs(5, 9), replace=RowRange(5, 9))
    with pytest.raises(NotSupportedError, match="not supported by Redis"):
        loader.upsert(store.table("logs", key=LOG_KEY), logs)
    with pytest.raises(TerminalError, match=r"equal or smaller than the target stream top item.*range order"):
        loader.write(table, data.logs(5, 9))  # an append below the top of the stream
    assert loader.read(table).read_all().equals(logs)
    negative = pa.table({"cursor": pa.array([-1], pa.int64())})
    signed = store.table("signed", range_column="cursor")
    loader.ensure_table(signed, negative.schema)
    with pytest.raises(TerminalError, match="cannot be negative"):
        loader.write(signed, negative)
    loader.replace_table(table, data.logs(0, 4))
    assert loader.read(table).read_all().equals(data.logs(0, 4))
    assert client.xlen(_live(client, store)) == data.logs(0, 4).num_rows and not client.exists(area)


def test_table_settings_must_match(store):
    loader, table = store.loader(), store.table("logs", key=LOG_KEY)
    logs = data.logs(0, 1)
    loader.ensure_table(table, logs.schema)
    with pytest.raises(TerminalError, match=r"created with key=.*block_num"):
        loader.write(store.table("logs", key=("tx_hash",)), logs)
    with pytest.raises(TerminalError, match="created with form='hash'"):
        store.loader(form="stream").write(table, logs)


def test_unsupported_types_and_keys_are_named(store):
    loader = store.loader()
    mapped = pa.schema([("_block_num", pa.uint64()), ("m", pa.map_(pa.string(), pa.int64()))])
    with pytest.raises(TerminalError, match="column 'm'"):
        loader.ensure_table(store.table("maps"), mapped)
    nested_key = pa.schema([("_block_num", pa.uint64()), ("k", pa.list_(pa.int64()))])
    with pytest.raises(TerminalError, match=r"column 'k'.*as a key"):
        loader.ensure_table(store.table("lists", key=("k",)), nested_key)
    with pytest.raises(SchemaMismatchError, match="'nope'"):
        loader.ensure_table(store.table("nokey", key=("nope",)), data.logs(0, 0).schema)


def test_a_refused_command_is_a_terminal_error_naming_it(store, client):
    loader, table = store.loader(), store.table("logs", key=LOG_KEY)
    logs = data.logs(0, 4)
    loader.ensure_table(table, logs.schema)
    row = logs.slice(0, 1).to_pylist()[0]
    client.set(_live(client, store) + b":%d:%d" % (row["block_num"], row["log_index"]), "not a hash")
    with pytest.raises(TerminalError, match="WRONGTYPE"):
        loader.write(table, logs)
    loader.write(table, data.logs(5, 9))  # the loader's connection is still usable afterwards
    assert loader.read(table, RowRange(5)).read_all().num_rows == data.logs(5, 9).num_rows


def test_a_retried_move_changes_nothing(store, client):
    from amp_dagster.loaders.redis import MOVE

    loader, table = store.loader(), store.table("logs", key=LOG_KEY)
    logs = data.logs(0, 19)
    loader.ensure_table(table, logs.schema)
    loader.write(table, logs)
    loader.write(table, data.logs(0, 9, seed=4), replace=RowRange(0, 9))
    meta = _base(store, "logs") + b":meta"
    stage = b"g%d" % int(client.hget(meta, "seq"))
    # the script ran but its reply was lost: the retry must not delete the rows it moved in
    client.eval(MOVE, 3, _live(client, store), _base(store, "logs") + b":" + stage, meta, 0, 9, b"stage:" + stage)
    want = pa.concat_tables([data.logs(0, 9, seed=4), logs.filter(pc.greater(logs["_block_num"], 9))])
    assert loader.read(table).read_all().sort_by(SORT_LOGS).equals(want.sort_by(SORT_LOGS))
