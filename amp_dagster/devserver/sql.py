"""SQL handling of the dev server: amp's SETTINGS clause, streaming rules, and planning with DataFusion."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import pyarrow as pa

from . import schemas

_SETTINGS = re.compile(r"\bSETTINGS\s+(\w+\s*=\s*[^,;]+?(?:\s*,\s*\w+\s*=\s*[^,;]+?)*)\s*;?\s*$", re.I | re.S)
_BLOCK_NUM_UDF = re.compile(r"\bblock_num\s*\(\s*\)", re.I)
_INCREMENTAL_NODES = {
    "Projection",
    "Filter",
    "TableScan",
    "SubqueryAlias",
    "Union",
    "Unnest",
    "Values",
    "EmptyRelation",
}
_STREAMABLE_JOINS = {"Inner", "LeftSemi", "RightSemi"}
# plans made only of these nodes, over at most one scan, emit rows in the scan's (block) order on one partition
_ORDER_KEEPING_NODES = {"Projection", "Filter", "TableScan", "SubqueryAlias", "Unnest", "Values", "EmptyRelation"}
# DataFusion's default catalog and schema, renamed to names no query uses: a table name that resolves outside the
# catalog was written with three parts, one that lands in the schema was written bare; amp refuses both (§6)
CATALOG = "amp devserver"
BARE_SCHEMA = "unqualified"


class QueryError(Exception):
    """A query the server refuses; ``code`` is the gRPC status amp would answer with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Dataset:
    """The one raw EVM dataset the dev server serves, and the names SQL may use for it (§6)."""

    name: str = "eth_rpc"
    namespace: str = "_"
    revision: str = "0.0.0"

    def aliases(self) -> list[str]:
        """Schema names that resolve to this dataset: bare ``eth_rpc`` and ``"_/eth_rpc@<revision>"`` forms."""
        full = f"{self.namespace}/{self.name}"
        return [self.name, f"{full}@{self.revision}", f"{full}@latest", f"{full}@dev", full]


@dataclass(frozen=True)
class Prepared:
    """A query ready for DataFusion: SETTINGS removed, streaming decided, ``block_num()`` resolved."""

    text: str
    streaming: bool


def prepare(sql: str, stream_header: str | None) -> Prepared:
    """Strip amp's ``SETTINGS`` clause and decide streaming as amp does (§1).

    The ``amp-stream`` header (true/1/false/0, any case) overrides the clause; ``SETTINGS stream = true`` needs a
    SQL boolean literal, so ``stream = 1`` does not enable streaming.
    """
    if not sql or not sql.strip():
        raise QueryError("INVALID_ARGUMENT", "invalid query: the SQL string is empty")
    body, settings = sql, {}
    match = _SETTINGS.search(sql)
    if match:
        body = sql[: match.start()]
        for pair in match.group(1).split(","):
            key, _, value = pair.partition("=")
            settings[key.strip().lower()] = value.strip().lower()
    streaming = settings.get("stream") == "true"
    header = (stream_header or "").strip().lower()
    if header in ("true", "1"):
        streaming = True
    elif header in ("false", "0"):
        streaming = False
    if _BLOCK_NUM_UDF.search(body):
        if not streaming:
            raise QueryError("INVALID_ARGUMENT", "invalid query: block_num() is only allowed in streaming queries")
        body = _BLOCK_NUM_UDF.sub(schemas.BLOCK_NUM, body)
    return Prepared(body.strip().rstrip(";"), streaming)


def context(dataset: Dataset, tables: Mapping[str, Iterable[pa.RecordBatch]], partitions: int | None = None):
    """A DataFusion session where every alias of the dataset resolves to the given tables' batches."""
    from datafusion import SessionConfig, SessionContext
    from datafusion.catalog import Schema

    config = SessionConfig().with_default_catalog_and_schema(CATALOG, BARE_SCHEMA)
    if partitions:
        config = config.with_target_partitions(partitions)
    ctx = SessionContext(config)
    catalog = ctx.catalog(CATALOG)
    for alias in dataset.aliases():
        catalog.register_schema(alias, Schema.memory_schema())
        quoted = '"' + alias.replace('"', '""') + '"'
        for name, batches in tables.items():
            ctx.register_record_batches(f"{quoted}.{name}", [list(batches) or _empty(name)])
    return ctx


def _empty(name: str) -> list[pa.RecordBatch]:
    return [pa.RecordBatch.from_pylist([], schema=schemas.TABLES[name])]


def plan(ctx, prepared: Prepared, dataset: Dataset):
    """Plan the query (nothing executes); DataFusion's errors become amp's status codes and messages."""
    try:
        frame = ctx.sql(prepared.text)
        optimized = frame.optimized_logical_plan()
    except Exception as exc:
        raise _planning_error(exc, dataset) from None
    for name in frame.schema().names:
        if name.startswith("_") and name != schemas.BLOCK_NUM:
            raise QueryError(
                "INVALID_ARGUMENT", f"invalid query: column alias {name!r} starts with '_', which is reserved"
            )
    return frame, optimized


def _planning_error(exc: Exception, dataset: Dataset) -> QueryError:
    text = str(exc).strip()
    found = re.search(r"table '([^']+)' not found", text)
    if found:
        return _unknown_table(found.group(1), dataset)
    if "ParserError" in text or text.startswith("SQL error"):
        return QueryError("INVALID_ARGUMENT", f"SQL parse error: {text}")
    if "only supports a single SQL statement" in text:
        return QueryError("INVALID_ARGUMENT", "invalid query: exactly one SQL statement is allowed")
    return QueryError("INVALID_ARGUMENT", f"invalid plan: {text}")


def _unknown_table(resolved: str, dataset: Dataset) -> QueryError:
    """amp's refusal of a table reference DataFusion could not resolve, told apart by where it resolved to."""
    full = f"{dataset.namespace}/{dataset.name}@{dataset.revision}"
    example = f'{dataset.name}.blocks or "{full}".blocks'
    if not resolved.startswith(CATALOG + "."):
        return QueryError(
            "INVALID_ARGUMENT",
            "Failed to resolve table references from SQL | Caused by: catalog-qualified table references are not "
            f"supported: {resolved}; name a dataset and a table, as in {example}",
        )
    schema, _, table = resolved[len(CATALOG) + 1 :].rpartition(".")
    name = f"{schema}.{table}" if re.fullmatch(r"[a-z_][a-z0-9_]*", schema) else f'"{schema}".{table}'  # as written
    if schema == BARE_SCHEMA:
        return QueryError(
            "INVALID_ARGUMENT",
            f"unqualified table '{table}': every table must be qualified with a dataset, as in {dataset.name}.{table}",
        )
    if schema not in dataset.aliases():
        return QueryError(
            "NOT_FOUND",
            f"table '{name}' not found: no dataset '{schema}' (this server serves \"{full}\", "
            f"also named {dataset.name})",
        )
    return QueryError(
        "NOT_FOUND",
        f"table '{name}' not found: dataset '{full}' has no table '{table}' "
        f"(its tables: {', '.join(sorted(schemas.TABLES))})",
    )


def keeps_block_order(optimized) -> bool:
    """Whether the plan emits rows in the order of its one table scan, i.e. sorted by block, on one partition."""
    kinds = [type(node.to_variant()).__name__ for node in _walk(optimized)]
    return set(kinds) <= _ORDER_KEEPING_NODES and kinds.count("TableScan") <= 1


def referenced_tables(frame, optimized) -> set[str]:
    """Names of the dataset's tables (blocks, transactions, logs) the query refers to.

    Both plans are read: the optimizer may remove a scan (``WHERE false``), and subqueries only show up as scans
    once it has turned them into joins.
    """
    found = set()
    for node in (*_walk(frame.logical_plan()), *_walk(optimized)):
        variant = node.to_variant()
        if type(variant).__name__ == "TableScan":
            found.add(variant.fqn()[2])
    return found


def non_incremental_operation(optimized) -> str | None:
    """The first operation that keeps a query from streaming, or None if it can stream (§7)."""
    return _check(optimized, inside_join=False)


def _check(node, inside_join: bool) -> str | None:
    variant = node.to_variant()
    kind = type(variant).__name__
    if kind == "Aggregate":
        keys = [str(e) for e in variant.group_by_exprs()]
        # per-block aggregation (GROUP BY block_num() first, DISTINCT ON (block_num(), ...)) streams
        if not keys or not re.search(r"(^|[.(])_block_num\)?$", keys[0]):
            return "Aggregate"
    elif kind == "Join":
        join_type = str(variant.join_type())
        if join_type not in _STREAMABLE_JOINS:
            return f"{join_type} Join"
        if inside_join:
            return "nested Join"
        inside_join = True
    elif kind not in _INCREMENTAL_NODES:
        return kind
    for child in node.inputs():
        found = _check(child, inside_join)
        if found:
            return found
    return None


def has_join(optimized) -> bool:
    return any(type(n.to_variant()).__name__ == "Join" for n in _walk(optimized))


def _walk(node):
    yield node
    for child in node.inputs():
        yield from _walk(child)
