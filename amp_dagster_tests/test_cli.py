"""The `amp-dagster` command: the dev server as a process steered over its control API, queries and streams."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from amp_dagster.cli import main

from .services import closed_port


@pytest.fixture
def devserver_process():
    port, admin = closed_port(), closed_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "amp_dagster.cli",
            "devserver",
            "--port",
            str(port),
            "--admin-port",
            str(admin),
            "--blocks",
            "50",
            "--block-time",
            "0",
            "--microbatch-blocks",
            "10",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    banner = process.stdout.readline()
    assert f"amp dev server on grpc://127.0.0.1:{port}" in banner, banner
    yield f"grpc://127.0.0.1:{port}", f"http://127.0.0.1:{admin}"
    if process.poll() is None:
        process.kill()


def test_devserver_process_is_steered_and_stops_on_sigterm(devserver_process, capsys):
    url, admin = devserver_process
    assert main(["devserver", "--admin", admin, "status"]) == 0
    assert json.loads(capsys.readouterr().out)["head"] == 49
    assert main(["devserver", "--admin", admin, "reorg", "--depth", "3"]) == 0
    assert json.loads(capsys.readouterr().out) == {"first_block": 47}
    assert main(["devserver", "--admin", admin, "advance", "--blocks", "5"]) == 0
    assert json.loads(capsys.readouterr().out) == {"head": 54}
    assert main(["devserver", "--admin", admin, "fault", "unavailable", "--times", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["armed"]["kind"] == "unavailable"
    # the fault makes the first GetFlightInfo fail; the client retries and succeeds
    assert main(["query", "SELECT count(*) AS n FROM eth_rpc.blocks", "--url", url]) == 0
    out = capsys.readouterr().out
    assert "55" in out and "synced: mainnet 0..=54" in out
    assert main(["devserver", "--admin", admin, "reorg", "--depth", "999"]) == 2
    assert "reorg depth must be between 1 and 55" in capsys.readouterr().err


def test_devserver_process_exits_cleanly_on_sigterm():
    port = closed_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "amp_dagster.cli", "devserver", "--port", str(port), "--admin-port", "-1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    process.stdout.readline()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0


def test_stream_prints_events_and_the_resume_watermark(devserver, capsys):
    server = devserver(blocks=30, microbatch_blocks=10)
    sql = "SELECT _block_num, log_index FROM eth_rpc.logs SETTINGS stream = true"
    assert main(["stream", sql, "--url", server.url, "--until-block", "19"]) == 0
    out = capsys.readouterr().out
    assert out.count("checkpoint") == 2 and "mainnet 10..=19" in out
    resume = out.strip().splitlines()[-1].split("--resume ", 1)[1].strip("'")
    server.reorg(15)  # blocks 15..29 replaced: the stored watermark at 19 is stale
    assert main(["stream", sql, "--url", server.url, "--resume", resume, "--until-block", "29"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("REORG       mainnet: the chain forked at block 15")


def test_query_prints_batches_a_preview_and_ranges(devserver, capsys):
    server = devserver(blocks=20, start_block=100)
    assert main(["query", "SELECT block_num, hash FROM eth_rpc.blocks ORDER BY block_num", "--url", server.url]) == 0
    out = capsys.readouterr().out
    assert "batch 1: 20 rows" in out and "0x" in out and "20 rows; synced: mainnet 100..=119" in out


def test_errors_exit_non_zero_with_the_message(devserver, capsys, monkeypatch):
    server = devserver(blocks=5)
    assert main(["query", "SELECT * FROM eth_rpc.nope", "--url", server.url]) == 2
    assert "'eth_rpc.nope' not found" in capsys.readouterr().err
    monkeypatch.setenv("AMP_URL", f"grpc://127.0.0.1:{closed_port()}")
    assert main(["query", "SELECT 1"]) == 3  # transient: the server is down, after bounded retries
    assert "unavailable" in capsys.readouterr().err
    assert main(["devserver", "--admin", f"http://127.0.0.1:{closed_port()}", "status"]) == 3
    assert "Start one with `amp-dagster devserver`" in capsys.readouterr().err
