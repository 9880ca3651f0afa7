"""Reproduce amp_dagster_tests/ui/recent_logs.png: the Dagster UI's page of `recent_logs` after two materializations."""

# Run from anywhere: .venv/bin/python amp_dagster_tests/ui/screenshot.py [--out PATH] [--path URL_PATH]
# It starts a local amp (`amp-dagster devserver`), materializes recent_logs twice in a temporary Dagster instance,
# starts `dagster dev` on that instance, dismisses the sign-up dialog (setNuxSeen) and takes a headless Chromium
# screenshot. Everything it starts is stopped and everything it writes is removed, except the picture.

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # /work/main: workspace.yaml, dagster.yaml
BIN = Path(sys.executable).parent  # the environment's console scripts: amp-dagster, dagster
DEFAULT_OUT = Path(__file__).resolve().with_name("recent_logs.png")
DEFAULT_PATH = "/assets/recent_logs"  # the Overview tab; "?view=events" lists each materialization
AMP_CHAIN = ["--blocks", "3000", "--start-block", "15000000", "--block-time", "1"]  # a chain that grows 1 block/s
RUN_CONFIG = {"ops": {"recent_logs": {"config": {"blocks": 1000}}}}
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--hide-scrollbars",
    "--window-size=1400,900",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(message: str, started: float) -> None:
    print(f"[{time.monotonic() - started:5.1f}s] {message}", flush=True)


def wait_for(what: str, check, process: subprocess.Popen, logfile: Path, timeout: float) -> None:
    """Call `check` until it returns true; fail early, with the process's log, if the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what}: exited with {process.returncode}:\n{logfile.read_text()[-4000:]}")
        try:
            if check():
                return
        except (OSError, urllib.error.URLError, ValueError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what}: not ready after {timeout:.0f} s:\n{logfile.read_text()[-4000:]}")


def port_open(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def graphql(base: str, query: str) -> dict:
    request = urllib.request.Request(
        f"{base}/graphql", data=json.dumps({"query": query}).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def asset_loaded(base: str) -> bool:
    urllib.request.urlopen(f"{base}/server_info", timeout=5).close()
    answer = graphql(base, '{ assetNodeOrError(assetKey: {path: ["recent_logs"]}) { __typename } }')
    return answer["data"]["assetNodeOrError"]["__typename"] == "AssetNode"


def start(args: list[str], logfile: Path, **kwargs) -> subprocess.Popen:
    # A session of its own: the whole tree (dagster dev's webserver, daemon, code server) can be killed as a group.
    with logfile.open("w") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)


def stop(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)  # dagster dev stops its children within ~3 s of SIGTERM
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the PNG to write (default {DEFAULT_OUT})")
    parser.add_argument("--path", default=DEFAULT_PATH, help=f"the UI page (default {DEFAULT_PATH})")
    parser.add_argument("--budget", type=int, default=15000, help="Chromium's virtual-time budget in ms")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("chromium not found: apt-get install -y chromium", file=sys.stderr)
        return 2

    # Children must not inherit an ignored SIGINT/SIGTERM (a script started with `&`), or dagster dev ignores them;
    # a SIGTERM to this script runs the clean-up below.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    started, cwd = time.monotonic(), Path.cwd()
    devserver = dagster_dev = None
    with tempfile.TemporaryDirectory(prefix="amp-dagster-ui-") as tmp:
        work = Path(tmp)
        home = work / "dagster_home"
        home.mkdir()
        shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")  # the project's settings; storage under the home
        amp_port, ui_port = free_port(), free_port()
        os.environ.update(
            DAGSTER_HOME=str(home), AMP_URL=f"grpc://127.0.0.1:{amp_port}", AMP_DEMO_DELTA=str(work / "delta")
        )
        try:
            devserver_log = work / "devserver.log"
            devserver = start(
                [str(BIN / "amp-dagster"), "devserver", "--port", str(amp_port), "--admin-port", "-1", *AMP_CHAIN],
                devserver_log,
            )
            wait_for("amp-dagster devserver", lambda: port_open(amp_port), devserver, devserver_log, 60)
            log(f"amp dev server on {os.environ['AMP_URL']}", started)

            os.chdir(work)  # in-process runs: nothing lands in the repository either way
            import dagster as dg

            from amp_dagster.definitions import recent_logs

            instance = dg.DagsterInstance.get()
            for n in (1, 2):
                if n == 2:
                    time.sleep(3)  # the chain grows one block a second: the second run copies a later range
                result = dg.materialize([recent_logs], instance=instance, run_config=RUN_CONFIG)
                metadata = result.asset_materializations_for_node("recent_logs")[0].metadata
                log(f"run {n} materialized blocks {metadata['blocks'].value}, {metadata['rows'].value} rows", started)

            dev_log = work / "dagster_dev.log"
            dagster_dev = start(
                [str(BIN / "dagster"), "dev", "-w", "workspace.yaml", "-p", str(ui_port)], dev_log, cwd=ROOT
            )
            base = f"http://127.0.0.1:{ui_port}"
            wait_for("dagster dev", lambda: asset_loaded(base), dagster_dev, dev_log, 180)
            log(f"dagster dev on {base}", started)
            graphql(base, "mutation { setNuxSeen }")

            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.unlink(missing_ok=True)
            url = base + args.path
            shot_flags = [f"--virtual-time-budget={args.budget}", f"--screenshot={args.out.resolve()}"]
            shot = subprocess.run(
                [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={work / 'chromium'}", *shot_flags, url],
                capture_output=True,
                text=True,
                timeout=180,
            )
            if shot.returncode != 0 or not args.out.exists():
                raise RuntimeError(f"chromium failed ({shot.returncode}):\n{shot.stderr[-4000:]}")
            log(f"{url} -> {args.out} ({args.out.stat().st_size // 1024} KB)", started)
        finally:
            stop(dagster_dev)
            stop(devserver)
            os.chdir(cwd)
    log("stopped dagster dev and the amp dev server", started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
