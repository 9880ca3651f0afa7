"""The demo code location that ``workspace.yaml`` loads: the dg defs folder ``amp_dagster/demo/defs`` (the
``defs.yaml`` of amp's raw tables, ERC-20 transfers and a stream), as ``pyproject.toml``'s ``[tool.dg]`` declares.

Settings come from environment variables (see :mod:`amp_dagster.demo.settings`); loading contacts neither amp nor a
store. Steps run in the run's own process (the in-process executor): a run starts one Python, not one per step,
which matters on small machines, and its asset and check steps share one chdb engine.
"""

from pathlib import Path

import dagster as dg

defs = dg.Definitions.merge(
    dg.load_from_defs_folder(path_within_project=Path(__file__).parent),
    dg.Definitions(executor=dg.in_process_executor),
)
