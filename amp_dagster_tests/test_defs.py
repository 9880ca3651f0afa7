"""The demo code location loads, and its asset copies exactly the newest blocks' logs, idempotently."""

from __future__ import annotations

import dagster as dg
import pyarrow.compute as pc

from amp_dagster.definitions import defs, recent_logs
from amp_dagster.loaders.base import TableRef
from amp_dagster.loaders.delta import DeltaLoader


def test_definitions_load():
    assert {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()} == {"recent_logs"}


def test_recent_logs_materializes_the_newest_blocks_twice_without_duplicates(devserver, tmp_path, monkeypatch):
    server = devserver(blocks=300, start_block=1000)
    monkeypatch.setenv("AMP_URL", server.url)
    monkeypatch.setenv("AMP_DEMO_DELTA", str(tmp_path))
    config = dg.RunConfig(ops={"recent_logs": {"config": {"blocks": 100}}})
    for _ in range(2):
        result = dg.materialize([recent_logs], run_config=config, raise_on_error=True)
    (materialization,) = result.asset_materializations_for_node("recent_logs")
    assert materialization.metadata["blocks"].value == "1200..=1299"
    stored = DeltaLoader(tmp_path).read(TableRef("logs", namespace="eth_rpc")).read_all()
    want = server.chain.view().tables(1200, 1299, ["logs"])["logs"]
    assert stored.num_rows == want.num_rows == materialization.metadata["rows"].value
    assert pc.min(stored["_block_num"]).as_py() == 1200
