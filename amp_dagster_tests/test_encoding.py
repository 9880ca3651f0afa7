"""Vectorised text encodings shared by the loaders: 0x-hex for bytes, JSON for nested values."""

from __future__ import annotations

import json

import pyarrow as pa

from amp_dagster.loaders.encoding import hex_strings, json_strings

from . import data


def test_hex_of_binary_and_fixed_binary_keeps_nulls_and_offsets():
    binary = pa.array([b"\x01\xab", None, b"", b"\xff" * 3])
    assert hex_strings(binary).to_pylist() == ["0x01ab", None, "0x", "0xffffff"]
    assert hex_strings(binary.slice(1)).to_pylist() == [None, "0x", "0xffffff"]
    fixed = pa.array([bytes(4), None, b"\x12\x34\x56\x78"], pa.binary(4))
    assert hex_strings(fixed.slice(1)).to_pylist() == [None, "0x12345678"]
    assert hex_strings(pa.chunked_array([fixed, fixed]), prefix="").to_pylist()[2] == "12345678"


def test_json_of_amp_nested_columns_matches_a_python_rendering():
    table = data.every_type()
    got = [None if v is None else json.loads(v) for v in json_strings(table["access_list"]).to_pylist()]
    want = [
        None
        if row is None
        else [
            {"address": "0x" + i["address"].hex(), "storage_keys": ["0x" + k.hex() for k in i["storage_keys"]]}
            for i in row
        ]
        for row in table["access_list"].to_pylist()
    ]
    assert got == want


def test_json_of_maps_fixed_lists_and_sliced_lists_with_null_slots():
    mapped = pa.array([[("a", b"\x01")], None, []], pa.map_(pa.string(), pa.binary()))
    assert json_strings(mapped).to_pylist() == ['[{"key":"a","value":"0x01"}]', None, "[]"]
    fixed = pa.array([[1, 2], [3, 4], None], pa.list_(pa.int64(), 2))
    assert json_strings(fixed.slice(1)).to_pylist() == ["[3,4]", None]
    nested = pa.array([[{"a": b"\x01"}], None, [{"a": None}, None]])
    assert json_strings(nested.slice(1)).to_pylist() == [None, '[{"a":null},null]']
    assert json_strings(pa.array([{"x": 2**64 - 1}], pa.struct([("x", pa.uint64())]))).to_pylist() == [
        '{"x":18446744073709551615}'
    ]
