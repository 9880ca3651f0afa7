"""The YAML Component: a ``defs.yaml`` declares amp pipelines (queries, destinations, modes, partitions, pools and
sensors) with the same pipeline model ``amp-dagster sync`` reads; the component builds their assets, checks,
sensors and schedules.

.. code-block:: yaml

    type: amp_dagster.AmpPipelinesComponent
    attributes:
      pipelines:
        - name: eth.logs
          source: {sql: "SELECT * FROM eth_rpc.logs", url: "grpc://127.0.0.1:1602", token_env: AMP_AUTH_TOKEN}
          destination: {kind: postgres, dsn: "postgresql://127.0.0.1:5432/test", password_env: PGPASSWORD}
          table: logs
          partitions: {kind: block_ranges, size: 10000}

Secrets are environment variable *names* (``password_env``), read when a run needs them: a ``{{ env.X }}``
template would resolve to None for an unset variable at load time.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import dagster as dg

from .pipelines import Pipeline, PipelineFile, parse_pipelines


def _resolve_pipelines(context: dg.ResolutionContext, raw: Any) -> list[Pipeline]:
    """Templates rendered (``{{ env.X }}``...), then validated by the pipeline model, errors naming each field."""
    return parse_pipelines({"pipelines": context.resolve_value(raw)}, source="defs.yaml attributes").pipelines


class AmpPipelinesComponent(dg.Component, dg.Model, dg.Resolvable):
    """amp pipelines as Dagster assets, with their checks, sensors and schedules."""

    pipelines: Annotated[list[Any], dg.Resolver(_resolve_pipelines, model_field_type=list[dict[str, Any]])]
    sensors: bool = True
    checks: bool = True

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        return build_amp_definitions(PipelineFile(pipelines=self.pipelines).pipelines, sensors=self.sensors,
                                     checks=self.checks)  # fmt: skip

    @classmethod
    def from_file(cls, path: str | Path) -> AmpPipelinesComponent:
        """The component of a pipeline file (a ``defs.yaml`` or a plain ``pipelines:`` file), validated with
        errors naming the file, line and field."""
        from .pipelines import load_pipelines

        return cls(pipelines=load_pipelines(path).pipelines)


def build_amp_definitions(pipelines: Sequence[Pipeline], *, sensors: bool = True, checks: bool = True):
    """Assets, checks, sensors and schedules for ``pipelines``, as one ``Definitions``."""
    from .assets import build_amp_assets
    from .checks import build_amp_checks
    from .sensors import build_amp_automation

    automation = build_amp_automation(pipelines) if sensors else ([], [])
    return dg.Definitions(
        assets=build_amp_assets(pipelines),
        asset_checks=build_amp_checks(pipelines) if checks else [],
        sensors=automation[0],
        schedules=automation[1],
    )
