"""`make demo`: a local amp, a batch query, and a stream that lives through a chain reorganisation.

Runs on embedded defaults: no service, no network. It grows as the Dagster layer lands.
"""

from __future__ import annotations

import sys

from .cli import describe, describe_range, render
from .devserver.server import DevServer
from .flight.client import AmpClient
from .flight.protocol import Checkpoint, Data, Reorg

TRANSFER = "ddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"
TOP_TOKENS = f"""
SELECT address AS token, count(*) AS transfers, count(DISTINCT tx_hash) AS transactions
FROM "_/eth_rpc@0.0.0".logs
WHERE topic0 = X'{TRANSFER}'
GROUP BY address ORDER BY transfers DESC LIMIT 5
"""
STREAM = "SELECT _block_num, tx_hash, log_index, address FROM eth_rpc.logs SETTINGS stream = true"


def main() -> int:
    server = DevServer(start_block=15_000_000, blocks=2_000, microbatch_blocks=500, seed=1)
    try:
        client = AmpClient(server.url)
        print(f"1. a local amp dev server: {server.url}, blocks 15000000..={server.chain.head}\n")

        print("2. batch query: the five busiest ERC-20 tokens")
        result = client.query(TOP_TOKENS)
        print(render(result.reader.read_all()))  # five rows: small enough to read whole
        print(f"   synced range: {', '.join(describe_range(r) for r in result.ranges)}\n")

        print("3. stream: logs, microbatch by microbatch; at the head, a reorg replaces the last 5 blocks")
        stream, head, rows, reorgs, reorged = client.stream(STREAM), server.chain.head, 0, 0, False
        for event in stream:
            rows += event.batch.num_rows if isinstance(event, Data) else 0
            reorgs += isinstance(event, Reorg)
            print("   " + describe(event))
            if isinstance(event, Checkpoint) and event.position.blocks["mainnet"].number >= head:
                if reorged:
                    stream.close()
                    break
                first = server.reorg(depth=5)
                head = server.advance(3)
                reorged = True
                print(f"   -- the chain forks: blocks from {first} replaced, new head {head}")
        print(f"\n{rows} rows streamed, {reorgs} reorg handled; resume from {stream.watermark.to_json()}")
        return 0
    finally:
        server.shutdown()


if __name__ == "__main__":
    sys.exit(main())
