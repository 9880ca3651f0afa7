"""The dev server's control API over HTTP (in the place of amp's admin port): status, new blocks, reorgs, faults.

GET    /healthz                         200 "ok"
GET    /status                          {"network", "start_block", "head", "head_hash", "forks", "paused", "url"}
POST   /advance?blocks=N                {"head": H}
POST   /reorg?depth=N[&length=M]        {"first_block": B, "head": H}   (M new blocks replace the last N; M=N default)
POST   /pause                           {"paused": true, "head": H}     (no new blocks, no random reorgs)
POST   /resume                          {"paused": false, "head": H}
POST   /fault?kind=drop&after_batches=3[&microbatch=M]  {"armed": {...}}  (kinds: drop, slow, unavailable, internal)
DELETE /fault                           {"cleared": true}
"""

from __future__ import annotations

import errno
import json
import threading
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from .server import DevServer, Fault, PortInUseError


class AdminServer:
    """Serves the control API for one dev server on ``host:port`` (port 0 picks a free one) in a thread."""

    def __init__(self, dev: DevServer, host: str = "127.0.0.1", port: int = 1610) -> None:
        self.dev = dev
        try:
            self._http = ThreadingHTTPServer((host, port), _handler(dev))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUseError("control API", host, port) from None
            raise
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._http.server_address[:2]
        return f"http://{host}:{port}"

    def shutdown(self) -> None:
        self._http.shutdown()
        self._http.server_close()


def _handler(dev: DevServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args) -> None:  # quiet: the CLI prints what matters
            return

        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            if path == "/healthz":
                self._send(200, "ok")
            elif path == "/status":
                self._send(200, dev.status())
            else:
                self._send(404, {"error": f"no such endpoint: GET {path}"})

        def do_POST(self) -> None:
            url = urlsplit(self.path)
            params = {k: v[-1] for k, v in parse_qs(url.query).items()}
            try:
                if url.path == "/advance":
                    self._send(200, {"head": dev.advance(int(params.get("blocks", 1)))})
                elif url.path == "/reorg":
                    length = int(params["length"]) if "length" in params else None
                    first = dev.reorg(int(params["depth"]), length)
                    self._send(200, {"first_block": first, "head": dev.chain.head})
                elif url.path == "/pause":
                    dev.pause()
                    self._send(200, {"paused": True, "head": dev.chain.head})
                elif url.path == "/resume":
                    dev.resume()
                    self._send(200, {"paused": False, "head": dev.chain.head})
                elif url.path == "/fault":
                    fault = Fault(
                        kind=params["kind"],
                        after_batches=int(params.get("after_batches", 0)),
                        delay=float(params.get("delay", 0)),
                        times=int(params.get("times", 1)),
                        microbatch=int(params["microbatch"]) if "microbatch" in params else None,
                    )
                    dev.inject(fault)
                    self._send(200, {"armed": asdict(fault)})
                else:
                    self._send(404, {"error": f"no such endpoint: POST {url.path}"})
            except KeyError as exc:
                self._send(400, {"error": f"missing parameter {exc.args[0]!r}"})
            except ValueError as exc:
                self._send(400, {"error": str(exc)})

        def do_DELETE(self) -> None:
            if urlsplit(self.path).path == "/fault":
                dev.clear_faults()
                self._send(200, {"cleared": True})
            else:
                self._send(404, {"error": f"no such endpoint: DELETE {self.path}"})

        def _send(self, status: int, body: object) -> None:
            text = body if isinstance(body, str) else json.dumps(body)
            data = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain" if isinstance(body, str) else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler
