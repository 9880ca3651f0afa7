"""Typed errors shared by the query side and the loaders: every failure is either transient or terminal."""

from __future__ import annotations


class AmpDagsterError(Exception):
    """Base of every error amp_dagster raises on purpose.

    ``transient`` tells callers whether trying again later can succeed (a server that is down, a dropped
    connection, a deadlock) or whether the input must change first (bad SQL, a schema mismatch, bad credentials).
    """

    transient: bool = False


class TransientError(AmpDagsterError):
    """Trying again later may succeed. Raised only after the bounded retries of the component gave up."""

    transient = True


class TerminalError(AmpDagsterError):
    """Trying again will fail the same way: the query, the config or the data must change."""


class ServiceUnavailableError(TransientError):
    """A server (amp, PostgreSQL, Redis, ClickHouse, a catalog) could not be reached."""


class NotSupportedError(TerminalError):
    """The destination cannot do what was asked (for example upsert into a store without keys)."""


class SchemaMismatchError(TerminalError):
    """The data's Arrow schema does not fit the existing table; the message names the column."""


class ConfigError(TerminalError):
    """A setting is missing or has a value that cannot work; the message names the setting and the fix."""


class MissingDriverError(ConfigError):
    """A destination's Python driver is not installed; the message names the extra that brings it."""


class QueryError(TerminalError):
    """The server refused or failed the query (bad SQL, unknown table, non-incremental streaming SQL...).

    ``code`` is the gRPC status name (``INVALID_ARGUMENT``, ``NOT_FOUND``, ``INTERNAL``...) and
    ``server_message`` the server's own words.
    """

    def __init__(self, message: str, code: str = "UNKNOWN", server_message: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.server_message = server_message


class AuthenticationError(TerminalError):
    """The server rejected the credentials (UNAUTHENTICATED or PERMISSION_DENIED)."""


def scrub(text: str, *secrets: str | None) -> str:
    """``text`` with every non-empty secret replaced by ``***``: for messages built from driver errors."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text.strip()
