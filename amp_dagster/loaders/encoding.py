"""Vectorised Arrow → text encodings that several destinations need: 0x-hex for bytes, JSON for nested values."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

_HEX = np.array([list(f"{i:02x}".encode()) for i in range(256)], dtype=np.uint8)


def is_binary_like(type_: pa.DataType) -> bool:
    return (
        pa.types.is_binary(type_)
        or pa.types.is_large_binary(type_)
        or pa.types.is_fixed_size_binary(type_)
        or pa.types.is_binary_view(type_)
    )


def is_nested(type_: pa.DataType) -> bool:
    return pa.types.is_nested(type_)


def hex_strings(array: pa.Array, prefix: str = "0x") -> pa.Array:
    """Bytes as lowercase hex text (``b"\\x01\\xab"`` → ``"0x01ab"``), nulls kept, without a per-row loop."""
    if isinstance(array, pa.ChunkedArray):
        return pa.chunked_array([hex_strings(c, prefix) for c in array.chunks], pa.string())
    if pa.types.is_fixed_size_binary(array.type):
        width = array.type.byte_width
        offsets = np.arange(len(array) + 1, dtype=np.int64) * width
        raw = np.frombuffer(array.buffers()[1], dtype=np.uint8)[
            array.offset * width : (array.offset + len(array)) * width
        ]
    else:
        array = array.cast(pa.large_binary())
        offsets = np.frombuffer(array.buffers()[1], dtype=np.int64)[array.offset : array.offset + len(array) + 1]
        raw = (
            np.frombuffer(array.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
            if len(array)
            else np.zeros(0, np.uint8)
        )
        offsets = offsets - offsets[0]
    body = _HEX[raw].reshape(-1)  # two hex digits per byte, in row order
    validity = pc.is_valid(array).buffers()[1] if array.null_count else None
    text = pa.LargeStringArray.from_buffers(
        len(array), pa.py_buffer(offsets * 2), pa.py_buffer(body), validity, array.null_count
    ).cast(pa.string())
    if not prefix:
        return text
    return pc.binary_join_element_wise(pa.scalar(prefix), text, "")


def _text_leaves(array: pa.Array) -> pa.Array:
    """Rebuild a nested array with binary leaves turned into hex text (JSON has no bytes type)."""
    t = array.type
    if is_binary_like(t):
        return hex_strings(array)
    if pa.types.is_struct(t):
        children = [_text_leaves(array.field(i)) for i in range(t.num_fields)]
        mask = pc.is_null(array) if array.null_count else None
        return pa.StructArray.from_arrays(children, names=[f.name for f in t], mask=mask)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        # not flatten(): it drops the values under null slots, which the offsets still span
        first, last = array.offsets[0].as_py(), array.offsets[-1].as_py()
        values = _text_leaves(array.values.slice(first, last - first))
        offsets = pc.subtract(array.offsets, first)
        mask = pc.is_null(array) if array.null_count else None
        cls = pa.LargeListArray if pa.types.is_large_list(t) else pa.ListArray
        return cls.from_arrays(offsets, values, mask=mask)
    if pa.types.is_map(t):  # a map is a list of {key, value} entries; JSON objects would need text keys
        entries = pa.StructArray.from_arrays([array.keys, array.items], fields=[t.key_field, t.item_field])
        offsets = pc.subtract(array.offsets, array.offsets[0])
        return _text_leaves(
            pa.ListArray.from_arrays(offsets, entries, mask=pc.is_null(array) if array.null_count else None)
        )
    if pa.types.is_fixed_size_list(t) or pa.types.is_list_view(t):
        return _text_leaves(array.cast(pa.list_(t.value_field)))
    return array


def json_strings(array: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Nested values (structs, lists, maps) as JSON text, bytes as 0x-hex strings, nulls kept as nulls.

    Integers stay JSON numbers (uint64 included: jsonb and ClickHouse keep them exact); decimals become
    strings, timestamps ISO 8601 strings.
    """
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if len(array) == 0:
        return pa.array([], pa.string())
    wrapped = pa.StructArray.from_arrays([_text_leaves(array)], names=["v"])
    encoded = pl.from_arrow(pa.table({"w": wrapped}), rechunk=False).select(pl.col("w").struct.json_encode())["w"]
    text = encoded.to_arrow().cast(pa.string())
    # strip the wrapper '{"v":' ... '}' again
    text = pc.utf8_slice_codeunits(text, start=5, stop=-1)
    return pc.if_else(pc.is_null(array), pa.scalar(None, pa.string()), text)


# -- back from text: the inverses of hex_strings and json_strings ---------------------------------------------

_NIBBLE = np.zeros(256, np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _NIBBLE[_c] = _NIBBLE[ord(chr(_c).upper())] = _i


def unhex(text: pa.Array) -> pa.Array:
    """0x-hex text back to bytes (``"0x01ab"`` → ``b"\\x01\\xab"``) as large_binary, nulls kept, without a row loop."""
    text = pc.utf8_slice_codeunits(text, 2).cast(pa.large_string())  # drop "0x"
    offsets = np.frombuffer(text.buffers()[1], np.int64)[text.offset : text.offset + len(text) + 1]
    raw = np.frombuffer(text.buffers()[2], np.uint8)[offsets[0] : offsets[-1]] if text.buffers()[2] else []
    nibbles = _NIBBLE[np.asarray(raw, np.uint8)]
    body = (nibbles[0::2] << 4) | nibbles[1::2]
    validity = pc.is_valid(text).buffers()[1] if text.null_count else None
    buffers = [validity, pa.py_buffer((offsets - offsets[0]) // 2), pa.py_buffer(body.tobytes())]
    return pa.Array.from_buffers(pa.large_binary(), len(text), buffers, text.null_count)


def json_arrays(text: pa.Array, type_: pa.DataType) -> pa.Array:
    """JSON text as :func:`json_strings` writes it, parsed back into ``type_`` (nulls kept) by Arrow's JSON reader."""
    import pyarrow.json as pj

    if not len(text):
        return pa.array([], type_)
    lines = pc.binary_join_element_wise('{"v":', pc.fill_null(text.cast(pa.string()), "null"), "}\n", "")
    lines = lines.cast(pa.large_string())
    offsets = np.frombuffer(lines.buffers()[1], np.int64)[lines.offset : lines.offset + len(lines) + 1]
    payload = lines.buffers()[2][offsets[0] : offsets[-1]]
    parsed = pj.read_json(
        pa.BufferReader(payload),
        read_options=pj.ReadOptions(block_size=max(1 << 20, payload.size + 1)),  # one block: rows stay in order
        parse_options=pj.ParseOptions(explicit_schema=pa.schema([("v", _json_type(type_))])),
    )
    return _json_leaves(parsed.column("v").combine_chunks(), type_).cast(type_)


def _json_type(t: pa.DataType) -> pa.DataType:
    """The type the JSON text parses into: bytes, decimals and temporal leaves as strings, converted after."""
    if is_binary_like(t) or pa.types.is_decimal(t) or pa.types.is_temporal(t):
        return pa.string()
    if pa.types.is_struct(t):
        return pa.struct([f.with_type(_json_type(f.type)).with_nullable(True) for f in t])
    if pa.types.is_map(t):  # written as a list of {key, value} entries
        return pa.list_(pa.struct([f.with_type(_json_type(f.type)) for f in (t.key_field, t.item_field)]))
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return pa.list_(t.value_field.with_type(_json_type(t.value_type)).with_nullable(True))
    return t


def _json_leaves(a: pa.Array, t: pa.DataType) -> pa.Array:
    """The parsed array with its string leaves converted to ``t``'s bytes, decimals and times."""
    mask = pc.is_null(a) if a.null_count else None
    if pa.types.is_struct(t):
        children = [_json_leaves(a.field(i), f.type) for i, f in enumerate(t)]
        return pa.StructArray.from_arrays(children, names=[f.name for f in t], mask=mask)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_map(t):
        first, last = a.offsets[0].as_py(), a.offsets[-1].as_py()
        values, offsets = a.values.slice(first, last - first), pc.subtract(a.offsets, first)
        if pa.types.is_map(t):
            keys, items = (_json_leaves(values.field(i), f.type) for i, f in enumerate((t.key_field, t.item_field)))
            return pa.MapArray.from_arrays(offsets, keys, items, mask=mask)
        return pa.ListArray.from_arrays(offsets, _json_leaves(values, t.value_type), mask=mask)
    if is_binary_like(t):
        return unhex(a).cast(t)
    return a.cast(t)
