"""A vectorised row codec: Arrow record batches to one compact binary value per row and back, over whole columns.

A key-value store holds one value per row, so the columns of a batch must be turned into rows; this module does
that with numpy and Arrow kernels over whole columns, never with a Python loop over rows.

Every type has a fixed-width *header* and an optional variable-width *payload*; a row is its header followed by
its payload, and widths depend only on the schema, never on the data:

- fixed-width values (integers, floats, decimals, fixed-size binary, dates, times, timestamps, durations): their
  raw little-endian Arrow bytes in the header; booleans one byte; the null type nothing;
- binary and string: the length (u32) in the header, the bytes in the payload;
- a struct (and the row itself): a validity bitmap of its nullable fields, then the headers of all fields, then
  the payloads of all fields in order. A field's payload length follows from its header, so nothing else is stored;
- a list: its payload length (u32) in the header; the payload is the element count (u32), every element's header,
  then every element's payload. An element is encoded as a struct of one field, so nullable items get a bitmap byte.

Encoding concatenates per-row segments with ``binary_join_element_wise`` and numpy; decoding gathers fixed-width
headers with a sliding-window view and variable segments with a list-view flatten, then rebuilds arrays from
buffers. Values under a null slot are kept as they are: validity comes from the bitmaps.

:func:`ordered_keys` makes row keys whose byte order is the value order (big-endian integers with the sign bit
flipped, order-preserving floats and decimals, escaped and terminated variable-width values).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import SchemaMismatchError, TerminalError

_EMPTY = pa.scalar(b"", pa.large_binary())
_TERMINATOR = pa.scalar(b"\x00\x00", pa.large_binary())


@dataclass(frozen=True)
class _Node:
    kind: str  # "fixed", "bool", "null", "var", "struct" or "list"
    type: pa.DataType  # the Arrow type given and given back
    arrow: pa.DataType  # the type actually encoded (dictionaries, views and fixed-size lists are cast first)
    name: str  # the column path, for messages
    width: int  # header bytes
    nullable: bool = True
    children: tuple[_Node, ...] = ()  # struct fields, or a list's element wrapper


class RowCodec:
    """Encodes record batches of one schema into one binary value per row, and decodes such values again.

    >>> codec = RowCodec(pa.schema([("n", pa.int64()), ("s", pa.string())]))
    >>> values = codec.encode(pa.record_batch([[1, None], ["x", "yz"]], schema=codec.schema))
    >>> codec.decode(values).to_pylist()
    [{'n': 1, 's': 'x'}, {'n': None, 's': 'yz'}]
    """

    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        self._root = _struct(list(schema), "", pa.struct(list(schema)), False)

    def encode(self, batch: pa.RecordBatch) -> pa.LargeBinaryArray:
        header, payload = _encode_struct(self._root, batch.columns, batch.num_rows)
        return _join([_matrix_values(header)] + ([payload] if payload is not None else []))

    def decode(self, values: pa.LargeBinaryArray) -> pa.RecordBatch:
        offsets, buf = _offsets(values), _data(values)
        header = _take_rows(buf, offsets[:-1], self._root.width)
        columns = _decode_fields(self._root, header, buf, offsets[:-1] + self._root.width)
        return pa.RecordBatch.from_arrays(columns, schema=self.schema)


# -- plans ----------------------------------------------------------------------------------------------------


def _plan(field: pa.Field, name: str) -> _Node:
    t = field.type
    arrow = t
    if pa.types.is_dictionary(t):
        arrow = t.value_type
    elif pa.types.is_binary_view(t) or pa.types.is_string_view(t):
        arrow = pa.large_binary() if pa.types.is_binary_view(t) else pa.large_string()
    elif pa.types.is_fixed_size_list(t):
        arrow = pa.list_(t.value_field)
    if arrow != t:
        inner = _plan(pa.field(field.name, arrow, field.nullable), name)
        return _Node(inner.kind, t, inner.arrow, name, inner.width, field.nullable, inner.children)
    if pa.types.is_null(t):
        return _Node("null", t, t, name, 0, True)
    if pa.types.is_boolean(t):
        return _Node("bool", t, t, name, 1, field.nullable)
    if pa.types.is_struct(t):
        return _struct(list(t), name + ".", t, field.nullable)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        element = _struct([t.value_field], name + ".", pa.struct([t.value_field]), False)
        return _Node("list", t, t, name, 4, field.nullable, (element,))
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_string(t) or pa.types.is_large_string(t):
        return _Node("var", t, t, name, 4, field.nullable)
    if not pa.types.is_nested(t) and not pa.types.is_union(t):
        try:
            bits = t.bit_width
        except ValueError:
            bits = 0
        if bits and bits % 8 == 0:
            return _Node("fixed", t, t, name, bits // 8, field.nullable)
    raise SchemaMismatchError(
        f"column {name!r} has Arrow type {t}, which the LMDB row codec cannot store. Cast it in the query to a "
        "supported type (integers, floats, decimals, binary, strings, temporal types, lists and structs of them)."
    )


def _struct(fields: list[pa.Field], prefix: str, t: pa.DataType, nullable: bool) -> _Node:
    children = tuple(_plan(f, prefix + f.name) for f in fields)
    bitmap = (sum(c.nullable for c in children) + 7) // 8
    return _Node("struct", t, t, prefix.rstrip("."), bitmap + sum(c.width for c in children), nullable, children)


# -- encoding -------------------------------------------------------------------------------------------------


def _encode(node: _Node, array: pa.Array) -> tuple[np.ndarray, pa.LargeBinaryArray | None]:
    """The header rows (an (n, width) uint8 matrix) and the payloads (None when the type has none)."""
    if array.type != node.arrow:
        array = array.cast(node.arrow)
    n = len(array)
    if node.kind == "fixed":
        return _fixed_matrix(array, node.width), None
    if node.kind == "bool":
        return _bits(array.buffers()[1], array.offset, n).reshape(n, 1), None
    if node.kind == "null":
        return np.zeros((n, 0), np.uint8), None
    if node.kind == "var":
        payload = array.cast(pa.large_binary())
        payload = payload.fill_null(_EMPTY) if payload.null_count else payload
        return _lengths(payload), payload
    if node.kind == "struct":
        return _encode_struct(node, [array.field(i) for i in range(array.type.num_fields)], n)
    return _encode_list(node, array)


def _encode_struct(node: _Node, arrays: Sequence[pa.Array], n: int) -> tuple[np.ndarray, pa.LargeBinaryArray | None]:
    headers, payloads, valid = [], [], []
    for child, array in zip(node.children, arrays, strict=True):
        if child.nullable:
            valid.append(pc.is_valid(array).to_numpy(zero_copy_only=False))
        elif array.null_count:
            raise SchemaMismatchError(
                f"column {child.name!r} is declared not null but holds {array.null_count} null value(s). Fill "
                "the nulls in the query, or make the column nullable."
            )
    if valid:
        headers.append(np.packbits(np.stack(valid, axis=1), axis=1, bitorder="little"))
    for child, array in zip(node.children, arrays, strict=True):
        header, payload = _encode(child, array)
        headers.append(header)
        if payload is not None:
            payloads.append(payload)
    return _hstack(headers, n), (_join(payloads) if payloads else None)


def _encode_list(node: _Node, array: pa.Array) -> tuple[np.ndarray, pa.LargeBinaryArray]:
    n = len(array)
    offsets = _list_offsets(array)
    relative = offsets - offsets[0]
    items = array.values.slice(offsets[0], relative[-1])
    element = node.children[0]
    item_headers, item_payloads = _encode_struct(element, [items], len(items))
    counts = np.diff(relative).astype("<u4").view(np.uint8).reshape(n, 4)
    # each list's element headers and payloads are contiguous ranges of the items' encodings: slice, don't copy
    parts = [_matrix_values(counts), _ranges(pa.py_buffer(item_headers), relative * element.width)]
    if item_payloads is not None:
        parts.append(_ranges(item_payloads.buffers()[2], _offsets(item_payloads)[relative]))
    payload = _join(parts)
    return _lengths(payload), payload


# -- decoding -------------------------------------------------------------------------------------------------


def _decode(node: _Node, header: np.ndarray, buf: np.ndarray, starts: np.ndarray, valid) -> pa.Array:
    """Rebuild ``node``'s array from its header rows and payloads starting at ``starts`` in ``buf``."""
    n = len(header)
    validity = None if valid is None or valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))
    if node.kind == "fixed":
        array = pa.Array.from_buffers(node.arrow, n, [validity, pa.py_buffer(_packed(header))])
    elif node.kind == "bool":
        bits = pa.py_buffer(np.packbits(header[:, 0] != 0, bitorder="little"))
        array = pa.Array.from_buffers(node.arrow, n, [validity, bits])
    elif node.kind == "null":
        array = pa.nulls(n, node.arrow)
    elif node.kind == "var":
        lengths = _u32(header)
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        large = pa.types.is_large_binary(node.arrow) or pa.types.is_large_string(node.arrow)
        offsets = offsets if large else _int32_offsets(offsets, node)
        data = _segments(buf, starts, lengths)
        array = pa.Array.from_buffers(node.arrow, n, [validity, pa.py_buffer(offsets), data])
    elif node.kind == "struct":
        children = _decode_fields(node, header, buf, starts)
        mask = None if validity is None else pa.array(~valid)
        array = pa.StructArray.from_arrays(children, fields=list(node.arrow), mask=mask)
    else:
        array = _decode_list(node, buf, starts, valid, validity)
    return array if node.arrow == node.type else array.cast(node.type)


def _decode_fields(node: _Node, header: np.ndarray, buf: np.ndarray, starts: np.ndarray) -> list[pa.Array]:
    nullable = sum(c.nullable for c in node.children)
    width = (nullable + 7) // 8
    bits = np.unpackbits(header[:, :width], axis=1, bitorder="little").astype(bool) if nullable else None
    arrays, bit = [], 0
    for child in node.children:
        own = header[:, width : width + child.width]
        width += child.width
        arrays.append(_decode(child, own, buf, starts, bits[:, bit] if child.nullable else None))
        bit += child.nullable
        consumed = _payload_length(child, own)
        if consumed is not None:
            starts = starts + consumed
    return arrays


def _decode_list(node: _Node, buf: np.ndarray, starts: np.ndarray, valid, validity) -> pa.Array:
    element = node.children[0]
    counts = _u32(_take_rows(buf, starts, 4))
    offsets = np.zeros(len(starts) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    total = int(offsets[-1])
    header_starts = np.repeat(starts + 4 - offsets[:-1] * element.width, counts) + np.arange(total) * element.width
    headers = _take_rows(buf, header_starts, element.width)
    region = starts + 4 + counts * element.width  # where each list's element payloads begin
    lengths = _payload_length(element, headers)
    if lengths is None:
        payload_starts = np.repeat(region, counts)
    else:
        ends = np.zeros(total + 1, np.int64)
        np.cumsum(lengths, out=ends[1:])
        payload_starts = np.repeat(region - ends[offsets[:-1]], counts) + ends[:-1]
    items = _decode_fields(element, headers, buf, payload_starts)[0]
    large = pa.types.is_large_list(node.arrow)
    offsets = pa.array(offsets if large else _int32_offsets(offsets, node))
    mask = None if validity is None else pa.array(~valid)
    return (pa.LargeListArray if large else pa.ListArray).from_arrays(offsets, items, type=node.arrow, mask=mask)


def _payload_length(node: _Node, header: np.ndarray) -> np.ndarray | None:
    """Payload bytes per row, read from the header alone (None for types without a payload)."""
    if node.kind in ("var", "list"):
        return _u32(header)
    if node.kind != "struct":
        return None
    width, total = (sum(c.nullable for c in node.children) + 7) // 8, None
    for child in node.children:
        length = _payload_length(child, header[:, width : width + child.width])
        width += child.width
        if length is not None:
            total = length if total is None else total + length
    return total


# -- ordered keys ---------------------------------------------------------------------------------------------


def ordered_keys(arrays: Sequence[pa.Array], names: Sequence[str]) -> pa.LargeBinaryArray:
    """One key per row whose byte order (LMDB's memcmp order) is the order of the columns' values.

    >>> keys = ordered_keys([pa.array([-1, 0, 2], pa.int32())], ["n"])
    >>> [bytes(k) for k in iter_values(keys)]
    [b'\\x7f\\xff\\xff\\xff', b'\\x80\\x00\\x00\\x00', b'\\x80\\x00\\x00\\x02']
    """
    parts = []
    for array, name in zip(arrays, names, strict=True):
        if array.null_count:
            raise TerminalError(
                f"key column {name!r} holds {array.null_count} null value(s); a key must identify its row. "
                "Fill the nulls in the query or choose other key columns."
            )
        parts.append(_ordered(array.cast(array.type.value_type) if pa.types.is_dictionary(array.type) else array, name))
    if all(isinstance(p, np.ndarray) for p in parts):
        return _matrix_values(_hstack(parts, len(parts[0])))
    return _join([_matrix_values(p) if isinstance(p, np.ndarray) else p for p in parts])


def check_key_type(field: pa.Field) -> None:
    """Fail early, naming the column, when a column cannot be part of a key."""
    _ordered(pa.array([], field.type), field.name)


def _ordered(array: pa.Array, name: str) -> np.ndarray | pa.LargeBinaryArray:
    t, n = array.type, len(array)
    if pa.types.is_boolean(t):
        return _bits(array.buffers()[1], array.offset, n).reshape(n, 1)
    if pa.types.is_fixed_size_binary(t):
        return _fixed_matrix(array, t.byte_width)
    if pa.types.is_decimal(t):
        flipped = np.ascontiguousarray(_fixed_matrix(array, t.byte_width)[:, ::-1])  # little → big endian
        flipped[:, 0] ^= 0x80
        return flipped
    signed = pa.types.is_signed_integer(t) or (pa.types.is_temporal(t) and not pa.types.is_interval(t))
    if pa.types.is_unsigned_integer(t) or signed or pa.types.is_floating(t):
        width = t.bit_width // 8
        raw = _fixed_matrix(array, width).reshape(-1).view(f"<u{width}")
        sign = np.array(1 << (8 * width - 1), raw.dtype)
        if pa.types.is_floating(t):  # negatives sort reversed: flip every bit; positives above them
            raw = np.where(raw & sign, ~raw, raw | sign)
        elif signed:
            raw = raw ^ sign
        return raw.astype(f">u{width}").view(np.uint8).reshape(n, width)
    if pa.types.is_binary(t) or pa.types.is_string(t) or pa.types.is_large_binary(t) or pa.types.is_large_string(t):
        # 0x00 is escaped as 0x00 0xFF and every value ends in 0x00 0x00: order-preserving, unambiguous, never empty
        escaped = pc.replace_substring(array.cast(pa.large_binary()), b"\x00", b"\x00\xff")
        return pc.binary_join_element_wise(escaped, _TERMINATOR, _EMPTY)
    if pa.types.is_binary_view(t) or pa.types.is_string_view(t):
        return _ordered(array.cast(pa.large_binary()), name)
    raise SchemaMismatchError(
        f"key column {name!r} has Arrow type {t}, which cannot be part of an LMDB key. Key by integer, "
        "decimal, temporal, binary or string columns."
    )


# -- binary arrays and buffers ----------------------------------------------------------------------------------


def iter_values(values: pa.LargeBinaryArray) -> Iterator[memoryview]:
    """Each value as a memoryview of the array's data buffer, sliced in C (``map`` over ``slice``), no copies.

    py-lmdb takes one Python object per key and per value; this is the cheapest way to hand them over.
    """
    offsets = _offsets(values)
    view = memoryview(values.buffers()[2] or b"")
    return map(view.__getitem__, map(slice, offsets[:-1].tolist(), offsets[1:].tolist()))


def strictly_increasing(values: pa.LargeBinaryArray) -> bool:
    """Whether equal-width values are in strictly increasing byte order (False for mixed widths: not checked)."""
    offsets = _offsets(values)
    if len(values) < 2:
        return True
    width = offsets[1] - offsets[0]
    if width == 0 or (np.diff(offsets) != width).any():
        return False
    rows = _data(values)[offsets[0] : offsets[-1]].reshape(-1, width)
    differ = rows[1:] != rows[:-1]
    first, pairs = differ.argmax(axis=1), np.arange(len(rows) - 1)  # the first byte where neighbours differ
    return bool(differ[pairs, first].all() and (rows[1:][pairs, first] > rows[:-1][pairs, first]).all())


def from_values(values: Sequence[bytes]) -> pa.LargeBinaryArray:
    """A large_binary array of byte strings (what py-lmdb returns), joined in C."""
    lengths = np.fromiter(map(len, values), np.int64, len(values))
    offsets = np.zeros(len(values) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    buffers = [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(values))]
    return pa.Array.from_buffers(pa.large_binary(), len(values), buffers)


def _join(arrays: Sequence[pa.LargeBinaryArray]) -> pa.LargeBinaryArray:
    return arrays[0] if len(arrays) == 1 else pc.binary_join_element_wise(*arrays, _EMPTY)


def _matrix_values(matrix: np.ndarray) -> pa.LargeBinaryArray:
    """The rows of an (n, width) uint8 matrix as a large_binary array, sharing its memory."""
    n, width = matrix.shape
    return _ranges(pa.py_buffer(np.ascontiguousarray(matrix)), np.arange(n + 1, dtype=np.int64) * width)


def _ranges(data: pa.Buffer | None, offsets: np.ndarray) -> pa.LargeBinaryArray:
    buffers = [None, pa.py_buffer(np.ascontiguousarray(offsets, np.int64)), data or pa.py_buffer(b"")]
    return pa.Array.from_buffers(pa.large_binary(), len(offsets) - 1, buffers)


def _fixed_matrix(array: pa.Array, width: int) -> np.ndarray:
    n, buf = len(array), array.buffers()[1]
    if buf is None:
        return np.zeros((n, width), np.uint8)
    return np.frombuffer(buf, np.uint8)[array.offset * width : (array.offset + n) * width].reshape(n, width)


def _bits(buf: pa.Buffer | None, offset: int, n: int) -> np.ndarray:
    if buf is None:
        return np.zeros(n, np.uint8)
    return np.unpackbits(np.frombuffer(buf, np.uint8), bitorder="little")[offset : offset + n]


def _lengths(values: pa.LargeBinaryArray) -> np.ndarray:
    lengths = np.diff(_offsets(values))
    if len(lengths) and lengths.max() >= 2**32:
        raise TerminalError(f"a value of {lengths.max()} bytes is too large for LMDB (values stop at 4 GiB)")
    return lengths.astype("<u4").view(np.uint8).reshape(len(values), 4)


def _offsets(values: pa.Array) -> np.ndarray:
    buf = values.buffers()[1]
    if buf is None:
        return np.zeros(1, np.int64)
    return np.frombuffer(buf, np.int64)[values.offset : values.offset + len(values) + 1]


def _list_offsets(array: pa.Array) -> np.ndarray:
    dtype = np.int64 if pa.types.is_large_list(array.type) else np.int32
    buf = array.buffers()[1]
    if buf is None:
        return np.zeros(1, np.int64)
    return np.frombuffer(buf, dtype)[array.offset : array.offset + len(array) + 1].astype(np.int64)


def _data(values: pa.LargeBinaryArray) -> np.ndarray:
    buf = values.buffers()[2]
    return np.frombuffer(buf, np.uint8) if buf is not None else np.zeros(0, np.uint8)


def _u32(header: np.ndarray) -> np.ndarray:
    return header.view("<u4").reshape(-1).astype(np.int64)


def _packed(matrix: np.ndarray) -> np.ndarray:
    """A contiguous copy of an (n, width) slice, one row-sized item at a time (a byte-wise copy is 4x slower)."""
    return np.ascontiguousarray(matrix.view(f"V{matrix.shape[1]}") if matrix.shape[1] else matrix)


def _hstack(parts: list[np.ndarray], n: int) -> np.ndarray:
    """Matrices side by side, like ``np.concatenate(axis=1)`` but copying row-sized items rather than bytes."""
    out = np.empty((n, sum(p.shape[1] for p in parts)), np.uint8)
    at = 0
    for part in parts:
        width = part.shape[1]
        if width:
            out[:, at : at + width].view(f"V{width}")[:] = np.ascontiguousarray(part).view(f"V{width}")
        at += width
    return out


def _int32_offsets(offsets: np.ndarray, node: _Node) -> np.ndarray:
    if offsets[-1] >= 2**31:
        raise TerminalError(
            f"column {node.name!r}: a batch holds {offsets[-1]} bytes, more than {node.arrow} can address. "
            "Read smaller batches, or use the large_ variant of the type."
        )
    return offsets.astype(np.int32)


def _take_rows(buf: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray:
    """``width`` bytes at each start, as an (n, width) matrix: one memcpy per row through a sliding window."""
    if width == 0 or len(starts) == 0:
        return np.zeros((len(starts), width), np.uint8)
    return np.lib.stride_tricks.sliding_window_view(buf, width)[starts]


def _segments(buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> pa.Buffer:
    """The bytes at ``starts`` of ``lengths``, concatenated.

    The segments lie in order without overlapping (the layout is sequential), so they are the even values of a
    binary array whose offsets alternate segment and gap, and Arrow's ``take`` copies them out value by value
    (10x faster than flattening a list view of bytes).
    """
    if len(starts) == 0 or not lengths.any():
        return pa.py_buffer(b"")
    bounds = np.empty(2 * len(starts), np.int64)
    bounds[0::2], bounds[1::2] = starts, starts + lengths
    if (np.diff(bounds) < 0).any() or bounds[-1] > len(buf):
        raise TerminalError("LMDB: a stored value is corrupt (its parts overlap or overrun it); rewrite the table")
    spaced = pa.Array.from_buffers(pa.large_binary(), len(bounds) - 1, [None, pa.py_buffer(bounds), pa.py_buffer(buf)])
    return spaced.take(pa.array(np.arange(0, len(bounds) - 1, 2))).buffers()[2]
