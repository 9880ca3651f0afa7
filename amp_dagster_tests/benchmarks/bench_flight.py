"""P1: reading a stream through AmpClient.stream() vs a raw pyarrow Flight loop, same server, same run.

The dev server runs in its own process (as amp would), with its chunk cache warmed before timing, so both
cases measure the client side: gRPC, IPC decoding, metadata parsing and, for ours, reorg tracking and events.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.flight as flight

from amp_dagster.flight.client import AmpClient
from amp_dagster.flight.protocol import Checkpoint, Data, encode_statement_query

from ..services import closed_port
from .harness import Case, compare

SQL = "SELECT * FROM eth_rpc.logs"
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
        client = AmpClient(url)
        total = sum(b.num_rows for b in client.query(SQL).reader)  # warms the server's cache, untimed
        counted = {}

        def raw_stream() -> None:
            conn = flight.connect(url)
            options = flight.FlightCallOptions(headers=[(b"amp-stream", b"true")])
            info = conn.get_flight_info(flight.FlightDescriptor.for_command(encode_statement_query(SQL)), options)
            reader = conn.do_get(info.endpoints[0].ticket)
            n = 0
            while True:
                chunk = reader.read_chunk()
                n += chunk.data.num_rows
                meta = json.loads(chunk.app_metadata.to_pybytes())
                if meta["ranges_complete"] and meta["ranges"][0]["numbers"]["end"] >= head:
                    break
            reader.cancel()
            conn.close()
            counted["raw"] = n

        def ours() -> None:
            stream, n = client.stream(SQL + " SETTINGS stream = true"), 0
            for event in stream:
                if isinstance(event, Data):
                    n += event.batch.num_rows
                elif isinstance(event, Checkpoint) and event.position.blocks["mainnet"].number >= head:
                    stream.close()
                    break
            counted["ours"] = n

        def check(name: str):
            def run() -> None:
                assert counted.pop(name) == total, f"{name} read a different number of rows"

            return run

        compare(
            f"P1 streaming read of logs ({total:,} rows, {blocks:,} blocks, microbatches of 1000 blocks)",
            total,
            [
                Case("raw pyarrow Flight loop (reference)", raw_stream, check=check("raw")),
                Case("AmpClient.stream() events", ours, check=check("ours")),
            ],
            rounds,
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
