"""`amp-dagster`: run and steer the dev server, and run queries and streams against amp from a terminal.

amp-dagster devserver [--blocks N --block-time S ...]     serve a local amp (Flight on 1602, control on 1610)
amp-dagster devserver status | reorg --depth N | advance --blocks N | fault KIND [...]
amp-dagster query SQL [--show N]                          batches, a preview, and the synced ranges
amp-dagster stream SQL [--resume WATERMARK] [--until-block N | --seconds S]
amp-dagster sync FILE [PIPELINE] [--until-block N | --seconds S] [--json]   run a pipeline, no daemon needed
amp-dagster pipelines FILE                                 the pipelines a file defines
amp-dagster checkpoints list | show NAME | reset NAME      checkpoints in Dagster's run storage (DAGSTER_HOME)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import urllib.error
import urllib.request

ADMIN_ENV, TOKEN_ENV = "AMP_DEVSERVER_ADMIN", "AMP_DEVSERVER_TOKEN"
DEFAULT_ADMIN = "http://127.0.0.1:1610"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.command == "devserver" else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")  # fmt: skip
    from .errors import AmpDagsterError

    try:
        return args.run(args)
    except AmpDagsterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3 if exc.transient else 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    from .flight.client import DEFAULT_URL

    parser = argparse.ArgumentParser(prog="amp-dagster", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    dev = commands.add_parser("devserver", help="serve a local amp-compatible Flight SQL server, or steer one")
    dev.set_defaults(run=_serve)
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=1602, help="Flight SQL port (default 1602, as amp)")
    dev.add_argument("--admin-port", type=int, default=1610, help="control API port (default 1610; -1: none)")
    dev.add_argument("--blocks", type=int, default=1000, help="blocks synced at start (default 1000)")
    dev.add_argument("--start-block", type=int, default=0, help="first block of the dataset (default 0)")
    dev.add_argument("--network", default="mainnet")
    dev.add_argument("--seed", type=int, default=0, help="seed of the synthetic chain and of random reorgs")
    dev.add_argument("--block-time", type=float, default=1.0, help="seconds per new block (0: the chain stands)")
    dev.add_argument("--microbatch-blocks", type=int, default=1000, help="blocks per streaming microbatch")
    dev.add_argument("--txs-per-block", type=int, default=20, help="average transactions per block")
    dev.add_argument("--reorg-probability", type=float, default=0.0, help="chance of a reorg after each block")
    dev.add_argument("--max-reorg-depth", type=int, default=6)
    dev.add_argument("--admin", default=os.environ.get(ADMIN_ENV, DEFAULT_ADMIN), help="control API to steer")
    actions = dev.add_subparsers(dest="action")
    actions.add_parser("status", help="chain head and forks").set_defaults(run=_admin("GET", "/status"))
    reorg = actions.add_parser("reorg", help="replace the last N blocks with a new fork")
    reorg.add_argument("--depth", type=int, required=True)
    reorg.set_defaults(run=_admin("POST", "/reorg", "depth"))
    advance = actions.add_parser("advance", help="add N blocks now")
    advance.add_argument("--blocks", type=int, default=1)
    advance.set_defaults(run=_admin("POST", "/advance", "blocks"))
    fault = actions.add_parser("fault", help="make the next calls fail: drop, slow, unavailable, internal")
    fault.add_argument("kind", choices=["drop", "slow", "unavailable", "internal", "clear"])
    fault.add_argument("--after-batches", type=int, default=0, help="drop: data batches sent before the cut")
    fault.add_argument("--delay", type=float, default=0.0, help="slow: seconds before each batch")
    fault.add_argument("--times", type=int, default=1, help="how many calls the fault hits")
    fault.set_defaults(run=_fault)

    sync = commands.add_parser("sync", help="sync a pipeline of a YAML file (checkpoints in DAGSTER_HOME)")
    sync.add_argument("file", help="a pipeline file (pipelines: [...]) or a Dagster component defs.yaml")
    sync.add_argument("pipeline", nargs="?", help="the pipeline to run (default: every pipeline of the file)")
    limit = sync.add_mutually_exclusive_group()
    limit.add_argument("--until-block", type=int, help="stop at the checkpoint that reaches this block")
    limit.add_argument("--seconds", type=float, help="stop cleanly after this many seconds")
    sync.add_argument("--mode", choices=["full_refresh", "incremental", "stream"], help="override the mode")
    sync.add_argument("--json", action="store_true", help="print the result as JSON (for scripts)")
    sync.add_argument("--wait", type=float, default=30.0,
                      help="seconds to wait for another sync of the same pipeline to finish (default 30)")  # fmt: skip
    sync.add_argument("--dagster-home", help="the Dagster instance directory (default: $DAGSTER_HOME)")
    sync.set_defaults(run=_sync)
    listing = commands.add_parser("pipelines", help="list the pipelines of a YAML file")
    listing.add_argument("file")
    listing.set_defaults(run=_pipelines)
    checkpoints = commands.add_parser("checkpoints", help="read or reset checkpoints in Dagster's run storage")
    checkpoints.add_argument("--dagster-home", help="the Dagster instance directory (default: $DAGSTER_HOME)")
    verbs = checkpoints.add_subparsers(dest="verb", required=True)
    verbs.add_parser("list", help="every pipeline's checkpoint").set_defaults(run=_checkpoints_list)
    for verb, help_ in (("show", "one pipeline's checkpoint, as JSON"), ("reset", "forget one pipeline's checkpoint")):
        sub = verbs.add_parser(verb, help=help_)
        sub.add_argument("name", help="the pipeline's checkpoint id (its name unless it sets id:)")
        sub.set_defaults(run=_checkpoints_show if verb == "show" else _checkpoints_reset)

    for name, help_ in (("query", "run a batch query"), ("stream", "run a streaming query")):
        sub = commands.add_parser(name, help=help_)
        sub.add_argument("sql")
        sub.add_argument("--url", default=os.environ.get("AMP_URL", DEFAULT_URL), help="amp's Flight address")
        sub.set_defaults(run=_query if name == "query" else _stream)
        if name == "query":
            sub.add_argument("--show", type=int, default=10, help="rows to preview (default 10)")
        else:
            sub.add_argument("--resume", help="a watermark printed at a checkpoint, to continue after it")
            sub.add_argument("--until-block", type=int, help="stop at the checkpoint that reaches this block")
            sub.add_argument("--seconds", type=float, help="stop after this many seconds")
    return parser


# -- devserver ---------------------------------------------------------------------------------------------


def _serve(args) -> int:
    from .devserver.admin import AdminServer
    from .devserver.server import DevServer

    server = DevServer(
        f"grpc://{args.host}:{args.port}",
        seed=args.seed,
        network=args.network,
        start_block=args.start_block,
        blocks=args.blocks,
        txs_per_block=args.txs_per_block,
        block_time=args.block_time,
        reorg_probability=args.reorg_probability,
        max_reorg_depth=args.max_reorg_depth,
        microbatch_blocks=args.microbatch_blocks,
        token=os.environ.get(TOKEN_ENV) or None,
    )
    admin = AdminServer(server, args.host, args.admin_port) if args.admin_port >= 0 else None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before the banner: whoever reads it may stop us at once
        signal.signal(sig, lambda *_: stop.set())
    status = server.status()
    print(f"amp dev server on {server.url}" + (f", control API on {admin.url}" if admin else ""), flush=True)
    print(
        f"network {status['network']}, blocks {status['start_block']}..={status['head']}, a new block every "
        f'{args.block_time}s; dataset eth_rpc ("_/eth_rpc@0.0.0"): blocks, transactions, logs',
        flush=True,
    )
    stop.wait()
    if admin:
        admin.shutdown()
    server.shutdown()
    return 0


def _admin(method: str, path: str, param: str | None = None):
    def run(args) -> int:
        query = f"?{param}={getattr(args, param)}" if param else ""
        print(json.dumps(_call_admin(args.admin, method, path + query)))
        return 0

    return run


def _fault(args) -> int:
    if args.kind == "clear":
        print(json.dumps(_call_admin(args.admin, "DELETE", "/fault")))
        return 0
    query = f"?kind={args.kind}&after_batches={args.after_batches}&delay={args.delay}&times={args.times}"
    print(json.dumps(_call_admin(args.admin, "POST", "/fault" + query)))
    return 0


def _call_admin(base: str, method: str, path: str) -> dict:
    from .errors import QueryError, ServiceUnavailableError

    request = urllib.request.Request(base.rstrip("/") + path, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise QueryError(f"the dev server refused {method} {path}: {exc.read().decode()}") from None
    except OSError as exc:
        raise ServiceUnavailableError(
            f"no dev server control API at {base} ({exc}). Start one with `amp-dagster devserver`, or pass --admin."
        ) from None


# -- query and stream --------------------------------------------------------------------------------------


def _query(args) -> int:
    import pyarrow as pa

    from .flight.client import AmpClient

    result = AmpClient(args.url).query(args.sql)
    total, preview = 0, []
    for number, batch in enumerate(result.reader, 1):
        total += batch.num_rows
        print(f"batch {number}: {batch.num_rows} rows")
        if sum(b.num_rows for b in preview) < args.show:
            preview.append(batch.slice(0, args.show))
    if preview:
        print(render(pa.Table.from_batches(preview).slice(0, args.show)))
    print(f"{total} rows; synced: {', '.join(describe_range(r) for r in result.ranges) or 'no ranges reported'}")
    return 0


def _stream(args) -> int:
    from .flight.client import AmpClient
    from .flight.protocol import Checkpoint

    stream = AmpClient(args.url).stream(args.sql, resume=args.resume)
    signal.signal(signal.SIGINT, lambda *_: stream.close())
    if args.seconds:
        threading.Timer(args.seconds, stream.close).start()
    for event in stream:
        print(describe(event), flush=True)
        reached = isinstance(event, Checkpoint) and args.until_block is not None
        if reached and min(b.number for b in event.position.blocks.values()) >= args.until_block:
            stream.close()
    if stream.watermark:
        print(f"resume with: --resume '{stream.watermark.to_json()}'")
    return 0


# -- sync, pipelines, checkpoints ------------------------------------------------------------------------------


def _store(args):
    from .checkpoints import DagsterCheckpoints

    if getattr(args, "dagster_home", None):
        os.environ["DAGSTER_HOME"] = os.path.abspath(args.dagster_home)
    return DagsterCheckpoints.from_environment()


def _sync(args) -> int:
    from .console import SyncDisplay
    from .errors import ConfigError
    from .pipelines import load_pipelines

    spec = load_pipelines(args.file)
    chosen = [spec.get(args.pipeline)] if args.pipeline else spec.pipelines
    mode_of = lambda p: args.mode or p.mode  # noqa: E731
    if len(chosen) > 1 and any(mode_of(p) == "stream" for p in chosen):
        raise ConfigError("a stream runs until stopped: name the one pipeline to run (amp-dagster sync FILE NAME)")
    store = _store(args)
    stop = threading.Event()

    def request_stop(signum, _frame) -> None:
        if stop.is_set():  # a second Ctrl-C: stop now, without the final flush
            raise KeyboardInterrupt
        print("stopping after the current flush...", file=sys.stderr, flush=True)
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    results = []
    try:
        for pipeline in chosen:
            if stop.is_set():
                break
            with SyncDisplay(pipeline.name, live=not args.json and sys.stderr.isatty()) as display:
                result = pipeline.run(store, mode=args.mode, until_block=args.until_block, seconds=args.seconds,
                                      lock_wait=args.wait, progress=display.update, stop=stop)  # fmt: skip
                display.done(result)
            results.append(result.to_json())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
    return 0


def _pipelines(args) -> int:
    from .pipelines import load_pipelines

    for p in load_pipelines(args.file).pipelines:
        source = getattr(p.source, "sql", None) or getattr(p.source, "factory", "")
        where = f"{p.destination.kind} {p.namespace + '.' if p.namespace else ''}{p.table}"
        print(f"{p.name:<24} {p.mode:<13} {where:<32} {' '.join(source.split())[:80]}")
    return 0


def _checkpoints_list(args) -> int:
    states = _store(args).pipelines()
    if not states:
        print("no checkpoints yet")
    for state in states.values():
        print(state.describe())
    return 0


def _checkpoints_show(args) -> int:
    from .errors import ConfigError
    from .sync import load_state, range_records

    store = _store(args)
    state = load_state(store, args.name)
    records = range_records(store, args.name)
    if state is None and not records:
        known = ", ".join(store.pipelines()) or "none"
        raise ConfigError(f"no checkpoint for pipeline {args.name!r} in {os.environ['DAGSTER_HOME']} (known: {known})")
    shown = json.loads(state.to_json()) if state else None
    ranges = [[r.start, r.end] for record in records for r in record.ranges]
    print(json.dumps({"checkpoint": shown, "explicit_ranges": ranges}, indent=2))
    return 0


def _checkpoints_reset(args) -> int:
    removed = _store(args).reset(args.name)
    print(f"reset {args.name}: {removed} key(s) removed; the next sync starts from the beginning")
    return 0


def describe_range(r) -> str:
    return f"{r.network} {r.start}..={r.end} (hash {r.hash[:10]}…)"


def describe(event) -> str:
    """One line per stream event, for people."""
    from .flight.protocol import Checkpoint, Data, Reorg, Rewind

    if isinstance(event, Data):
        where = ", ".join(describe_range(r) for r in event.ranges)
        return f"data        {event.batch.num_rows:>7} rows   {where}"
    if isinstance(event, Checkpoint):
        return f"checkpoint  {event.position.to_json() if event.position else '(end of a batch query)'}"
    if isinstance(event, Reorg):
        return (f"REORG       {event.network}: the chain forked at block {event.first_block}; rows from it on are "
                f"void and the new chain follows (..={event.last_block})")  # fmt: skip
    if isinstance(event, Rewind):
        return f"rewind      {event.network} from block {event.first_block}: {event.reason}; the microbatch is resent"
    return repr(event)


def render(table) -> str:
    """A table preview with bytes shown as 0x-hex."""
    import polars as pl

    from .loaders.encoding import hex_strings, is_binary_like

    columns = {
        f.name: hex_strings(table.column(f.name)) if is_binary_like(f.type) else table.column(f.name)
        for f in table.schema
    }
    import pyarrow as pa

    with pl.Config(tbl_cols=-1, fmt_str_lengths=18, tbl_width_chars=160, tbl_hide_dataframe_shape=True):
        return str(pl.from_arrow(pa.table(columns)))


if __name__ == "__main__":
    sys.exit(main())
