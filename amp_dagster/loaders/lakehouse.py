"""What the Delta Lake and Iceberg loaders share: the Arrow types a table format stores exactly."""

from __future__ import annotations

import pyarrow as pa

from ..errors import TerminalError

_KEPT = {pa.bool_(), pa.int32(), pa.int64(), pa.float32(), pa.float64(), pa.string(), pa.binary(), pa.date32()}
_KEPT.add(pa.null())  # Delta stores it as void; Iceberg v2 refuses it itself, naming the column
_BASE = {
    pa.uint32(): pa.int64(),
    pa.uint64(): pa.decimal128(20, 0),  # exact up to 2^64-1, where int64 would wrap
    pa.float16(): pa.float32(),
    pa.date64(): pa.date32(),
    pa.large_string(): pa.string(),
    pa.string_view(): pa.string(),
    pa.large_binary(): pa.binary(),
    pa.binary_view(): pa.binary(),
}
# not list views: Arrow cannot cast a list back to one, so such a column could not be read back as written
_LISTS = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)


def portable_type(
    t: pa.DataType, column: str, *, store: str, small_ints: bool, keep_fixed_binary: bool, time_as_int: bool
) -> pa.DataType:
    """The Arrow type a table format is given for ``t``: one it stores exactly, and that casts back to ``t``.

    Neither Delta Lake nor Iceberg has unsigned integers or nanoseconds: unsigned integers widen to the next
    signed type (``uint64`` to ``decimal128(20, 0)``) and timestamps become microseconds (UTC when zoned; a
    sub-microsecond value then fails the safe cast unless truncation is asked for). Large and view forms become
    their base form, dictionaries and extension types their values; nested types convert their items.

    - ``small_ints``: the format has 8- and 16-bit integers (Delta), so ``uint8`` → ``int16`` and ``uint16`` →
      ``int32``; otherwise every integer up to 16 bits becomes ``int32`` (Iceberg);
    - ``keep_fixed_binary``: ``fixed_size_binary(n)`` stays (Iceberg's ``fixed[n]``), otherwise it becomes
      ``binary``;
    - ``time_as_int``: times and durations become their integer count (Delta has neither); otherwise times
      become ``time64[us]`` and durations are refused.

    >>> portable_type(pa.uint16(), "n", store="Iceberg", small_ints=False, keep_fixed_binary=True, time_as_int=False)
    DataType(int32)
    """

    def visit(t: pa.DataType) -> pa.DataType:
        if isinstance(t, pa.BaseExtensionType):
            return visit(t.storage_type)
        if pa.types.is_dictionary(t):
            return visit(t.value_type)
        if t in _KEPT:
            return t
        if t in _BASE:
            return _BASE[t]
        if pa.types.is_integer(t):  # the 8- and 16-bit ones
            if not small_ints:
                return pa.int32()
            return pa.int16() if t == pa.uint8() else pa.int32() if t == pa.uint16() else t
        if pa.types.is_timestamp(t):
            return pa.timestamp("us", "UTC" if t.tz else None)
        if time_as_int and (pa.types.is_time(t) or pa.types.is_duration(t)):
            return pa.int32() if pa.types.is_time32(t) else pa.int64()
        if pa.types.is_time(t):
            return pa.time64("us")
        if pa.types.is_fixed_size_binary(t):
            return t if keep_fixed_binary else pa.binary()
        if pa.types.is_decimal(t) and t.precision <= 38:
            return pa.decimal128(t.precision, t.scale)
        if any(is_list(t) for is_list in _LISTS):
            return pa.list_(t.value_field.with_type(visit(t.value_type)))
        if pa.types.is_map(t):
            return pa.map_(t.key_field.with_type(visit(t.key_type)), t.item_field.with_type(visit(t.item_type)))
        if pa.types.is_struct(t):
            return pa.struct([f.with_type(visit(f.type)) for f in t])
        raise TerminalError(
            f"{store}: column {column!r} has Arrow type {t}, which {store} cannot store. Cast it in the query to a "
            "supported type (an integer, decimal with precision ≤ 38, string, binary, timestamp, list or struct)."
        )

    return visit(t)


def portable_schema(schema: pa.Schema, *, store: str, **options: bool) -> pa.Schema:
    """:func:`portable_type` of every column, keeping names and nullability."""
    fields = [pa.field(f.name, portable_type(f.type, f.name, store=store, **options), f.nullable) for f in schema]
    return pa.schema(fields)
