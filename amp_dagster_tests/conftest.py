"""Shared pytest setup: quiet, deterministic, and loud when a service the tests need is missing."""

from __future__ import annotations

import os

os.environ.setdefault("DAGSTER_HOME", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".dagster_home"))
os.makedirs(os.environ["DAGSTER_HOME"], exist_ok=True)

import pytest  # noqa: E402


@pytest.fixture
def devserver():
    """A factory of dev servers on free loopback ports, all shut down after the test."""
    from amp_dagster.devserver.server import DevServer

    servers = []

    def make(**options) -> DevServer:
        server = DevServer(**options)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.shutdown()
