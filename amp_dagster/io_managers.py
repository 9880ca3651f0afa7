"""AmpIOManager: asset outputs (Arrow or polars) streamed into any destination resource, replacing exactly the block
ranges of the run's partitions; asset inputs read back as Arrow or polars, for a partition, a range or the table.

The algorithm is the short one of Dagster's database IO managers, with amp's rows keyed by block:
table from the asset key → the run's partitions as block ranges → ensure the table → one replace per contiguous
span (a full refresh when unpartitioned) → metadata, which never fails the materialization.
"""

from __future__ import annotations

import tempfile
import time
import typing
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from .errors import ConfigError, TerminalError
from .loaders.base import Loader, TableRef, WriteResult
from .partitions import key_range, window_blocks
from .pipelines import TimePartitions
from .ranges import BLOCK_NUM, RowRange, merge_ranges
from .resources import AmpResource, DestinationResource, _mirror

ArrowOutput = pa.Table | pa.RecordBatchReader
_ACCEPTED = (
    "a pyarrow Table or RecordBatchReader, a polars DataFrame or LazyFrame, an object with the Arrow stream "
    "interface (__arrow_c_stream__), or None"
)


@dataclass(frozen=True)
class PartitionBlocks:
    """The blocks each partition of a run owns, by partition key (None: a time window without any block)."""

    blocks: Mapping[str, RowRange | None]

    @property
    def spans(self) -> list[RowRange]:
        """The contiguous block spans the partitions cover: one replace (or read) each."""
        return merge_ranges(r for r in self.blocks.values() if r is not None)


class AmpIOManager(dg.ConfigurableIOManager):
    """Stores asset outputs in any amp_dagster destination and loads them back.

    - Outputs: ``pyarrow.Table``, ``pyarrow.RecordBatchReader``, ``polars.DataFrame``, ``polars.LazyFrame``
      (collected in batches by polars' streaming engine), any object with the Arrow stream interface (amp's
      ``QueryResult``, duckdb, DataFusion) or ``None`` (nothing is written). Readers, streams and lazy frames go
      into the store batch by batch.
    - An unpartitioned asset replaces its whole table (atomically where the store can). A partitioned asset
      replaces exactly the rows of the run's partitions, and nothing else: one key, a key range (a single-run
      backfill) or a time window. Block-range keys (``000000000000-000000009999``, see
      :class:`~amp_dagster.partitions.BlockRanges`) give the blocks directly; time windows are mapped to blocks
      through amp's blocks table, which needs ``amp``. A row outside the run's blocks fails the run.
    - Table: the asset key's last element; namespace (schema, database, directory or key prefix): the asset's
      ``metadata["schema"]``, else ``schema``, else the key's prefix, else none. Rows are keyed by the integer
      column ``metadata["partition_expr"]`` (default ``_block_num``); ``metadata["key"]`` names the columns that
      identify a row where the store needs them.
    - Inputs are loaded as the parameter's annotation says: ``pyarrow.Table`` (also when unannotated),
      ``pyarrow.RecordBatchReader``, ``polars.DataFrame`` or ``polars.LazyFrame`` (read lazily from the store);
      for the input's partitions, or the whole table.

    .. code-block:: python

        import dagster as dg
        import pyarrow as pa
        from amp_dagster import AmpIOManager, DeltaResource
        from amp_dagster.partitions import BlockRanges, keys_to_ranges

        ranges = BlockRanges("eth_blocks", size=10)

        @dg.asset(partitions_def=ranges.definition, backfill_policy=dg.BackfillPolicy.single_run())
        def blocks(context: dg.AssetExecutionContext) -> pa.Table:
            (span,) = keys_to_ranges(context.partition_keys)
            return pa.table({"_block_num": pa.array(range(span.start, span.end + 1), pa.uint64())})

        @dg.asset(partitions_def=ranges.definition)
        def block_count(blocks: pa.Table) -> None:
            print(blocks.num_rows)

        with dg.instance_for_test() as instance:
            ranges.add_keys(instance, ranges.keys_through(29))
            dg.materialize(
                [blocks, block_count],
                instance=instance,
                partition_key="000000000010-000000000019",
                resources={"io_manager": AmpIOManager(destination=DeltaResource(path="lake"))},
            )
    """

    destination: DestinationResource = Field(
        description="Where outputs go: a PostgresResource, RedisResource, ClickHouseResource, DeltaResource, "
        "IcebergResource or LmdbResource."
    )
    schema_: str | None = Field(
        None,
        alias="schema",
        description="Namespace of the tables (schema, database, directory or key prefix) when an asset sets no "
        'metadata["schema"]; default: the asset key\'s prefix.',
    )
    amp: AmpResource | None = Field(
        None, description="amp, to map time-window partitions to blocks through its blocks table."
    )
    blocks_table: str = _mirror(TimePartitions, "blocks_table")

    # -- outputs ------------------------------------------------------------------------------------------

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if obj is None:
            context.log.info("AmpIOManager: the output is None, so nothing was written")
            return
        asset = _asset_name(context, "store")
        table = self._table(context.asset_key, context.definition_metadata)
        partitions = None
        if context.has_asset_partitions:
            partitions = self._partitions(asset, context.asset_partitions_def, context.asset_partition_keys)
        data = _to_arrow(obj, asset)
        _check_range_column(data.schema, table, asset)
        started = time.monotonic()
        with self.destination.loader() as loader:
            if partitions is None:
                result, counts = loader.replace_table(table, data), None
            else:
                result, counts = _replace(loader, table, data, partitions, asset)
        seconds = time.monotonic() - started
        self._report(context, table, data.schema, result, seconds, partitions, counts)

    def _report(
        self,
        context: dg.OutputContext,
        table: TableRef,
        schema: pa.Schema,
        result: WriteResult,
        seconds: float,
        partitions: PartitionBlocks | None,
        counts: Mapping[str, int] | None,
    ) -> None:
        """Output metadata; a failure here is logged, never raised: the data is already committed."""
        try:
            metadata: dict[str, Any] = {
                "dagster/table_name": str(table),
                "dagster/uri": self.destination.location(),
                "dagster/column_schema": column_schema(schema),
                "amp/bytes": result.bytes,
                "amp/seconds": round(seconds, 3),
                "amp/rows_per_second": round(result.rows / seconds) if seconds > 0 else 0,
            }
            if partitions is None:
                metadata["dagster/row_count"] = result.rows
            else:
                spans = partitions.spans
                metadata["amp/block_ranges"] = ", ".join(map(str, spans)) or "none"
                if spans:
                    metadata["amp/start_block"], metadata["amp/end_block"] = spans[0].start, spans[-1].end
                if len(partitions.blocks) == 1:
                    metadata["dagster/partition_row_count"] = result.rows
            context.add_output_metadata(metadata)
            if partitions is not None and len(partitions.blocks) > 1 and counts is not None:
                _per_partition_metadata(context, partitions, counts)
        except Exception as exc:
            context.log.warning(f"AmpIOManager: the data of {table} is written, but its metadata failed: {exc!r}")

    # -- inputs -------------------------------------------------------------------------------------------

    def load_input(self, context: dg.InputContext) -> Any:
        asset = _asset_name(context, "load")
        upstream = context.upstream_output
        table = self._table(context.asset_key, upstream.definition_metadata if upstream is not None else {})
        spans = None
        if context.has_asset_partitions:
            spans = self._partitions(asset, context.asset_partitions_def, context.asset_partition_keys).spans
        kind = context.dagster_type.typing_type
        if kind in (pa.Table, typing.Any, object):
            with self.destination.loader() as loader:
                return _read(loader, table, spans).read_all()
        if kind is pa.RecordBatchReader:
            return self._reader(table, spans)
        if getattr(kind, "__module__", "").startswith("polars"):
            import polars as pl

            if kind is pl.DataFrame:
                with self.destination.loader() as loader:
                    return pl.from_arrow(_read(loader, table, spans).read_all())
            if kind is pl.LazyFrame:
                return self._lazy_frame(table, spans)
        raise ConfigError(
            f"AmpIOManager loads asset {asset} as pyarrow.Table, pyarrow.RecordBatchReader, polars.DataFrame or "
            f"polars.LazyFrame, but the input {context.name!r} is annotated {kind!r}. Annotate it with one of those."
        )

    def _reader(self, table: TableRef, spans: list[RowRange] | None) -> pa.RecordBatchReader:
        """A reader that holds its own loader until it is read to the end."""
        loader = self.destination.loader()
        try:
            reader = _read(loader, table, spans)
        except BaseException:
            loader.close()
            raise

        def batches() -> Iterator[pa.RecordBatch]:
            try:
                yield from reader
            finally:
                loader.close()

        return pa.RecordBatchReader.from_batches(reader.schema, batches())

    def _lazy_frame(self, table: TableRef, spans: list[RowRange] | None):
        """A polars LazyFrame over the store: every collect reads afresh, with projections, filters and row limits
        applied batch by batch."""
        import polars as pl
        from polars.io.plugins import register_io_source

        with self.destination.loader() as loader:
            reader = _read(loader, table, spans)
            schema = pl.from_arrow(reader.schema.empty_table()).schema
            reader.close()

        def source(columns: list[str] | None, predicate: Any, n_rows: int | None, batch_size: int | None):
            left = n_rows
            with self.destination.loader() as loader:
                for batch in _read(loader, table, spans):
                    frame = pl.from_arrow(batch)
                    if columns is not None:
                        frame = frame.select(columns)
                    if predicate is not None:
                        frame = frame.filter(predicate)
                    if left is not None:
                        frame = frame.head(left)
                        left -= frame.height
                    yield frame
                    if left == 0:
                        return

        return register_io_source(source, schema=schema)

    # -- shared ------------------------------------------------------------------------------------------

    def _table(self, key: dg.AssetKey, metadata: Mapping[str, Any]) -> TableRef:
        path = key.path
        namespace = _value(metadata.get("schema")) or self.schema_ or (path[-2] if len(path) > 1 else None)
        range_column = _value(metadata.get("partition_expr")) or BLOCK_NUM
        if not isinstance(range_column, str):
            raise ConfigError(
                f"asset {key.to_user_string()}: metadata partition_expr is {range_column!r}, but AmpIOManager keys "
                "rows by one integer column: give its name, e.g. metadata={'partition_expr': '_block_num'}."
            )
        key_columns = _value(metadata.get("key")) or ()
        return TableRef(path[-1], namespace=namespace, range_column=range_column, key=key_columns)

    def _partitions(self, asset: str, definition: Any, keys: Sequence[str]) -> PartitionBlocks:
        """The blocks of each partition key: parsed from block-range keys, or looked up for time windows."""
        if isinstance(definition, dg.TimeWindowPartitionsDefinition):
            if self.amp is None:
                raise ConfigError(
                    f"asset {asset} is partitioned by time windows, which AmpIOManager maps to blocks through amp's "
                    f"{self.blocks_table} table, but the IO manager has no amp resource. Configure it: "
                    "AmpIOManager(destination=..., amp=AmpResource(url=...), blocks_table=...)."
                )
            # one small query per partition: each key's own blocks, for its own row count and metadata
            with self.amp.client() as client:
                windows = {k: definition.time_window_for_partition_key(k) for k in keys}
                return PartitionBlocks(
                    {k: window_blocks(client, self.blocks_table, w.start, w.end) for k, w in windows.items()}
                )
        if isinstance(definition, dg.MultiPartitionsDefinition):
            raise ConfigError(
                f"asset {asset} is multi-partitioned, which AmpIOManager does not support: partition it by block "
                "ranges (BlockRanges) or by a daily or hourly time window."
            )
        try:
            return PartitionBlocks({k: key_range(k) for k in keys})
        except ConfigError as exc:
            raise ConfigError(
                f"asset {asset}: {exc}. Partition it with BlockRanges(...).definition, or by a daily or hourly time "
                "window that AmpIOManager maps to blocks through amp."
            ) from None


# -- helpers ------------------------------------------------------------------------------------------------


def column_schema(schema: pa.Schema) -> dg.TableSchema:
    """The Arrow schema as Dagster's table schema (the UI's column list)."""
    return dg.TableSchema(
        columns=[
            dg.TableColumn(f.name, str(f.type), constraints=dg.TableColumnConstraints(nullable=f.nullable))
            for f in schema
        ]
    )


def _per_partition_metadata(context: dg.OutputContext, partitions: PartitionBlocks, counts: Mapping[str, int]) -> None:
    # An IO manager has no public way to give each partition of a range run its own metadata in Dagster 1.13
    # (add_output_metadata applies to all of them), so each partition's own rows and blocks go through the step
    # context, as AssetExecutionContext.add_asset_metadata(partition_key=...) does.
    for key, blocks in partitions.blocks.items():
        metadata: dict[str, Any] = {"dagster/partition_row_count": counts[key]}
        if blocks is not None:
            metadata["amp/start_block"], metadata["amp/end_block"] = blocks.start, blocks.end
        context.step_context.add_asset_metadata(metadata, asset_key=context.asset_key, partition_key=key)


def _asset_name(context: dg.OutputContext | dg.InputContext, verb: str) -> str:
    if not context.has_asset_key:
        raise ConfigError(
            f"AmpIOManager can {verb} only asset outputs, and {context.name!r} belongs to no asset: use it as the "
            "io_manager of @asset / @multi_asset definitions."
        )
    return context.asset_key.to_user_string()


def _value(value: Any) -> Any:
    """A metadata value as plain Python (definition metadata may come normalized to MetadataValue)."""
    return getattr(value, "value", value)


def _to_arrow(obj: Any, asset: str) -> ArrowOutput:
    """An output as Arrow: tables and readers as they are, polars through its Arrow export (batch by batch for a
    LazyFrame), anything else that exports an Arrow stream (amp's QueryResult, duckdb, DataFusion) through it."""
    if isinstance(obj, pa.Table | pa.RecordBatchReader):
        return obj
    if type(obj).__module__.startswith("polars"):
        import polars as pl

        if isinstance(obj, pl.DataFrame):
            return obj.to_arrow()
        if isinstance(obj, pl.LazyFrame):
            return _lazy_reader(obj)
    if hasattr(obj, "__arrow_c_stream__"):
        return pa.RecordBatchReader.from_stream(obj)
    raise TerminalError(
        f"AmpIOManager cannot store the {type(obj).__module__}.{type(obj).__name__} returned by asset {asset}: "
        f"return {_ACCEPTED}."
    )


def _lazy_reader(frame: Any) -> pa.RecordBatchReader:
    """A LazyFrame's result as a reader, collected chunk by chunk by polars' streaming engine."""
    import polars as pl

    chunks = iter(frame.collect_batches())
    first = next(chunks, None)
    if first is None:  # no chunk at all: the schema alone says what the (empty) table looks like
        return pa.RecordBatchReader.from_batches(pl.DataFrame(schema=frame.collect_schema()).to_arrow().schema, [])
    head = first.to_arrow()

    def batches() -> Iterator[pa.RecordBatch]:
        yield from head.to_batches()
        for chunk in chunks:
            yield from chunk.to_arrow().to_batches()

    return pa.RecordBatchReader.from_batches(head.schema, batches())


def _check_range_column(schema: pa.Schema, table: TableRef, asset: str) -> None:
    column = table.range_column
    index = schema.get_field_index(column)
    if index < 0:
        raise ConfigError(
            f"asset {asset}: the output has no column {column!r}, the integer column (a block number) AmpIOManager "
            f"keys rows by, to replace exactly a partition's rows. The output has the columns "
            f"{', '.join(schema.names) or '(none)'}. Add it to the output, or name the block column with "
            "metadata={'partition_expr': '<column>'} on the asset."
        )
    if not pa.types.is_integer(schema.field(index).type):
        raise ConfigError(
            f"asset {asset}: column {column!r} is {schema.field(index).type}, but AmpIOManager keys rows by an "
            "integer column (a block number). Cast it, or name another column with metadata={'partition_expr': ...}."
        )


class _Router:
    """Checks that every row belongs to one of the run's partitions, counting rows per partition on the way."""

    def __init__(self, partitions: PartitionBlocks, column: str, asset: str) -> None:
        owned = sorted((r.start, r.end, k) for k, r in partitions.blocks.items() if r is not None)
        self.keys = [k for *_, k in owned]
        self.starts = np.array([s for s, *_ in owned], dtype=np.uint64)
        self.ends = np.array([e for _, e, _ in owned], dtype=np.uint64)
        self.counts = dict.fromkeys(partitions.blocks, 0)
        self.column, self.asset, self.partitions = column, asset, partitions

    def route(self, batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            column = batch.column(self.column)
            if column.null_count:  # the loader refuses rows without a block, with its own message
                yield batch
                continue
            values = column.to_numpy()
            if values.dtype.kind == "i" and len(values) and values.min() < 0:
                self._outside(int(values.min()))
            values = values.astype(np.uint64, copy=False)
            index = np.searchsorted(self.starts, values, side="right").astype(np.int64) - 1
            inside = index >= 0
            inside[inside] = values[inside] <= self.ends[index[inside]]
            if not inside.all():
                self._outside(int(values[~inside][0]))
            for i, n in enumerate(np.bincount(index, minlength=len(self.keys))):
                self.counts[self.keys[i]] += int(n)
            yield batch

    def _outside(self, value: int) -> None:
        keys = list(self.partitions.blocks)
        which = keys[0] if len(keys) == 1 else f"{keys[0]}...{keys[-1]} ({len(keys)} partitions)"
        blocks = ", ".join(map(str, self.partitions.spans)) or "no block"
        raise TerminalError(
            f"asset {self.asset}, partition {which}: the output has a row with {self.column}={value}, outside the "
            f"run's blocks ({blocks}). A partitioned asset must return only the rows of the partitions it runs for: "
            f"filter the output to those blocks."
        )


def _replace(
    loader: Loader, table: TableRef, data: ArrowOutput, partitions: PartitionBlocks, asset: str
) -> tuple[WriteResult, dict[str, int]]:
    """Replace the rows of each contiguous span of the run's partitions with the output's rows in it."""
    router = _Router(partitions, table.range_column, asset)
    batches = router.route(_batches(data))
    spans = partitions.spans
    loader.ensure_table(table, data.schema)
    if not spans:  # time windows without blocks: no row can belong to them
        for _ in batches:
            pass
        return WriteResult(), router.counts
    if len(spans) == 1:
        result = loader.write(table, pa.RecordBatchReader.from_batches(data.schema, batches), replace=spans[0])
        return result, router.counts
    # Several spans (keys whose blocks are not contiguous): the rows are spilled to a local Arrow file once, then
    # each span is replaced from it, so that memory stays bounded whatever the order of the rows.
    results = []
    with tempfile.TemporaryDirectory(prefix="amp_spill_") as tmp:
        path = str(Path(tmp) / "output.arrow")
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, data.schema) as writer:
            for batch in batches:
                writer.write_batch(batch)
        with pa.memory_map(path) as source:
            spilled = pa.ipc.open_file(source)
            for span in spans:
                rows = _within(spilled, table.range_column, span)
                results.append(loader.write(table, pa.RecordBatchReader.from_batches(data.schema, rows), replace=span))
    total = WriteResult(
        rows=sum(r.rows for r in results), bytes=sum(r.bytes for r in results), commits=sum(r.commits for r in results)
    )
    return total, router.counts


def _batches(data: ArrowOutput) -> Iterator[pa.RecordBatch]:
    return iter(data.to_batches() if isinstance(data, pa.Table) else data)


def _within(spilled: pa.ipc.RecordBatchFileReader, column: str, span: RowRange) -> Iterator[pa.RecordBatch]:
    for i in range(spilled.num_record_batches):
        batch = spilled.get_batch(i)
        values = batch.column(column)
        mask = pc.and_(pc.greater_equal(values, span.start), pc.less_equal(values, span.end))
        yield batch.filter(mask)


def _read(loader: Loader, table: TableRef, spans: list[RowRange] | None) -> pa.RecordBatchReader:
    """The table's rows in ``spans`` (None: all of them), one span after the other."""
    if spans is None:
        return loader.read(table)
    if not spans:
        empty = loader.read(table)
        empty.close()
        return pa.RecordBatchReader.from_batches(empty.schema, [])
    first = loader.read(table, spans[0])

    def batches() -> Iterator[pa.RecordBatch]:
        yield from first
        for span in spans[1:]:
            yield from loader.read(table, span)

    return pa.RecordBatchReader.from_batches(first.schema, batches())
