"""`amp-dagster`: run and steer the dev server, and run queries and streams against amp from a terminal.

amp-dagster devserver [--port P --admin-port A ...]       serve a local amp (Flight on 1602, control on 1610)
amp-dagster devserver [--port P | --admin-port A | --admin URL] status | reorg --depth N [--length M] |
            advance --blocks N | pause | resume | fault KIND [...]       steer the dev server so named
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
import urllib.parse
import urllib.request

ADMIN_ENV, TOKEN_ENV = "AMP_DEVSERVER_ADMIN", "AMP_DEVSERVER_TOKEN"
FLIGHT_PORT = 1602
ADMIN_OFFSET = 8  # the control API's port is the Flight port + 8 unless given: 1610 beside 1602, as amp lays out
DEFAULT_ADMIN = f"http://127.0.0.1:{FLIGHT_PORT + ADMIN_OFFSET}"


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
    dev.add_argument("--port", type=int, help=f"Flight SQL port (default {FLIGHT_PORT}, as amp; 0: a free one)")
    dev.add_argument(
        "--admin-port",
        type=int,
        help=f"control API port (default: the Flight port + {ADMIN_OFFSET}, so 1610; 0: a free one; -1: none)",
    )
    dev.add_argument("--blocks", type=int, default=1000, help="blocks synced at start (default 1000)")
    dev.add_argument("--start-block", type=int, default=0, help="first block of the dataset (default 0)")
    dev.add_argument("--network", default="mainnet")
    dev.add_argument("--seed", type=int, default=0, help="seed of the synthetic chain and of random reorgs")
    dev.add_argument("--block-time", type=float, default=1.0, help="seconds per new block (0: the chain stands)")
    dev.add_argument("--microbatch-blocks", type=int, default=1000, help="blocks per streaming microbatch")
    dev.add_argument("--txs-per-block", type=int, default=20, help="average transactions per block")
    dev.add_argument("--reorg-probability", type=float, default=0.0, help="chance of a reorg after each block")
    dev.add_argument("--max-reorg-depth", type=int, default=6)
    dev.add_argument(
        "--admin",
        help="control API URL to steer (default: from --admin-port, else from --port, else "
        f"${ADMIN_ENV}, else {DEFAULT_ADMIN})",
    )
    actions = dev.add_subparsers(dest="action")
    actions.add_parser("status", help="chain head and forks").set_defaults(run=_admin("GET", "/status"))
    reorg = actions.add_parser("reorg", help="replace the last N blocks with M blocks of a new fork")
    reorg.add_argument("--depth", type=int, required=True, help="blocks replaced (N)")
    reorg.add_argument("--length", type=int, help="new blocks (M, default N): fewer shortens the chain, more grows it")
    reorg.set_defaults(run=_admin("POST", "/reorg", "depth", "length"))
    advance = actions.add_parser("advance", help="add N blocks now")
    advance.add_argument("--blocks", type=int, default=1)
    advance.set_defaults(run=_admin("POST", "/advance", "blocks"))
    actions.add_parser("pause", help="stop new blocks and random reorgs").set_defaults(run=_admin("POST", "/pause"))
    actions.add_parser("resume", help="let the chain grow again").set_defaults(run=_admin("POST", "/resume"))
    fault = actions.add_parser("fault", help="make the next calls fail: drop, slow, unavailable, internal")
    fault.add_argument("kind", choices=["drop", "slow", "unavailable", "internal", "clear"])
    fault.add_argument("--after-batches", type=int, default=0, help="drop: data batches sent before the cut")
    fault.add_argument(
        "--microbatch", type=int, help="drop: cut inside this microbatch (0-based), before its completion marker"
    )
    fault.add_argument("--delay", type=float, default=0.0, help="slow: seconds before each batch")
    fault.add_argument("--times", type=int, default=1, help="how many calls the fault hits")
    fault.set_defaults(run=_fault)

    sync = commands.add_parser("sync", help="sync a pipeline of a YAML file (checkpoints in DAGSTER_HOME)")
    sync.add_argument("file", help="a pipeline file (pipelines: [...]) or a Dagster component defs.yaml")
    every = "every pipeline of the file; streams run side by side"
    sync.add_argument("pipeline", nargs="?", help=f"the pipeline to run (default: {every})")
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
    from .devserver.server import DevServer, PortInUseError
    from .errors import ConfigError

    port = FLIGHT_PORT if args.port is None else args.port
    admin_port = args.admin_port if args.admin_port is not None else port + ADMIN_OFFSET if port else 0
    if admin_port > 65535:
        raise ConfigError(
            f"--port {port} leaves no room for the control API on port + {ADMIN_OFFSET}: give --admin-port"
        )
    try:
        server = DevServer(
            f"grpc://{args.host}:{port}",
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
    except PortInUseError as exc:
        raise ConfigError(
            f"{exc.service} port {exc.port} on {exc.host} is already in use (another amp or dev server?). Choose "
            f"another with --port N (0 picks a free one); the control API follows on N + {ADMIN_OFFSET} unless "
            "--admin-port is given"
        ) from None
    try:
        admin = AdminServer(server, args.host, admin_port) if admin_port >= 0 else None
    except PortInUseError as exc:
        server.shutdown()
        raise ConfigError(
            f"{exc.service} port {exc.port} on {exc.host} is already in use (another amp or dev server?). Choose "
            "another with --admin-port N (0 picks a free one, -1 serves no control API)"
        ) from None
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


def _admin(method: str, path: str, *params: str):
    def run(args) -> int:
        given = {name: getattr(args, name) for name in params if getattr(args, name) is not None}
        query = "?" + urllib.parse.urlencode(given) if given else ""
        print(json.dumps(_call_admin(args, method, path + query)))
        return 0

    return run


def _fault(args) -> int:
    if args.kind == "clear":
        print(json.dumps(_call_admin(args, "DELETE", "/fault")))
        return 0
    names = ("kind", "after_batches", "delay", "times", "microbatch")
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    print(json.dumps(_call_admin(args, "POST", "/fault?" + urllib.parse.urlencode(given))))
    return 0


def admin_url(args) -> tuple[str, str]:
    """The control API that ``amp-dagster devserver ... status|reorg|...`` steers, and where that choice came from.

    ``--admin URL`` first; else ``--admin-port A`` on ``--host``; else ``--port P``, whose server listens for
    control on P + 8 unless it was started with its own ``--admin-port``; else ``$AMP_DEVSERVER_ADMIN``; else
    the default ports' control API, http://127.0.0.1:1610.
    """
    from .errors import ConfigError

    host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    host = f"[{host}]" if ":" in host else host
    if args.admin:
        return args.admin, "--admin"
    if args.admin_port is not None:
        if args.admin_port <= 0:
            raise ConfigError(
                f"--admin-port {args.admin_port} names no control API to steer: give the port the dev server's "
                "banner prints for its control API, or --admin URL"
            )
        return f"http://{host}:{args.admin_port}", f"--admin-port {args.admin_port}"
    if args.port is not None:
        if args.port <= 0:
            raise ConfigError(
                f"--port {args.port} names no dev server to steer: give the Flight port its banner prints, "
                "or --admin URL"
            )
        admin_port = args.port + ADMIN_OFFSET
        return f"http://{host}:{admin_port}", f"--port {args.port}, whose control API is on {admin_port}"
    if os.environ.get(ADMIN_ENV):
        return os.environ[ADMIN_ENV], f"${ADMIN_ENV}"
    return DEFAULT_ADMIN, "the default"


def _call_admin(args, method: str, path: str) -> dict:
    from .errors import QueryError, ServiceUnavailableError

    base, how = admin_url(args)
    request = urllib.request.Request(base.rstrip("/") + path, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise QueryError(f"the dev server at {base} refused {method} {path}: {exc.read().decode()}") from None
    except OSError as exc:
        reason = getattr(exc, "reason", exc)
        raise ServiceUnavailableError(
            f"no dev server control API answers at {base} (from {how}): {reason}. Name the server to steer with "
            f"--admin URL, --admin-port PORT, or --port FLIGHT_PORT (its control API is on FLIGHT_PORT + "
            f"{ADMIN_OFFSET} unless it was started with --admin-port); or start one with `amp-dagster devserver`."
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
    from .pipelines import load_pipelines

    spec = load_pipelines(args.file)
    chosen = [spec.get(args.pipeline)] if args.pipeline else spec.pipelines
    store = _store(args)
    stop = threading.Event()

    def request_stop(signum, _frame) -> None:
        if stop.is_set():  # a second Ctrl-C: stop now, without the final flush
            raise KeyboardInterrupt
        print("stopping after the current flush...", file=sys.stderr, flush=True)
        stop.set()

    def run(pipeline):
        result = pipeline.run(store, mode=args.mode, until_block=args.until_block, seconds=args.seconds,
                              lock_wait=args.wait, progress=lambda p: display.update(pipeline.name, p),
                              stop=stop)  # fmt: skip
        display.done(pipeline.name, result)
        return result.to_json()

    # streams never end, so several run side by side; batch loads run one after another
    together = len(chosen) > 1 and any((args.mode or p.mode) == "stream" for p in chosen)
    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with SyncDisplay([p.name for p in chosen], live=not args.json and sys.stderr.isatty()) as display:
            results = _side_by_side(run, chosen, stop) if together else [run(p) for p in chosen]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
    return 0


def _side_by_side(run, pipelines, stop: threading.Event) -> list:
    """Run each pipeline in its own thread; the first failure stops the others and is raised."""
    results, errors = {}, []

    def one(pipeline) -> None:
        try:
            results[pipeline.name] = run(pipeline)
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=one, args=(p,), name=f"sync-{p.name}") for p in pipelines]
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):  # joined in slices, so that signals reach the main thread
        for thread in threads:
            thread.join(0.2)
    if errors:
        raise errors[0]
    return [results[p.name] for p in pipelines]


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
    from .state import load_state, range_records

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
