"""`amp-dagster sync`, `pipelines` and `checkpoints`: runs without a daemon, exit codes, and every input a user can
get wrong shown with its message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from amp_dagster.cli import main

from . import services
from .chaincheck import canonical, exact
from .services import closed_port


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "dagster_home"
    path.mkdir()
    (path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(path))
    return path


@pytest.fixture
def schema():
    services.require_postgres()
    name = f"amp_cli_{os.getpid()}_{time.monotonic_ns() % 10**8}"
    yield name
    with psycopg.connect(services.POSTGRES_DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def write(path: Path, url: str, schema: str, *, sql_text: str = "SELECT * FROM eth_rpc.logs", mode: str = "stream",
          extra: str = "") -> Path:  # fmt: skip
    path.write_text(
        "pipelines:\n"
        "  - name: logs\n"
        f'    source: {{sql: "{sql_text}", url: "{url}"}}\n'
        f'    destination: {{kind: postgres, dsn: "{services.POSTGRES_DSN}"}}\n'
        f"    namespace: {schema}\n"
        "    table: logs\n"
        f"    mode: {mode}\n"
        "    retry: {attempts: 2, initial_delay: 0.05}\n"
        f"{extra}"
    )
    return path


def test_sync_runs_a_stream_to_a_block_and_the_checkpoints_commands_read_it(devserver, home, schema, tmp_path, capsys):
    server = devserver(blocks=100, microbatch_blocks=25)
    spec = write(tmp_path / "p.yaml", server.url, schema)
    assert main(["sync", str(spec), "logs", "--until-block", "60", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["stopped"] == "until" and result["checkpoint"]["high"] == 74
    from amp_dagster.loaders.base import TableRef
    from amp_dagster.loaders.postgres import PostgresLoader

    with PostgresLoader(services.POSTGRES_DSN) as pg:
        verdict = exact(pg.read(TableRef("logs", schema)).read_all(), canonical(server, end=74))
    assert verdict["ok"], verdict

    assert main(["checkpoints", "list"]) == 0
    assert "logs [stream] through 74" in capsys.readouterr().out
    assert main(["checkpoints", "show", "logs"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["checkpoint"]["high"] == 74 and shown["checkpoint"]["position"]["watermark"]["mainnet"]["number"] == 74
    assert main(["pipelines", str(spec)]) == 0
    assert "logs" in capsys.readouterr().out and "postgres" in capsys.readouterr().out + "postgres"
    assert main(["checkpoints", "reset", "logs"]) == 0
    assert "1 key(s) removed" in capsys.readouterr().out
    assert main(["checkpoints", "show", "logs"]) == 2
    assert "no checkpoint for pipeline 'logs'" in capsys.readouterr().err


def _cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "amp_dagster.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})  # fmt: skip


def test_two_syncs_of_one_pipeline_never_both_write(devserver, home, schema, tmp_path):
    server = devserver(blocks=50, microbatch_blocks=10, block_time=0.05)
    spec = write(tmp_path / "p.yaml", server.url, schema)
    first = subprocess.Popen([sys.executable, "-m", "amp_dagster.cli", "sync", str(spec), "--seconds", "30"],
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "checkpoint=" not in (line := first.stderr.readline()):
            assert line and time.monotonic() < deadline, "the first sync never checkpointed"
        second = _cli("sync", str(spec), "--wait", "1", "--seconds", "5")
        assert second.returncode == 2, second.stderr
        assert "pipeline 'logs' is already being synced by process" in second.stderr
    finally:
        first.terminate()
        first.wait(30)
    assert first.returncode == 0, "SIGTERM stops a sync cleanly"


def test_stream_mode_on_non_incremental_sql_fails_with_the_servers_message(devserver, home, schema, tmp_path):
    server = devserver(blocks=10)
    spec = write(
        tmp_path / "p.yaml",
        server.url,
        schema,
        sql_text="SELECT count(*) AS n, max(_block_num) AS _block_num FROM eth_rpc.logs",
    )
    out = _cli("sync", str(spec))
    assert out.returncode == 2
    assert "non-incremental" in out.stderr and "INVALID_ARGUMENT" in out.stderr


def test_an_unreachable_amp_exhausts_its_retries_with_exit_3(home, schema, tmp_path):
    spec = write(tmp_path / "p.yaml", f"grpc://127.0.0.1:{closed_port()}", schema)
    out = _cli("sync", str(spec), "--seconds", "30")
    assert out.returncode == 3, out.stderr
    assert "is unavailable" in out.stderr and "127.0.0.1" in out.stderr


def test_yaml_mistakes_name_the_file_line_and_field(home, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "pipelines:\n"
        "  - name: logs\n"
        "    source: {sql: SELECT 1}\n"
        "    destination:\n"
        "      kind: postgres\n"
        "      dsn: postgresql://x/y\n"
        "      pasword_env: PGPASSWORD\n"
        "    table: logs\n"
        "    mode: sometimes\n"
    )
    assert main(["sync", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:7: pipelines[0].destination.pasword_env: Extra inputs are not permitted" in err
    assert f"{bad}:9: pipelines[0].mode: Input should be 'full_refresh', 'incremental' or 'stream'" in err
    broken = tmp_path / "broken.yaml"
    broken.write_text("pipelines:\n  - name: [unclosed\n")
    assert main(["sync", str(broken)]) == 2
    assert f"{broken}:3: not valid YAML" in capsys.readouterr().err
    assert main(["sync", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read the pipeline file" in capsys.readouterr().err


def test_an_unknown_pipeline_is_named_with_the_known_ones(home, schema, tmp_path, capsys):
    spec = write(tmp_path / "p.yaml", "grpc://127.0.0.1:1", schema)
    assert main(["sync", str(spec), "logz"]) == 2
    assert "no pipeline named 'logz'; the file defines: logs" in capsys.readouterr().err


def test_a_changed_pipeline_is_refused_against_its_old_checkpoint(devserver, home, schema, tmp_path, capsys):
    server = devserver(blocks=30, microbatch_blocks=10)
    spec = write(tmp_path / "p.yaml", server.url, schema)
    assert main(["sync", str(spec), "--until-block", "9"]) == 0
    changed = write(tmp_path / "p.yaml", server.url, schema, sql_text="SELECT * FROM eth_rpc.logs WHERE log_index = 0")
    assert main(["sync", str(changed), "--until-block", "19"]) == 2
    err = capsys.readouterr().err
    assert "pipeline 'logs' changed" in err and "amp-dagster checkpoints reset logs" in err


def test_a_missing_driver_extra_is_named(home, schema, tmp_path):
    spec = write(tmp_path / "p.yaml", "grpc://127.0.0.1:1", schema)
    script = (
        "import sys; sys.modules['psycopg'] = None\n"
        "from amp_dagster.cli import main\n"
        f"sys.exit(main(['sync', {str(spec)!r}]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "pip install 'amp-dagster[postgres]'" in out.stderr


def test_without_dagster_home_the_message_says_where_checkpoints_live(schema, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    spec = write(tmp_path / "p.yaml", "grpc://127.0.0.1:1", schema)
    assert main(["sync", str(spec)]) == 2
    assert "DAGSTER_HOME is not set" in capsys.readouterr().err
