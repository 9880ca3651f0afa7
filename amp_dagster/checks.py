"""Asset checks of amp assets, partitioned where the asset is:

- ``block_continuity``: over the loaded range (a partition's blocks, or everything up to the checkpoint), the
  destination holds exactly as many rows as amp's result of the same query, no key twice, and (when the query
  selects ``block_hash``) no block's rows from a fork amp no longer has: a gap, a duplicated block or a fork's
  leftovers all fail it;
- ``freshness``: how far the checkpoint is behind amp's head, in blocks and seconds.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import dagster as dg
import pyarrow as pa

from .assets import partitions_for
from .checkpoints import DagsterCheckpoints
from .partitions import keys_to_ranges
from .pipelines import BlockRangePartitions, Pipeline
from .ranges import BLOCK_NUM, RowRange, merge_ranges
from .state import effective_high, load_state, range_records

MAX_LAG_BLOCKS = 100  # freshness fails (as a warning) beyond this many blocks behind the head


def _key(pipeline: Pipeline) -> dg.AssetKey:
    return dg.AssetKey(pipeline.name.split("."))


def _loaded(pipeline: Pipeline, store) -> int | None:
    start = pipeline.partitions.start if isinstance(pipeline.partitions, BlockRangePartitions) else None
    records = range_records(store, pipeline.checkpoint_id)
    return effective_high(load_state(store, pipeline.checkpoint_id), records, start)


def continuity(pipeline: Pipeline, ranges: Sequence[RowRange]) -> dg.AssetCheckResult:
    """Compare the destination with amp over ``ranges`` (see the module docstring)."""
    source = pipeline.source_for("incremental")
    table = pipeline.table_ref()
    spans = merge_ranges(ranges)
    expected = sum(source.count(rows) for rows in spans)
    forks = "block_hash" in (source.schema() or pa.schema([])).names
    loader = pipeline.destination.build()
    try:
        found = sum(loader.count(table, rows) for rows in spans)
        duplicates = _duplicate_keys(loader, table, spans) if pipeline.key else 0
        orphaned = _orphaned_blocks(source, loader, table, spans) if forks and spans else []
    finally:
        loader.close()
    described = ", ".join(str(r) for r in spans) or "nothing loaded yet"
    problem = None
    if found != expected:
        problem = (
            f"the destination holds {found} rows over {described}, amp's result has {expected}: "
            f"{'rows are missing' if found < expected else 'rows are duplicated or left over from a fork'}"
        )
    elif duplicates:
        problem = f"{duplicates} key(s) appear more than once over {described}"
    elif orphaned:
        problem = f"{len(orphaned)} block(s) hold rows of a fork amp no longer has (first: block {orphaned[0]})"
    return dg.AssetCheckResult(
        passed=problem is None,
        metadata={"amp/blocks": described, "amp/rows_expected": expected, "amp/rows_found": found,
                  "amp/duplicate_keys": duplicates, "amp/orphaned_blocks": len(orphaned)},
        description=None if problem is None else problem + ". Re-materialize the range: it is replaced, not appended.",
    )  # fmt: skip


def _orphaned_blocks(source, loader, table, spans: Sequence[RowRange]) -> list[int]:
    """Blocks whose rows in the destination carry a block hash amp does not have for them (a fork's leftovers)."""
    pairs = [BLOCK_NUM, "block_hash"]
    want = pa.concat_tables([source.block_hashes(rows).select(pairs) for rows in spans])
    seen = [pa.Table.from_batches([b]).select(pairs).group_by(pairs).aggregate([])
            for rows in spans for b in loader.read(table, rows)]  # fmt: skip
    if not seen:
        return []
    have = pa.concat_tables(seen).group_by(pairs).aggregate([])
    stray = have.join(want.cast(have.schema), pairs, join_type="left anti")
    return sorted(set(stray.column(BLOCK_NUM).to_pylist()))


def _duplicate_keys(loader, table, spans: Sequence[RowRange]) -> int:
    keys = [pa.Table.from_batches([b]).select(list(table.key)) for rows in spans for b in loader.read(table, rows)]
    if not keys:
        return 0
    together = pa.concat_tables(keys)
    return together.num_rows - together.group_by(list(table.key)).aggregate([]).num_rows


def freshness(pipeline: Pipeline, store, max_lag_blocks: int = MAX_LAG_BLOCKS) -> dg.AssetCheckResult:
    head = pipeline.source_for("incremental").head()
    loaded = _loaded(pipeline, store)
    state = load_state(store, pipeline.checkpoint_id)
    if head is None:
        return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.WARN,
                                   description="amp reports no synced blocks for this query")  # fmt: skip
    lag = head.end - (loaded if loaded is not None else head.start - 1)
    metadata: dict[str, Any] = {"amp/head_block": head.end, "amp/checkpoint_block": loaded, "amp/lag_blocks": lag}
    if state is not None and state.timestamp is not None and head.timestamp is not None:
        metadata["amp/lag_seconds"] = max(0, head.timestamp - state.timestamp)
    return dg.AssetCheckResult(
        passed=lag <= max_lag_blocks, severity=dg.AssetCheckSeverity.WARN, metadata=metadata,
        description=f"{lag} blocks behind amp's head {head.end} (allowed: {max_lag_blocks})",
    )  # fmt: skip


def build_amp_checks(pipelines: Sequence[Pipeline]) -> list:
    """A continuity check (partitioned like its asset) and a freshness check for each block-keyed pipeline."""
    checks = []
    for pipeline in pipelines:
        if not hasattr(pipeline.source_for("incremental"), "head"):
            continue  # cursor sources have no chain head to compare with
        checks += [_continuity_check(pipeline), _freshness_check(pipeline)]
    return checks


def _continuity_check(pipeline: Pipeline):
    partitions = partitions_for(pipeline) if isinstance(pipeline.partitions, BlockRangePartitions) else None
    # partitioned checks are "preview" in Dagster 1.13 (verified to work: DAGSTER_NOTES §6); say so once, not per check
    warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec", category=Warning)

    # it reads the destination, so it waits for the pipeline's pool like the loads do (one chdb engine per path);
    # not a stream's: its run holds that slot for as long as it streams, and the check would wait for ever
    pool = None if pipeline.mode == "stream" else pipeline.pool

    @dg.asset_check(asset=_key(pipeline), name="block_continuity", partitions_def=partitions, pool=pool,
                    description="The destination holds exactly amp's rows over the loaded blocks: no gap, no "
                                "duplicated block, no leftover of a fork.")  # fmt: skip
    def _check(context) -> dg.AssetCheckResult:
        if partitions is not None:
            ranges = keys_to_ranges(context.partition_keys)
        else:
            loaded = _loaded(pipeline, DagsterCheckpoints(context.instance))
            first = pipeline.partitions.start if isinstance(pipeline.partitions, BlockRangePartitions) else 0
            ranges = [] if loaded is None else [RowRange(first, loaded)]
        return continuity(pipeline, ranges)

    return _check


def _freshness_check(pipeline: Pipeline):
    @dg.asset_check(asset=_key(pipeline), name="freshness",
                    description=f"The checkpoint is at most {MAX_LAG_BLOCKS} blocks behind amp's head.")  # fmt: skip
    def _check(context) -> dg.AssetCheckResult:
        return freshness(pipeline, DagsterCheckpoints(context.instance))

    return _check
