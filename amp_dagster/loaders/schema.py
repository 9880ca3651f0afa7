"""Arrow schema helpers the loaders share: keep a table's Arrow schema with it, check data against it, and cast
data to the stored types and back, with errors that name the column.

Stores map several Arrow types onto one of theirs (``binary`` and ``fixed_size_binary(32)`` are both ``bytea``;
``uint32`` and ``int64`` both ``bigint``). Comparing store types would let such data in and leave a table that can
no longer be read back as written. So every loader keeps the Arrow schema it created the table with, and data is
checked against that schema, Arrow type against Arrow type.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import SchemaMismatchError, TerminalError
from .base import TableRef

_UTC = {"utc", "+00:00", "etc/utc", "z", "gmt", "+0000"}


def schema_to_text(schema: pa.Schema) -> str:
    """The schema as ASCII text (base64 of its Arrow IPC form), for a table comment, property or metadata."""
    return base64.b64encode(schema.serialize().to_pybytes()).decode()


def schema_from_text(text: str | bytes | None) -> pa.Schema | None:
    if not text:
        return None
    try:
        return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))
    except (ValueError, pa.ArrowInvalid):
        return None


def canonical(t: pa.DataType) -> pa.DataType:
    """The type with its storage-irrelevant variations removed: views and large forms, dictionaries, extension
    types, nested field names and nullability, and the spellings of UTC."""
    if isinstance(t, pa.BaseExtensionType):
        return canonical(t.storage_type)
    if pa.types.is_dictionary(t):
        return canonical(t.value_type)
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return pa.binary()
    if pa.types.is_timestamp(t):
        return pa.timestamp(t.unit, "UTC" if t.tz and t.tz.lower() in _UTC else t.tz)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t) or pa.types.is_large_list_view(t):
        return pa.list_(canonical(t.value_type))
    if pa.types.is_fixed_size_list(t):
        return pa.list_(canonical(t.value_type), t.list_size)
    if pa.types.is_map(t):
        return pa.map_(canonical(t.key_type), canonical(t.item_type))
    if pa.types.is_struct(t):
        return pa.struct([(f.name, canonical(f.type)) for f in t])
    return t


def arrow_columns(schema: pa.Schema) -> dict[str, tuple[pa.DataType, bool]]:
    """An Arrow schema as name -> (type, nullable), with storage-irrelevant variations removed (:func:`canonical`)."""
    return {f.name: (canonical(f.type), f.nullable) for f in schema}


def check_schema(
    store: str,
    table: TableRef,
    existing: pa.Schema | Mapping[str, Any],
    incoming: pa.Schema | Mapping[str, tuple[Any, bool]],
    *,
    can_add: bool,
) -> list[str]:
    """Compare a table's columns with the data's; returns the new columns to add.

    ``existing`` is the table's stored Arrow schema or, for a table amp_dagster did not create, its columns as
    name -> the store's own type name (and ``incoming`` then as name -> (store type, nullable)). Every difference
    is collected, and one :class:`SchemaMismatchError` names each column and how it differs: a column whose type
    differs, a table column the data lacks, a new column that is not nullable, or (``can_add=False``) any new one.
    """
    have = {n: t for n, (t, _) in arrow_columns(existing).items()} if isinstance(existing, pa.Schema) else existing
    want = arrow_columns(incoming) if isinstance(incoming, pa.Schema) else incoming
    problems = [f"column {n!r} is in the table but not in the data" for n in have if n not in want]
    added = []
    for name, (type_, nullable) in want.items():
        if name in have:
            if have[name] != type_:
                problems.append(f"column {name!r} is {have[name]} in the table but {type_} in the data")
        elif not can_add:
            problems.append(f"column {name!r} ({type_}) is new; call ensure_table(table, data.schema) first to add it")
        elif not nullable:
            problems.append(f"new column {name!r} ({type_}) is not nullable, so existing rows would have no value")
        else:
            added.append(name)
    if problems:
        raise SchemaMismatchError(
            f"{store} table {table} does not fit the data: {'; '.join(problems)}. Cast or select the columns in "
            "the query to match the table, or recreate the table for the new shape."
        )
    return added


def require_columns(schema: pa.Schema, table: TableRef, store: str) -> None:
    """Column names are unique, and the range column (an integer) and the key columns exist in the data."""
    seen: set[str] = set()
    twice = sorted({n for n in schema.names if n in seen or seen.add(n)})
    if twice:
        raise SchemaMismatchError(
            f"{store} table {table}: the data has more than one column named {', '.join(map(repr, twice))}. "
            "Give every column its own name in the query (SELECT ... AS another_name)."
        )
    index = schema.get_field_index(table.range_column)
    if index < 0:
        raise SchemaMismatchError(
            f"{store} table {table}: the data has no column {table.range_column!r} to key rows by range. "
            f"Select it in the query, or set TableRef(range_column=...) to an integer column of the data."
        )
    if not pa.types.is_integer(schema.field(index).type):
        raise SchemaMismatchError(
            f"{store} table {table}: range column {table.range_column!r} is {schema.field(index).type}, "
            "but it must be an integer column (a block number or an integer cursor)."
        )
    missing = [k for k in table.key if schema.get_field_index(k) < 0]
    if missing:
        raise SchemaMismatchError(
            f"{store} table {table}: key column(s) {', '.join(map(repr, missing))} are not in the data; "
            f"the data has {', '.join(schema.names)}."
        )


def widen(stored: pa.Schema, incoming: pa.Schema, added: list[str]) -> pa.Schema:
    """The stored schema with the added columns appended (as the store appends them)."""
    return pa.schema([*stored, *(incoming.field(name) for name in added)])


def cast_columns(
    batch: pa.RecordBatch,
    target: pa.Schema,
    *,
    store: str,
    table: TableRef,
    truncate_timestamps: bool = False,
    reading: bool = False,
) -> pa.RecordBatch:
    """``batch``'s columns, picked by name in ``target``'s order and cast to its types; errors name the column.

    Casts are safe: a value that does not fit fails rather than wraps. The one allowed loss is dropping
    sub-microsecond digits of times when ``truncate_timestamps`` is set. Writing, a null in a non-nullable target
    column fails too.
    """
    arrays = []
    for field in target:
        index = batch.schema.get_field_index(field.name)
        if index < 0:
            raise SchemaMismatchError(f"{store} table {table}: the data has no column {field.name!r}; select it.")
        column = batch.column(index)
        if isinstance(column, pa.ExtensionArray):
            column = column.storage
        if column.type != field.type:
            lossy_time = pa.types.is_timestamp(column.type) or pa.types.is_time(column.type)
            try:
                column = column.cast(field.type, safe=not (truncate_timestamps and lossy_time))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
                raise TerminalError(_cast_message(store, table, field, column, exc, reading)) from None
        if not reading and not field.nullable and column.null_count:
            raise TerminalError(
                f"{store} table {table}: column {field.name!r} is not nullable but the data has "
                f"{column.null_count} null(s) in it. Fill them in the query, or recreate the table nullable."
            )
        arrays.append(column)
    return pa.RecordBatch.from_arrays(arrays, schema=target)


def _cast_message(store: str, table: TableRef, field: pa.Field, column: pa.Array, exc: Exception, reading: bool) -> str:
    where = f"{store} table {table}: column {field.name!r}"
    if reading:
        return f"{where} cannot be read back as {field.type}: {exc}. The stored data no longer matches its schema."
    if (pa.types.is_timestamp(column.type) or pa.types.is_time(column.type)) and column.type.unit == "ns":
        ticks = column.cast(pa.int64()).to_numpy(zero_copy_only=False)
        lossy = column[int(np.flatnonzero(np.nan_to_num(ticks) % 1000)[0])] if len(ticks) else None
        return (
            f"{where} has nanoseconds that {store} (microsecond precision) would drop, e.g. {lossy}. Round it in the "
            "query, or pass truncate_timestamps=True to truncate to microseconds."
        )
    if pa.types.is_integer(column.type) and len(column):
        bounds = pc.min_max(column)
        return (
            f"{where} holds values from {bounds['min'].as_py()} to {bounds['max'].as_py()}, which do not fit "
            f"{field.type}: {exc}. Cast or filter the column in the query."
        )
    return f"{where} ({column.type}) does not fit the table's type {field.type}: {exc}. Cast it in the query."
