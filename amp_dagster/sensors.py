"""Sensors and schedules that keep amp assets in sync, each a plain ``@sensor`` with its own cursor:

- incremental: polls amp's head cheaply, adds the block-range partitions that closed behind the finality depth,
  and requests one run per new range (``run_key`` per range, so no range is ever requested twice);
- stream: keeps exactly one long-lived run per streaming asset, relaunching it with backoff after a failure;
- gaps: finds partitions that are missing or failed below the highest loaded one and launches one backfill over
  them, once per distinct set of gaps;
- a schedule per full-refresh pipeline.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence

import dagster as dg

from .assets import STREAM_TAG, block_ranges
from .partitions import key_range
from .pipelines import BlockRangePartitions, Pipeline, TimePartitions
from .state import load_state

PIPELINE_TAG = "amp/pipeline"
MAX_RUNS_PER_TICK = 20  # a long history is caught up over several ticks (or by one backfill)
MAX_PARTITIONS = 100_000  # Dagster's guidance for one asset's partitions (UI load times)
STREAM_BACKOFF = (10.0, 600.0)  # seconds before relaunching a failed stream, doubling per failure in a row


def _name(pipeline: Pipeline, what: str) -> str:
    return f"amp_{pipeline.name.replace('.', '_')}_{what}"


def _key(pipeline: Pipeline) -> dg.AssetKey:
    return dg.AssetKey(pipeline.name.split("."))


def _in_flight(instance, pipeline: Pipeline) -> list:
    from dagster._core.storage.dagster_run import NOT_FINISHED_STATUSES

    tags = {PIPELINE_TAG: pipeline.checkpoint_id}
    return instance.get_run_records(dg.RunsFilter(tags=tags, statuses=NOT_FINISHED_STATUSES), limit=1)


def incremental_sensor(pipeline: Pipeline, *, key: dg.AssetKey | None = None) -> dg.SensorDefinition:
    """Requests runs as the chain grows: one per closed block range (partitioned), or one per step of the head
    (unpartitioned: the asset loads ``(checkpoint, head - finality]``)."""
    key = key or _key(pipeline)
    partitioned = isinstance(pipeline.partitions, BlockRangePartitions)

    @dg.sensor(name=_name(pipeline, "incremental"), minimum_interval_seconds=pipeline.sensor_seconds,
               asset_selection=[key], default_status=dg.DefaultSensorStatus.STOPPED,
               description=f"Loads new blocks of {pipeline.name} as amp syncs them.")  # fmt: skip
    def _sensor(context: dg.SensorEvaluationContext):
        source = pipeline.source_for("incremental")
        if not hasattr(source, "head"):  # a cursor source: read what follows its cursor, one run at a time
            if _in_flight(context.instance, pipeline):
                return dg.SkipReason(f"a run of {pipeline.name} is still reading; the next one starts after it")
            tick = str(int(time.time()))
            return dg.RunRequest(run_key=f"{pipeline.checkpoint_id}:{tick}", asset_selection=[key],
                                 tags={PIPELINE_TAG: pipeline.checkpoint_id})  # fmt: skip
        head = source.head()
        if head is None:
            return dg.SkipReason(f"amp reports no synced blocks for {pipeline.name} yet")
        final = head.end - pipeline.finality
        if partitioned:
            return _ranges(context, pipeline, key, head.end, final)
        if _in_flight(context.instance, pipeline):
            return dg.SkipReason(f"a run of {pipeline.name} is still loading; the next one starts after it")
        state = load_state(_store(context), pipeline.checkpoint_id)
        loaded = -1 if state is None or state.high is None else state.high
        if final <= loaded or str(final) == context.cursor:
            return dg.SkipReason(f"{pipeline.name} is loaded through {loaded}; amp's head is {head.end} "
                                 f"(finality {pipeline.finality}): nothing new")  # fmt: skip
        request = dg.RunRequest(run_key=f"{pipeline.checkpoint_id}:{final}", asset_selection=[key],
                                tags={PIPELINE_TAG: pipeline.checkpoint_id, "amp/until_block": str(final)})  # fmt: skip
        return dg.SensorResult(run_requests=[request], cursor=str(final))

    return _sensor


def _store(context):
    from .checkpoints import DagsterCheckpoints

    return DagsterCheckpoints(context.instance)


def _ranges(context, pipeline: Pipeline, key: dg.AssetKey, head: int, final: int):
    ranges = block_ranges(pipeline)
    after = int(context.cursor) if context.cursor else None
    known = set(context.instance.get_dynamic_partitions(ranges.name))
    total = (final - ranges.start + 1) // ranges.size
    if total > MAX_PARTITIONS:
        return dg.SkipReason(
            f"{pipeline.name}: {total:,} block ranges of {ranges.size:,} blocks from block {ranges.start:,} to amp's "
            f"head {head:,} would exceed {MAX_PARTITIONS:,} partitions, more than Dagster's UI handles well. Raise "
            "partitions.size or set partitions.start nearer the head."
        )
    closed = ranges.keys_through(final)
    new_keys = [k for k in closed if k not in known]
    due = ranges.keys_through(final, after=after)[:MAX_RUNS_PER_TICK]
    if not due and not new_keys:
        upcoming = ranges.key_of(max(final + 1, ranges.start))
        return dg.SkipReason(f"no new closed block range: amp's head is {head}, final {final} (finality "
                             f"{pipeline.finality}); the next range {upcoming} closes at block "
                             f"{key_range(upcoming).end}")  # fmt: skip
    requests = [
        dg.RunRequest(
            run_key=f"{pipeline.checkpoint_id}:{k}",
            partition_key=k,
            asset_selection=[key],
            tags={PIPELINE_TAG: pipeline.checkpoint_id},
        )
        for k in due
    ]
    adds = [ranges.definition.build_add_request(new_keys)] if new_keys else []
    cursor = str(key_range(due[-1]).end) if due else context.cursor
    return dg.SensorResult(run_requests=requests, dynamic_partitions_requests=adds, cursor=cursor)


def stream_sensor(pipeline: Pipeline, *, key: dg.AssetKey | None = None) -> dg.SensorDefinition:
    """Keeps exactly one run of a streaming asset alive: launches it when none is queued or running, relaunches
    it after a failure with exponential backoff (the skip reason and the run's tags say so)."""
    key = key or _key(pipeline)

    @dg.sensor(name=_name(pipeline, "stream"), minimum_interval_seconds=pipeline.sensor_seconds,
               asset_selection=[key], default_status=dg.DefaultSensorStatus.STOPPED,
               description=f"Keeps one long-lived streaming run of {pipeline.name} alive.")  # fmt: skip
    def _sensor(context: dg.SensorEvaluationContext):
        from dagster._core.storage.dagster_run import NOT_FINISHED_STATUSES

        tags = {STREAM_TAG: pipeline.checkpoint_id}
        live = context.instance.get_run_records(dg.RunsFilter(tags=tags, statuses=NOT_FINISHED_STATUSES), limit=1)
        if live:
            run = live[0].dagster_run
            return dg.SkipReason(f"the stream of {pipeline.name} runs: run {run.run_id} is {run.status.value}")
        recent = context.instance.get_run_records(dg.RunsFilter(tags=tags), limit=10)
        failures = 0
        for record in recent:
            if record.dagster_run.status not in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED):
                break
            failures += 1
        if failures:
            base, ceiling = STREAM_BACKOFF
            delay = min(base * 2 ** (failures - 1), ceiling)
            ended = recent[0].end_time or recent[0].update_timestamp.timestamp()
            waited = time.time() - ended
            if waited < delay:
                return dg.SkipReason(f"the stream of {pipeline.name} ended {failures} time(s) in a row (last: run "
                                     f"{recent[0].dagster_run.run_id}, {recent[0].dagster_run.status.value}); "
                                     f"relaunching in {delay - waited:.0f} s")  # fmt: skip
        launch = int(context.cursor or 0) + 1
        run_tags = {STREAM_TAG: pipeline.checkpoint_id, PIPELINE_TAG: pipeline.checkpoint_id,
                    "amp/launch": str(launch)}  # fmt: skip
        if failures:
            run_tags["amp/relaunch_after_failures"] = str(failures)
        request = dg.RunRequest(run_key=f"{pipeline.checkpoint_id}:stream:{launch}", asset_selection=[key],
                                tags=run_tags)  # fmt: skip
        return dg.SensorResult(run_requests=[request], cursor=str(launch))

    return _sensor


def gap_sensor(pipelines: Sequence[Pipeline], name: str = "amp_gaps") -> dg.SensorDefinition:
    """Launches one backfill over the block ranges that are missing or failed below the highest loaded
    partition of each block-range partitioned pipeline (once per distinct set of gaps)."""
    partitioned = [p for p in pipelines if isinstance(p.partitions, BlockRangePartitions)]

    @dg.sensor(name=name, minimum_interval_seconds=max([60, *(p.sensor_seconds for p in partitioned)]),
               default_status=dg.DefaultSensorStatus.STOPPED,
               description="Backfills block ranges missing or failed below the highest loaded partition.")  # fmt: skip
    def _sensor(context: dg.SensorEvaluationContext):
        from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset

        subsets, described = {}, []
        for pipeline in partitioned:
            gaps = find_gaps(context.instance, pipeline)
            if gaps:
                definition = block_ranges(pipeline).definition
                subsets[_key(pipeline)] = definition.subset_with_partition_keys(gaps)
                described.append(f"{pipeline.name}: {len(gaps)} range(s) from {gaps[0]}")
        if not subsets:
            return dg.SkipReason("no gaps: every block range below the highest loaded one is materialized")
        fingerprint = hashlib.sha256(repr(sorted((k.to_user_string(), sorted(s.get_partition_keys()))
                                                 for k, s in subsets.items())).encode()).hexdigest()[:16]  # fmt: skip
        if fingerprint == context.cursor:
            return dg.SkipReason(f"a backfill over these gaps was launched already ({'; '.join(described)})")
        subset = AssetGraphSubset(partitions_subsets_by_asset_key=subsets)
        request = dg.RunRequest.for_asset_graph_subset(subset, tags={"amp/gap_backfill": fingerprint})
        return dg.SensorResult(run_requests=[request], cursor=fingerprint)

    return _sensor


def find_gaps(instance, pipeline: Pipeline) -> list[str]:
    """Registered block ranges below the highest materialized one that are not materialized nor being loaded."""
    from dagster._core.storage.dagster_run import NOT_FINISHED_STATUSES

    ranges, key = block_ranges(pipeline), _key(pipeline)
    registered = sorted(instance.get_dynamic_partitions(ranges.name))
    materialized = instance.get_materialized_partitions(key)
    if not materialized:
        return []
    top = max(materialized)
    busy = set()
    for record in instance.get_run_records(dg.RunsFilter(tags={PIPELINE_TAG: pipeline.checkpoint_id},
                                                         statuses=NOT_FINISHED_STATUSES)):  # fmt: skip
        partition = record.dagster_run.tags.get("dagster/partition")
        if partition:
            busy.add(partition)
    return [k for k in registered if k < top and k not in materialized and k not in busy]


def refresh_schedule(pipeline: Pipeline, *, key: dg.AssetKey | None = None) -> dg.ScheduleDefinition:
    """Runs a full-refresh pipeline on its cron schedule."""
    return dg.ScheduleDefinition(name=_name(pipeline, "refresh"), cron_schedule=pipeline.schedule,
                                 target=dg.AssetSelection.assets(key or _key(pipeline)),
                                 tags={PIPELINE_TAG: pipeline.checkpoint_id},
                                 default_status=dg.DefaultScheduleStatus.STOPPED)  # fmt: skip


def build_amp_automation(pipelines: Sequence[Pipeline]) -> tuple[list, list]:
    """The sensors and schedules a set of pipelines needs: (sensors, schedules)."""
    sensors, schedules = [], []
    for pipeline in pipelines:
        if pipeline.mode == "stream":
            sensors.append(stream_sensor(pipeline))
        elif pipeline.mode == "incremental" and not isinstance(pipeline.partitions, TimePartitions):
            sensors.append(incremental_sensor(pipeline))
        elif pipeline.schedule:
            schedules.append(refresh_schedule(pipeline))
    if any(isinstance(p.partitions, BlockRangePartitions) for p in pipelines):
        sensors.append(gap_sensor(pipelines))
    return sensors, schedules
