"""P1: reading a stream through AmpClient.stream() vs a raw pyarrow Flight loop, same server, same run.

The dev server runs in its own process (as amp would), with its chunk cache warmed before timing, so both
cases measure the client side: gRPC, IPC decoding, metadata parsing and, for ours, reorg tracking and events.
Both cases do the same work in the timed span: open a new connection, send the same request (the SQL with
``SETTINGS stream = true`` and the ``amp-stream: true`` header, which is what AmpClient.stream sends), read until
the checkpoint at the chain head, cancel the stream and close the connection.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.compute as pc
import pyarrow.flight as flight

from amp_dagster.flight.client import AmpClient
from amp_dagster.flight.protocol import Checkpoint, Data, encode_statement_query

from ..services import closed_port
from .harness import GOALS, Case, compare

SQL = "SELECT * FROM eth_rpc.logs SETTINGS stream = true"
LOGS_PER_BLOCK = 26  # the synthetic chain's average, rounded down so that the blocks hold at least `rows` rows


def main(rows: int, rounds: int) -> None:
    port = closed_port()
    blocks = rows // LOGS_PER_BLOCK + 1
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "amp_dagster.cli", "devserver", "--port", str(port), "--admin-port", "-1"),
            *("--blocks", str(blocks), "--block-time", "0", "--start-block", "15000000", "--seed", "42"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        server.stdout.readline()
        url = f"grpc://127.0.0.1:{port}"
        head = 15_000_000 + blocks - 1
        with AmpClient(url) as warm:  # fills the server's chunk cache, untimed
            everything = warm.query("SELECT * FROM eth_rpc.logs").reader.read_all()
        total, want = everything.num_rows, (everything.num_rows, _sum(everything["log_index"]))
        del everything
        counted = {}

        def raw_stream() -> None:
            conn = flight.connect(url)
            options = flight.FlightCallOptions(headers=[(b"amp-stream", b"true")])
            info = conn.get_flight_info(flight.FlightDescriptor.for_command(encode_statement_query(SQL)), options)
            reader = conn.do_get(info.endpoints[0].ticket)
            n = total_index = 0
            while True:
                chunk = reader.read_chunk()
                n += chunk.data.num_rows
                total_index += _sum(chunk.data["log_index"])
                meta = json.loads(chunk.app_metadata.to_pybytes())
                if meta["ranges_complete"] and meta["ranges"][0]["numbers"]["end"] >= head:
                    break
            reader.cancel()
            conn.close()
            counted["raw"] = (n, total_index)

        def ours() -> None:
            with AmpClient(url) as client:
                stream, n, total_index = client.stream(SQL), 0, 0
                for event in stream:
                    if isinstance(event, Data):
                        n += event.batch.num_rows
                        total_index += _sum(event.batch["log_index"])
                    elif isinstance(event, Checkpoint) and event.position.blocks["mainnet"].number >= head:
                        stream.close()
                        break
            counted["ours"] = (n, total_index)

        def check(name: str):
            def run() -> None:
                got = counted.pop(name)
                assert got == want, f"{name} read {got} (rows, sum of log_index), not {want}"

            return run

        reference, mine = "raw pyarrow Flight loop (reference)", "AmpClient.stream() events"
        result = compare(
            f"P1 streaming read of logs ({total:,} rows, {blocks:,} blocks, microbatches of 1000 blocks)",
            total,
            [
                Case(reference, raw_stream, check=check("raw")),
                Case(mine, ours, check=check("ours")),
            ],
            rounds,
        )
        result.goal(GOALS["P1"], mine, reference)
    finally:
        server.terminate()
        server.wait(timeout=30)


def _sum(column) -> int:
    return pc.sum(column).as_py() or 0
