"""The `amp-dagster` command: the dev server as a process steered over its control API, queries and streams."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys

import pyarrow as pa
import pytest

from amp_dagster.cli import ADMIN_OFFSET, main
from amp_dagster.flight.client import AmpClient
from amp_dagster.flight.protocol import Checkpoint, Data, Rewind, Rollback
from amp_dagster.retry import RetryPolicy

from .services import closed_port

DEVSERVER = [sys.executable, "-m", "amp_dagster.cli", "devserver"]


def spawn(*options: str) -> tuple[subprocess.Popen, str]:
    """A dev server process, by default with 50 standing blocks; returns it and its banner line."""
    process = subprocess.Popen(
        [*DEVSERVER, "--blocks", "50", "--block-time", "0", "--microbatch-blocks", "10", *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return process, process.stdout.readline()


def port_pair() -> int:
    """A free port P whose control API port P + 8 is free too."""
    while True:
        port = closed_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + ADMIN_OFFSET))
            except OSError:
                continue
        return port


@pytest.fixture
def devserver_process():
    port, admin = closed_port(), closed_port()
    process, banner = spawn("--port", str(port), "--admin-port", str(admin))
    assert f"amp dev server on grpc://127.0.0.1:{port}" in banner, banner
    yield f"grpc://127.0.0.1:{port}", f"http://127.0.0.1:{admin}"
    if process.poll() is None:
        process.kill()


def test_devserver_process_is_steered_and_stops_on_sigterm(devserver_process, capsys):
    url, admin = devserver_process
    assert main(["devserver", "--admin", admin, "status"]) == 0
    assert json.loads(capsys.readouterr().out)["head"] == 49
    assert main(["devserver", "--admin", admin, "reorg", "--depth", "3"]) == 0
    assert json.loads(capsys.readouterr().out) == {"first_block": 47, "head": 49}
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
    nowhere = closed_port()
    assert main(["devserver", "--admin", f"http://127.0.0.1:{nowhere}", "status"]) == 3
    err = capsys.readouterr().err
    assert f"no dev server control API answers at http://127.0.0.1:{nowhere} (from --admin)" in err
    assert "start one with `amp-dagster devserver`" in err


def test_steering_reaches_the_server_named_by_port_or_admin_port(capsys):
    first, second, second_admin = port_pair(), closed_port(), closed_port()
    one, banner = spawn("--port", str(first))  # control API on first + 8
    assert f"control API on http://127.0.0.1:{first + ADMIN_OFFSET}" in banner, banner
    two, banner = spawn("--port", str(second), "--admin-port", str(second_admin))
    assert f"control API on http://127.0.0.1:{second_admin}" in banner, banner
    try:
        assert main(["devserver", "--port", str(first), "advance", "--blocks", "3"]) == 0
        assert json.loads(capsys.readouterr().out) == {"head": 52}
        assert main(["devserver", "--admin-port", str(second_admin), "reorg", "--depth", "5", "--length", "2"]) == 0
        assert json.loads(capsys.readouterr().out) == {"first_block": 45, "head": 46}
        assert main(["devserver", "--port", str(first), "status"]) == 0
        assert json.loads(capsys.readouterr().out)["head"] == 52  # the other server's reorg did not land here
        assert main(["devserver", "--admin-port", str(second_admin), "pause"]) == 0
        assert json.loads(capsys.readouterr().out) == {"paused": True, "head": 46}
        assert main(["devserver", "--admin", f"http://127.0.0.1:{second_admin}", "status"]) == 0
        status = json.loads(capsys.readouterr().out)
        assert (status["head"], status["forks"], status["paused"]) == (46, 1, True)
        assert status["url"] == f"grpc://127.0.0.1:{second}"
        fault = ["fault", "drop", "--microbatch", "1", "--after-batches", "2"]
        assert main(["devserver", "--port", str(first), *fault]) == 0
        armed = json.loads(capsys.readouterr().out)["armed"]
        assert (armed["kind"], armed["microbatch"], armed["after_batches"]) == ("drop", 1, 2)
        # a server started with its own --admin-port is not found from --port: the error says where it looked
        assert main(["devserver", "--port", str(second), "status"]) == 3
        err = capsys.readouterr().err
        assert f"no dev server control API answers at http://127.0.0.1:{second + ADMIN_OFFSET}" in err
        assert f"from --port {second}" in err and "--admin URL, --admin-port PORT" in err
    finally:
        one.kill()
        two.kill()


def test_a_busy_port_is_named_with_the_option_that_moves_it(devserver):
    taken = devserver(blocks=5)
    result = subprocess.run(
        [*DEVSERVER, "--port", str(taken.port), "--admin-port", "-1"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    assert f"error: Flight port {taken.port} on 127.0.0.1 is already in use" in result.stderr
    assert "--port N (0 picks a free one)" in result.stderr and "Traceback" not in result.stderr
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        result = subprocess.run(
            [*DEVSERVER, "--port", "0", "--admin-port", str(busy)], capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 2, result.stderr
    assert f"error: control API port {busy} on 127.0.0.1 is already in use" in result.stderr
    assert "--admin-port N" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_killed_dev_server_restarted_on_its_port_with_its_seed_continues_the_stream():
    port, admin = closed_port(), closed_port()
    first, _ = spawn("--port", str(port), "--admin-port", str(admin), "--seed", "11")
    second = None
    # the slow fault holds each batch 0.2 s: the kill lands between a microbatch's data and its marker
    assert main(["devserver", "--admin-port", str(admin), "fault", "slow", "--delay", "0.2"]) == 0
    url = f"grpc://127.0.0.1:{port}"
    retry = RetryPolicy(attempts=60, initial_delay=0.05, max_delay=0.2)
    stream = AmpClient(url, stream_retry=retry).stream("SELECT _block_num, log_index FROM eth_rpc.logs "
                                                        "SETTINGS stream = true")  # fmt: skip
    kept: list[pa.RecordBatch] = []  # what a destination holds: rows since the last checkpoint are voided on rewind
    pending: list[pa.RecordBatch] = []
    events = []
    try:
        for event in stream:
            events.append(event)
            if isinstance(event, Data):
                pending.append(event.batch)
                if event.ranges[0].start == 10 and second is None:
                    first.kill()  # SIGKILL
                    first.wait()
                    second, banner = spawn("--port", str(port), "--admin-port", "-1", "--seed", "11", "--blocks", "60")
                    assert f"amp dev server on {url}" in banner, banner
            elif isinstance(event, Rewind):
                pending = []
            elif isinstance(event, Checkpoint):
                kept, pending = kept + pending, []
                if event.position.blocks["mainnet"].number == 59:
                    stream.close()
        (rewind,) = [e for e in events if isinstance(e, Rollback)]  # a rewind, and no reorg: the same chain
        assert isinstance(rewind, Rewind) and rewind.first_block == 10
        spans = [(e.ranges[0].start, e.ranges[0].end) for e in events if isinstance(e, Checkpoint)]
        assert spans == [(0, 9), (10, 19), (20, 29), (30, 39), (40, 49), (50, 59)]
        want = AmpClient(url).query("SELECT _block_num, log_index FROM eth_rpc.logs").reader.read_all()
        order = [("_block_num", "ascending"), ("log_index", "ascending")]
        assert pa.Table.from_batches(kept).sort_by(order).equals(want.sort_by(order))
    finally:
        first.kill()
        if second is not None:
            second.kill()
