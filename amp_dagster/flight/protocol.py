"""amp's query protocol as pure functions: block ranges, batch metadata, watermarks, reorg detection, commands.

Nothing here does I/O. The client (``client.py``) and the dev server (``devserver/``) both build on it, so the
two sides cannot drift apart. Section numbers refer to ``AMP_PROTOCOL.md``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import pyarrow as pa

from ..errors import TerminalError

ZERO_HASH = "0x" + "0" * 64
STATEMENT_QUERY_TYPE_URL = "type.googleapis.com/arrow.flight.protocol.sql.CommandStatementQuery"


class ProtocolError(TerminalError):
    """The server broke the protocol (a gap between ranges, a wrong parent hash, unparsable metadata)."""


def normalize_hash(value: str | bytes) -> str:
    """``0x``-prefixed lowercase hex; accepts raw 32 bytes and hex with or without the prefix (§5)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return "0x" + bytes(value).hex()
    text = value.lower()
    return text if text.startswith("0x") else "0x" + text


# -- block ranges and batch metadata (§2) ------------------------------------------------------------------


@dataclass(frozen=True)
class BlockRange:
    """Blocks ``start..=end`` of ``network``; ``hash`` is block ``end``'s, ``prev_hash`` block ``start - 1``'s.

    >>> r = BlockRange("mainnet", 100, 102, "0x" + "ab" * 32, "0x" + "cd" * 32, 1718000000)
    >>> BlockRange.from_json(r.to_json()) == r
    True
    """

    network: str
    start: int
    end: int
    hash: str
    prev_hash: str
    timestamp: int | None = None

    def to_json(self) -> dict:
        out = {
            "numbers": {"start": self.start, "end": self.end},
            "network": self.network,
            "hash": self.hash,
            "prev_hash": self.prev_hash,
        }
        if self.timestamp is not None:
            out["timestamp"] = self.timestamp
        return out

    @classmethod
    def from_json(cls, obj: Mapping) -> BlockRange:
        try:
            numbers = obj["numbers"]
            return cls(
                network=str(obj["network"]),
                start=int(numbers["start"]),
                end=int(numbers["end"]),
                hash=normalize_hash(obj["hash"]),
                prev_hash=normalize_hash(obj.get("prev_hash") or ZERO_HASH),
                timestamp=None if obj.get("timestamp") is None else int(obj["timestamp"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed block range in app_metadata: {obj!r} ({exc})") from None

    @property
    def blocks(self) -> int:
        return self.end - self.start + 1


@dataclass(frozen=True)
class BatchMetadata:
    """The JSON ``app_metadata`` of one record batch: its ranges and whether a microbatch ends with it."""

    ranges: tuple[BlockRange, ...]
    ranges_complete: bool

    def encode(self) -> bytes:
        return json.dumps(
            {"ranges": [r.to_json() for r in self.ranges], "ranges_complete": self.ranges_complete},
            separators=(",", ":"),
        ).encode()


def parse_metadata(raw: bytes | pa.Buffer | None) -> BatchMetadata | None:
    """Parse a batch's ``app_metadata``; None when the server sent none (any non-amp Flight SQL server)."""
    if raw is None:
        return None
    data = raw.to_pybytes() if isinstance(raw, pa.Buffer) else bytes(raw)
    if not data:
        return None
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise ProtocolError(f"app_metadata is not JSON: {data[:200]!r} ({exc})") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"app_metadata is not a JSON object: {data[:200]!r}")
    ranges = tuple(BlockRange.from_json(r) for r in obj.get("ranges") or ())
    return BatchMetadata(ranges, bool(obj.get("ranges_complete", False)))


# -- watermarks and resume (§5) ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockRef:
    number: int
    hash: str


@dataclass(frozen=True)
class Watermark:
    """How far a stream got, per network: the last block of the last complete microbatch and its hash.

    Serialises to the exact JSON of amp's ``amp-resume`` header.

    >>> w = Watermark.from_json('{"mainnet": {"number": 2, "hash": "0xab"}}')
    >>> w.to_json()
    '{"mainnet":{"number":2,"hash":"0xab"}}'
    >>> w.next_block("mainnet")
    3
    """

    blocks: Mapping[str, BlockRef] = field(default_factory=dict)

    @classmethod
    def from_ranges(cls, ranges: Iterable[BlockRange], previous: Watermark | None = None) -> Watermark:
        merged = dict(previous.blocks) if previous else {}
        for r in ranges:
            merged[r.network] = BlockRef(r.end, r.hash)
        return cls(merged)

    @classmethod
    def at(cls, network: str, number: int, hash_: str | bytes) -> Watermark:
        return cls({network: BlockRef(number, normalize_hash(hash_))})

    def to_json(self) -> str:
        return json.dumps(
            {n: {"number": b.number, "hash": b.hash} for n, b in sorted(self.blocks.items())},
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes | Mapping) -> Watermark:
        try:
            obj = text if isinstance(text, Mapping) else json.loads(text)
            return cls({str(n): BlockRef(int(b["number"]), normalize_hash(b["hash"])) for n, b in obj.items()})
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise TerminalError(
                f"not a watermark: {str(text)[:200]!r} ({exc}). "
                'Expected {"<network>": {"number": N, "hash": "0x..."}}'
            ) from None

    def next_block(self, network: str) -> int | None:
        ref = self.blocks.get(network)
        return None if ref is None else ref.number + 1

    def __bool__(self) -> bool:
        return bool(self.blocks)


@dataclass(frozen=True)
class Cursor:
    """The position of a source that is not keyed by blocks: any JSON value (an id, a timestamp, a page token).

    >>> Cursor.from_json(Cursor({"page": 3}).to_json())
    Cursor(value={'page': 3})
    """

    value: object

    def __post_init__(self) -> None:
        try:
            json.dumps(self.value)
        except (TypeError, ValueError) as exc:
            raise TerminalError(f"a cursor must be JSON-serialisable, got {self.value!r} ({exc})") from None

    def to_json(self) -> str:
        return json.dumps(self.value, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Cursor:
        return cls(json.loads(text))


Position = Watermark | Cursor


# -- stream events ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Data:
    """Rows and where they come from: the microbatch's block ``ranges`` (every batch of one microbatch carries
    the same ranges), or for a cursor source the ``cursor`` that follows them."""

    batch: pa.RecordBatch
    ranges: tuple[BlockRange, ...] = ()
    cursor: Cursor | None = None


@dataclass(frozen=True)
class Checkpoint:
    """Everything up to ``position`` has been delivered: commit, then store the position to resume from.

    ``position`` is a :class:`Watermark` for block sources, a :class:`Cursor` for cursor sources, and None for a
    source that can only be read whole (it has no position to resume from).
    """

    position: Position | None
    ranges: tuple[BlockRange, ...] = ()


@dataclass(frozen=True)
class Rollback:
    """Rows of ``network`` at block ``first_block`` or later that were delivered are void: delete them."""

    network: str
    first_block: int


@dataclass(frozen=True)
class Reorg(Rollback):
    """The chain forked: blocks ``first_block..=last_block`` (and any after) were replaced (§4).

    The data that follows is the new canonical chain from ``first_block`` on. ``parent_hash`` is the hash of
    block ``first_block - 1`` on that chain (the new range's ``prev_hash``): the position to fall back to.
    """

    last_block: int
    parent_hash: str = ""


@dataclass(frozen=True)
class Rewind(Rollback):
    """The connection broke inside a microbatch; the client reconnected from the last checkpoint and the
    server sends the microbatch again, from ``first_block`` on. Rows of it delivered before the break are void."""

    reason: str


Event = Data | Checkpoint | Reorg | Rewind


# -- reorg detection (§4) ---------------------------------------------------------------------------------


class RangeTracker:
    """Compares each batch's ranges with the previous ones, per network, exactly as amp's clients do.

    Seeded from a resume watermark, so a reorg that happened while the client was away is detected too.

    >>> t = RangeTracker()
    >>> h = lambda n: "0x" + f"{n:064x}"
    >>> t.observe([BlockRange("m", 0, 0, h(10), ZERO_HASH)])
    []
    >>> t.observe([BlockRange("m", 1, 2, h(12), h(10))])
    []
    >>> t.observe([BlockRange("m", 2, 3, h(99), h(11))])  # starts inside the last range: a reorg
    [Reorg(network='m', first_block=2, last_block=3, parent_hash='0x...0b')]
    """

    def __init__(self, seed: Watermark | None = None) -> None:
        self._last: dict[str, BlockRange] = {}
        self._networks: frozenset[str] | None = None
        if seed:
            for network, ref in seed.blocks.items():
                # only end and hash matter for the comparisons; start = end marks it as seeded
                self._last[network] = BlockRange(network, ref.number, ref.number, ref.hash, "")

    def observe(self, ranges: Iterable[BlockRange]) -> list[Reorg]:
        ranges = tuple(ranges)
        networks = [r.network for r in ranges]
        if len(set(networks)) != len(networks):
            raise ProtocolError(f"a batch names a network twice: {networks}")
        if self._networks is not None and ranges and frozenset(networks) != self._networks:
            raise ProtocolError(f"the stream's networks changed from {sorted(self._networks)} to {sorted(networks)}")
        if ranges:
            self._networks = frozenset(networks)
        reorgs = []
        for incoming in ranges:
            if (incoming.start == 0) != (incoming.prev_hash == ZERO_HASH):
                raise ProtocolError(f"prev_hash must be zero exactly when a range starts at block 0: {incoming}")
            previous = self._last.get(incoming.network)
            if previous is not None and incoming != previous:
                reorg = _compare(previous, incoming)
                if reorg is not None:
                    reorgs.append(reorg)
            self._last[incoming.network] = incoming
        return reorgs

    def reset(self, seed: Watermark | None) -> None:
        """Forget the ranges seen since ``seed`` (used when reconnecting from a checkpoint)."""
        networks = self._networks
        self.__init__(seed)
        self._networks = networks


def _compare(previous: BlockRange, incoming: BlockRange) -> Reorg | None:
    if incoming.start == previous.end + 1:
        if incoming.prev_hash != previous.hash:
            raise ProtocolError(
                f"range {incoming.start}..={incoming.end} of {incoming.network} follows block {previous.end} "
                f"but its prev_hash {incoming.prev_hash} is not that block's hash {previous.hash}"
            )
        return None
    if incoming.start <= previous.end:
        if incoming.prev_hash == previous.hash:
            raise ProtocolError(
                f"range {incoming.start}..={incoming.end} of {incoming.network} restarts at or before block "
                f"{previous.end} without a new parent hash: neither progress nor a reorg"
            )
        return Reorg(incoming.network, incoming.start, max(incoming.end, previous.end), incoming.prev_hash)
    raise ProtocolError(
        f"gap in {incoming.network}: blocks {previous.end + 1}..={incoming.start - 1} were skipped "
        f"(previous range ended at {previous.end}, the next starts at {incoming.start})"
    )


# -- the Flight SQL command (§1) ---------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _fields(data: bytes) -> dict[int, bytes]:
    """Length-delimited fields of a protobuf message (the only wire type these two messages use)."""
    out, i = {}, 0
    while i < len(data):
        key, i = _read_varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 2:
            length, i = _read_varint(data, i)
            out[number] = data[i : i + length]
            i += length
        elif wire == 0:
            _, i = _read_varint(data, i)
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
        if i > len(data):
            raise ValueError("truncated protobuf message")
    return out


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(data):
            raise ValueError("truncated varint")
        byte = data[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, i
        shift += 7


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_statement_query(sql: str) -> bytes:
    """``Any{type_url, CommandStatementQuery{query}}`` serialised: the descriptor command amp accepts."""
    inner = _field(1, sql.encode())
    return _field(1, STATEMENT_QUERY_TYPE_URL.encode()) + _field(2, inner)


def decode_command(cmd: bytes) -> tuple[str, bytes]:
    """Split an Any-packed command into (type URL, message bytes); ValueError if it is not an Any."""
    fields = _fields(cmd)
    if 1 not in fields:
        raise ValueError("the command is not a google.protobuf.Any (no type_url)")
    return fields[1].decode(), fields.get(2, b"")


def decode_statement_query(message: bytes) -> str:
    return _fields(message).get(1, b"").decode()
