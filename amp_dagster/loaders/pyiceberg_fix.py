"""pyiceberg 0.12 loses null ``list<struct>`` values; :func:`install` puts the upstream fix in place, once.

pyiceberg 0.12 rebuilds a ``list<struct>`` array from its offsets and values alone, dropping its validity bitmap, so
a null list becomes ``[]``: in the Parquet files it writes (for good) and in what it reads
(apache/iceberg-python#3833). The fix (#3834) is the same rebuild with the nulls passed on. It changes pyiceberg for
the whole process, so it is installed explicitly, by the first :class:`~.iceberg.IcebergLoader` built, and only on
the 0.12 releases known to need it; a canary in ``test_iceberg`` fails once pyiceberg keeps the nulls itself.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pyarrow as pa

_lock = threading.Lock()
_original: Callable | None = None


def install() -> Callable:
    """Install the fix (idempotent, thread-safe); returns pyiceberg's own method, for the canary."""
    global _original
    with _lock:
        if _original is not None:
            return _original
        import pyiceberg
        from pyiceberg.io.pyarrow import ArrowProjectionVisitor

        _original = ArrowProjectionVisitor.list
        if pyiceberg.__version__.startswith("0.12."):
            ArrowProjectionVisitor.list = _list
        return _original


def _list(self, list_type, list_array: pa.Array | None, value_array: pa.Array | None) -> pa.Array | None:
    if isinstance(list_array, pa.ListArray | pa.LargeListArray | pa.FixedSizeListArray) and value_array is not None:
        list_initializer = pa.large_list if isinstance(list_array, pa.LargeListArray) else pa.list_
        if isinstance(value_array, pa.StructArray):
            mask = list_array.is_null() if list_array.null_count else None  # the one change: keep the nulls
            list_array = pa.LargeListArray.from_arrays(list_array.offsets, value_array, mask=mask)
        value_array = self._cast_if_needed(list_type.element_field, value_array)
        arrow_field = list_initializer(self._construct_field(list_type.element_field, value_array.type))
        return list_array.cast(arrow_field)
    return None
