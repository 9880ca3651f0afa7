"""The YAML Component: loaded by Dagster's own component machinery, the same file `amp-dagster sync` reads,
registered for dg, and YAML mistakes named by field."""

from __future__ import annotations

import importlib.metadata
import warnings

import pytest
import yaml

from amp_dagster.component import AmpPipelinesComponent
from amp_dagster.pipelines import load_pipelines

DEFS = {
    "type": "amp_dagster.AmpPipelinesComponent",
    "attributes": {
        "pipelines": [
            {
                "name": "eth.logs",
                "source": {"sql": "SELECT * FROM eth_rpc.logs", "url": "{{ env('AMP_URL', 'grpc://127.0.0.1:1602') }}"},
                "destination": {"kind": "delta", "path": "/tmp/amp_component_test"},
                "table": "logs",
                "partitions": {"kind": "block_ranges", "size": 100},
            },
            {
                "name": "eth.blocks_stream",
                "source": {"sql": "SELECT * FROM eth_rpc.blocks"},
                "destination": {
                    "kind": "postgres",
                    "dsn": "postgresql://127.0.0.1:5432/test",
                    "password_env": "PGPASSWORD",
                },
                "table": "blocks",
                "mode": "stream",
            },
        ]
    },
}


def _load(defs: dict):
    from dagster.components.testing import create_defs_folder_sandbox

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with create_defs_folder_sandbox() as sandbox:
            path = sandbox.scaffold_component(component_cls=AmpPipelinesComponent, defs_yaml_contents=defs)
            with sandbox.load_component_and_build_defs(defs_path=path) as (component, built):
                return component, built


def test_dagster_loads_the_component_from_a_defs_yaml(monkeypatch):
    monkeypatch.setenv("AMP_URL", "grpc://127.0.0.1:4242")
    component, defs = _load(DEFS)
    assert isinstance(component, AmpPipelinesComponent)
    assert component.pipelines[0].source.url == "grpc://127.0.0.1:4242", "templates are rendered"
    keys = sorted(spec.key.to_user_string() for spec in defs.resolve_all_asset_specs())
    assert keys == ["eth/blocks_stream", "eth/logs"]
    assert sorted(s.name for s in defs.sensors) == ["amp_eth_blocks_stream_stream", "amp_eth_logs_incremental",
                                                    "amp_gaps"]  # fmt: skip
    checks = sorted(key.name for c in defs.asset_checks for key in c.check_keys)
    assert checks == ["block_continuity", "block_continuity", "freshness", "freshness"]


def test_a_mistake_in_the_defs_yaml_names_the_field():
    bad = yaml.safe_load(yaml.safe_dump(DEFS))
    bad["attributes"]["pipelines"][1]["destination"]["pasword_env"] = "PGPASSWORD"
    with pytest.raises(Exception) as caught:
        _load(bad)
    chain, error = [], caught.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    assert any("pipelines[1].destination.pasword_env: Extra inputs are not permitted" in text for text in chain)


def test_amp_dagster_sync_reads_the_same_file(tmp_path, monkeypatch):
    monkeypatch.setenv("AMP_URL", "grpc://127.0.0.1:4343")
    path = tmp_path / "defs.yaml"
    path.write_text(yaml.safe_dump(DEFS))
    spec = load_pipelines(path)
    assert spec.get("eth.logs").source.url == "grpc://127.0.0.1:4343", "rendered as Dagster renders it"
    assert [p.name for p in spec.pipelines] == ["eth.logs", "eth.blocks_stream"]
    assert spec.get("eth.blocks_stream").destination.password_env == "PGPASSWORD", "a secret stays a variable name"


def test_the_component_is_registered_for_dg():
    registered = {e.name: e.value for e in importlib.metadata.entry_points(group="dagster_dg_cli.registry_modules")}
    assert registered.get("amp_dagster") == "amp_dagster.component"
