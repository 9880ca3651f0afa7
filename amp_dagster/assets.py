"""amp pipelines as Dagster assets, in the dagster-dlt shape: a translator with one hook, a pure spec builder, a
thin ``@amp_assets`` decorator over ``multi_asset``, and a resource whose ``run(context)`` drives the sync engine.

Every materialization goes through :func:`amp_dagster.sync.sync` with checkpoints in the instance's run storage:
an unpartitioned asset syncs in its pipeline's mode (a full refresh, an incremental load up to the head, or a
long-lived stream); a partitioned one loads exactly the block ranges of its run's partitions (one query and one
replace per contiguous span), so re-materializing or backfilling never touches other partitions.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import dagster as dg
import numpy as np
from pydantic import Field

from .checkpoints import DagsterCheckpoints
from .flight.protocol import Data, Event, Position, Watermark
from .partitions import BlockRanges, key_range, run_ranges, window_blocks
from .pipelines import BlockRangePartitions, Pipeline, TimePartitions
from .ranges import RowRange
from .state import SyncState, effective_high, load_state, range_records
from .sync import Progress, SyncResult

log = logging.getLogger(__name__)

PIPELINE_KEY = "amp/pipeline"  # the pipeline config, in each asset's definition metadata
STREAM_TAG = "amp/stream"  # tag of a stream's long-lived run: at most one per value (dagster.yaml)
# run tags that bound a stream or an unpartitioned incremental run: the incremental sensor sets the first, a user
# launching a stream for a while (the demo, a test) the second
LIMIT_TAGS = {"amp/until_block": ("until_block", int), "amp/seconds": ("seconds", float)}


# -- translation -----------------------------------------------------------------------------------------------


class AmpTranslator:
    """How a pipeline becomes an asset. Override :meth:`get_asset_spec` to change keys, groups, owners or tags.

    >>> class Mine(AmpTranslator):
    ...     def get_asset_spec(self, pipeline):
    ...         return super().get_asset_spec(pipeline).replace_attributes(owners=["team:data"])
    """

    def get_asset_spec(self, pipeline: Pipeline) -> dg.AssetSpec:
        source = pipeline.source
        sql = getattr(source, "sql", None)
        where = f"{pipeline.namespace}.{pipeline.table}" if pipeline.namespace else pipeline.table
        metadata: dict[str, Any] = {
            PIPELINE_KEY: dg.MetadataValue.json(json.loads(pipeline.model_dump_json())),
            "amp/mode": pipeline.mode,
            "amp/checkpoint_id": pipeline.checkpoint_id,
            "dagster/table_name": where,
            "dagster/uri": pipeline.destination.location(),
        }
        if sql:
            metadata["amp/sql"] = dg.MetadataValue.md(f"```sql\n{sql.strip()}\n```")
        description = pipeline.description or (f"amp query into {pipeline.destination.kind} {where}: "
                                               f"{' '.join((sql or source.kind).split())[:200]}")  # fmt: skip
        return dg.AssetSpec(
            key=dg.AssetKey(pipeline.name.split(".")),
            description=description,
            group_name=pipeline.group or "amp",
            kinds={"amp", pipeline.destination.kind},
            tags={"amp/mode": pipeline.mode},
            metadata=metadata,
        )


def build_amp_asset_specs(pipelines: Sequence[Pipeline], translator: AmpTranslator | None = None) -> list:
    """The asset specs of ``pipelines`` (pure: nothing is contacted)."""
    translator = translator or AmpTranslator()
    return [translator.get_asset_spec(p) for p in pipelines]


def partitions_for(pipeline: Pipeline) -> dg.PartitionsDefinition | None:
    """The partitions definition a pipeline's config asks for."""
    config = pipeline.partitions
    if config is None:
        return None
    if isinstance(config, BlockRangePartitions):
        return block_ranges(pipeline).definition
    factory = dg.DailyPartitionsDefinition if config.kind == "daily" else dg.HourlyPartitionsDefinition
    return factory(start_date=config.start, timezone=config.timezone)


def block_ranges(pipeline: Pipeline) -> BlockRanges:
    """The block ranges of a block-range partitioned pipeline; one definition per size and start, shared by
    the pipelines that agree on them."""
    config = pipeline.partitions
    if not isinstance(config, BlockRangePartitions):
        raise dg.DagsterInvalidDefinitionError(f"pipeline {pipeline.name} is not partitioned by block ranges")
    return BlockRanges(config.name or f"amp_blocks_{config.size}_{config.start}", config.size, config.start)


def amp_assets(
    *,
    pipelines: Sequence[Pipeline],
    name: str | None = None,
    translator: AmpTranslator | None = None,
    partitions_def: dg.PartitionsDefinition | None = None,
    backfill_policy: dg.BackfillPolicy | None = None,
    pool: str | None = None,
    op_tags: dict[str, Any] | None = None,
):
    """Decorate a function that yields ``amp.run(context)`` into a multi-asset over ``pipelines``.

    >>> @amp_assets(pipelines=load_pipelines("pipelines.yaml").pipelines)        # doctest: +SKIP
    ... def eth(context: dg.AssetExecutionContext, amp: AmpSyncResource):
    ...     yield from amp.run(context)
    """
    specs = build_amp_asset_specs(pipelines, translator)
    if partitions_def is not None:
        specs = [s.replace_attributes(partitions_def=partitions_def) for s in specs]
    return dg.multi_asset(
        specs=specs,
        name=name,
        can_subset=True,
        backfill_policy=backfill_policy,
        pool=pool,
        op_tags=op_tags,
    )


# -- running ------------------------------------------------------------------------------------------------------


class AmpSyncResource(dg.ConfigurableResource):
    """Runs the pipelines of the selected assets through the sync engine, checkpointing in run storage.

    ``run(context)`` yields one ``MaterializeResult`` per selected asset (stream assets log an
    ``AssetMaterialization`` at intervals while they run), with rows, block range, watermark, lag and timing.
    """

    stream_report_seconds: float = Field(
        10.0, description="A streaming run logs a materialization with its progress at most this often."
    )
    lock_wait: float = Field(30.0, description="Seconds a run waits for another run of the same pipeline.")

    def run(self, context: dg.AssetExecutionContext, **options: Any) -> Iterator[dg.MaterializeResult]:
        store = DagsterCheckpoints(context.instance)
        specs = context.assets_def.specs_by_key
        limits = {**_run_limits(context.run.tags), **options}
        for key in sorted(context.selected_asset_keys, key=lambda k: k.to_user_string()):
            pipeline = pipeline_of(specs[key])
            _check_pool(context.instance, pipeline)
            if pipeline.mode == "stream":
                yield self._stream(context, key, pipeline, store, limits)
            elif context.has_partition_key or context.has_partition_key_range:
                yield self._partitions(context, key, pipeline, store, options)
            else:
                started = time.monotonic()
                result = _interruptible(lambda stop, p=pipeline: p.run(
                    store, run_id=context.run.run_id, lock_wait=self.lock_wait, stop=stop, **limits))  # fmt: skip
                yield dg.MaterializeResult(asset_key=key, metadata=_metadata(pipeline, result, store, started))

    def _partitions(self, context, key, pipeline: Pipeline, store, options) -> dg.MaterializeResult:
        to_blocks = None
        if isinstance(pipeline.partitions, TimePartitions):
            client = pipeline.source.build("incremental").client
            table = pipeline.partitions.blocks_table
            to_blocks = lambda start, end: window_blocks(client, table, start, end)  # noqa: E731
        partition_keys = list(context.partition_keys)  # a lookup in the instance: once per run
        ranges = run_ranges(context, to_blocks, partition_keys) or []
        started = time.monotonic()
        counter = _PartitionCounter(pipeline.source_for("incremental"), _partition_bounds(partition_keys, ranges))
        result = None
        if ranges:
            run_id = context.run.run_id
            result = _interruptible(lambda stop: pipeline.run(
                store, mode="incremental", ranges=ranges, run_id=run_id, lock_wait=self.lock_wait, stop=stop,
                source=counter, **options))  # fmt: skip
        bounds = dict(counter.bounds)
        if len(partition_keys) > 1:  # a range run: each partition's own figures (one partition: the run's are its)
            for partition, rows in counter.counts().items():
                own = {"dagster/partition_row_count": rows, "amp/first_block": bounds[partition].start,
                       "amp/last_block": bounds[partition].end}  # fmt: skip
                context.add_asset_metadata(own, asset_key=key, partition_key=partition)
        metadata = _metadata(pipeline, result, store, started, row_key="dagster/partition_row_count")
        # the blocks this materialization covers (rows may not reach the ends of a sparse query's range)
        metadata["amp/ranges"] = ", ".join(str(r) for r in ranges) or "no blocks in this window"
        if ranges:
            metadata["amp/first_block"], metadata["amp/last_block"] = ranges[0].start, ranges[-1].end
        return dg.MaterializeResult(asset_key=key, metadata=metadata)

    def _stream(self, context, key, pipeline: Pipeline, store, options) -> dg.MaterializeResult:
        started, last = time.monotonic(), [0.0]
        events: list[dg.AssetMaterialization] = []
        lock = threading.Lock()

        def report(progress: Progress) -> None:
            if time.monotonic() - last[0] >= self.stream_report_seconds:
                last[0] = time.monotonic()
                metadata = _progress_metadata(pipeline, progress)
                with lock:
                    events.append(dg.AssetMaterialization(asset_key=key, metadata=metadata))

        def flush_events() -> None:
            with lock:
                pending, events[:] = list(events), []
            for event in pending:
                context.log_event(event)

        result = _interruptible(lambda stop: pipeline.run(
            store, mode="stream", run_id=context.run.run_id, lock_wait=self.lock_wait, stop=stop, progress=report,
            **options), tick=flush_events)  # fmt: skip
        flush_events()
        return dg.MaterializeResult(asset_key=key, metadata=_metadata(pipeline, result, store, started))


def _check_pool(instance, pipeline: Pipeline) -> None:
    """A pool nobody limits serializes nothing: refuse it rather than let runs of one pipeline overlap."""
    if pipeline.pool is None:
        return
    limited = {p.name for p in instance.event_log_storage.get_pool_limits()}
    if pipeline.pool not in limited and instance.get_concurrency_config().pool_config.default_pool_limit is None:
        raise dg.Failure(
            f"pool {pipeline.pool!r} has no limit in this Dagster instance, so it would not keep runs of "
            f"{pipeline.name} apart. Set one with `dagster instance concurrency set {pipeline.pool} 1`, or give "
            "every pool a limit with `concurrency: {pools: {default_limit: 1}}` in dagster.yaml."
        )


def _run_limits(tags) -> dict[str, Any]:
    """SyncOptions from the run's ``amp/until_block`` / ``amp/seconds`` tags; a clear error for a bad value."""
    limits: dict[str, Any] = {}
    for tag, (option, kind) in LIMIT_TAGS.items():
        if tag in tags:
            try:
                limits[option] = kind(tags[tag])
            except ValueError:
                wanted = "a block number" if kind is int else "a number of seconds"
                raise dg.Failure(f"run tag {tag}={tags[tag]!r} is not {wanted}: fix the tag or remove it") from None
    return limits


def pipeline_of(spec: dg.AssetSpec) -> Pipeline:
    raw = spec.metadata.get(PIPELINE_KEY)
    if raw is None:
        raise dg.DagsterInvariantViolationError(f"asset {spec.key.to_user_string()} has no {PIPELINE_KEY} metadata")
    return Pipeline.model_validate(raw.value if isinstance(raw, dg.JsonMetadataValue) else raw)


def _interruptible(work, tick=None) -> SyncResult:
    """Run ``work(stop)`` on a worker thread. Dagster delivers a termination to this (the main) thread: it is
    turned into a stop request, the worker finishes its flush and checkpoints, then the termination goes on."""
    stop, done = threading.Event(), {}

    def target() -> None:
        try:
            done["result"] = work(stop)
        except BaseException as exc:  # handed to the main thread
            done["error"] = exc

    worker = threading.Thread(target=target, name="amp-sync", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.2)
            if tick is not None:
                tick()
    except BaseException:
        stop.set()
        worker.join(120)
        if tick is not None:
            tick()
        raise
    if "error" in done:
        raise done["error"]
    return done["result"]


class _PartitionCounter:
    """A source wrapper counting rows per partition as batches pass (vectorised), for per-partition metadata."""

    def __init__(self, source: Any, bounds: list[tuple[str, RowRange]]) -> None:
        self.source, self.range_column, self.bounds = source, getattr(source, "range_column", None), bounds
        self._keys = [k for k, _ in bounds]
        self._starts = np.array([r.start for _, r in bounds], dtype=np.float64)
        self._counts = np.zeros(len(bounds), dtype=np.int64)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.source, name)

    def read(self, resume: Position | None = None, *, rows: RowRange | None = None) -> Iterator[Event]:
        for event in self.source.read(resume, rows=rows):
            if isinstance(event, Data) and event.batch.num_rows and len(self._keys) and self.range_column:
                values = event.batch.column(self.range_column).to_numpy(zero_copy_only=False).astype(np.float64)
                slots = np.searchsorted(self._starts, values, side="right") - 1
                self._counts += np.bincount(slots[slots >= 0], minlength=len(self._keys))[: len(self._keys)]
            yield event

    def counts(self) -> dict[str, int]:
        return dict(zip(self._keys, (int(n) for n in self._counts), strict=True))


def _partition_bounds(keys: list[str], ranges: list[RowRange]) -> list[tuple[str, RowRange]]:
    try:
        return sorted(((k, key_range(k)) for k in keys), key=lambda kv: kv[1].start)
    except Exception:  # time windows: one window's rows all count for it (per-key windows are not kept apart)
        return [(keys[0], ranges[0])] if len(keys) == 1 and ranges else []


# -- metadata ----------------------------------------------------------------------------------------------------


def _progress_metadata(pipeline: Pipeline, progress: Progress) -> dict[str, Any]:
    try:
        state = progress.checkpoint
        return {
            "dagster/row_count": progress.rows,
            "amp/checkpoint_block": state.high if state else None,
            "amp/lag_blocks": progress.lag_blocks,
            "amp/rows_per_s": round(progress.rows_per_s, 1),
            "amp/elapsed_s": round(progress.elapsed, 1),
            **_watermark(state),
        }
    except Exception as exc:  # metadata never fails a materialization
        log.warning("amp progress metadata for %s failed: %s", pipeline.name, exc)
        return {}


def _watermark(state: SyncState | None) -> dict[str, Any]:
    if state is None or not isinstance(state.position, Watermark):
        return {}
    network, ref = next(iter(state.position.blocks.items()))
    return {"amp/network": network, "amp/watermark_block": ref.number, "amp/watermark_hash": ref.hash}


def _metadata(pipeline: Pipeline, result: SyncResult | None, store, started: float,
              row_key: str = "dagster/row_count") -> dict[str, Any]:  # fmt: skip
    """What the UI shows for one materialization. Every part is best effort: enrichment never fails a run."""
    metadata: dict[str, Any] = {row_key: 0 if result is None else result.rows}
    parts = (
        partial(_result_metadata, pipeline, result),
        partial(_checkpoint_metadata, pipeline, store),
        partial(_schema_metadata, pipeline),
    )
    for part in parts:
        try:
            metadata.update(part())
        except Exception as exc:  # metadata never fails a materialization
            log.warning("amp metadata for %s: %s", pipeline.name, exc)
    metadata["amp/wall_s"] = round(time.monotonic() - started, 3)
    return metadata


def _result_metadata(pipeline: Pipeline, result: SyncResult | None) -> dict[str, Any]:
    where = f"{pipeline.namespace}.{pipeline.table}" if pipeline.namespace else pipeline.table
    metadata: dict[str, Any] = {"dagster/table_name": where, "dagster/uri": pipeline.destination.location()}
    if result is not None:
        metadata.update({
            "amp/first_block": result.first_block, "amp/last_block": result.last_block, "amp/bytes": result.bytes,
            "amp/duration_s": round(result.duration, 3), "amp/rows_per_s": round(result.rows_per_s, 1),
            "amp/stopped": result.stopped, "amp/reorgs": result.reorgs,
        })  # fmt: skip
    return metadata


def _checkpoint_metadata(pipeline: Pipeline, store) -> dict[str, Any]:
    state = load_state(store, pipeline.checkpoint_id)
    records = range_records(store, pipeline.checkpoint_id)
    start = pipeline.partitions.start if isinstance(pipeline.partitions, BlockRangePartitions) else None
    high = effective_high(state, records, start)
    shown = {"checkpoint": json.loads(state.to_json()) if state else None,
             "explicit_ranges": [[r.start, r.end] for rec in records for r in rec.ranges]}  # fmt: skip
    return {"amp/checkpoint": dg.MetadataValue.json(shown), "amp/checkpoint_block": high, **_watermark(state)}


def _schema_metadata(pipeline: Pipeline) -> dict[str, Any]:
    schema = pipeline.source_for("incremental").schema()
    if schema is None:
        return {}
    columns = [dg.TableColumn(f.name, str(f.type), constraints=dg.TableColumnConstraints(nullable=f.nullable))
               for f in schema]  # fmt: skip
    return {"dagster/column_schema": dg.TableSchema(columns=columns)}


# -- config-driven ---------------------------------------------------------------------------------------------


def build_amp_assets(pipelines: Sequence[Pipeline], translator: AmpTranslator | None = None) -> list:
    """Assets for a list of pipelines, grouped into multi-assets that share partitions and a pool.

    Streams get a multi-asset each (one long-lived run per stream); block-range partitioned pipelines backfill in
    single runs (``BackfillPolicy.single_run()``: one query and one replace per contiguous span).
    """
    groups: dict[tuple, list[Pipeline]] = {}
    for p in pipelines:
        shape = (p.mode == "stream" and p.name, p.mode, json.dumps(p.partitions.model_dump()) if p.partitions else "",
                 p.pool)  # fmt: skip
        groups.setdefault(shape, []).append(p)
    resource = AmpSyncResource()
    built = []
    for members in groups.values():
        first = members[0]
        partitions = partitions_for(first)
        policy = dg.BackfillPolicy.single_run() if partitions is not None else None
        name = "amp_" + "__".join(p.name.replace(".", "_") for p in members)[:200]

        @amp_assets(pipelines=members, name=name, translator=translator, partitions_def=partitions,
                    backfill_policy=policy, pool=first.pool)  # fmt: skip
        def _assets(context):
            yield from resource.run(context)

        built.append(_assets)
    return built
