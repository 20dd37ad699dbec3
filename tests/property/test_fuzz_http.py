"""Fuzzing the two HTTP servers shardgate runs: the control API and the event handler.

Random methods, paths, headers (non-ASCII bytes included), secrets and bodies, sent as raw
bytes over 127.0.0.1 so nothing is cleaned up by a client library. Every answer must be a
4xx, or a 2xx when the request was a valid, authorised one; nothing may log a traceback or
write one to stderr. The servers run on a loop in a thread of their own, so hypothesis
drives plain blocking sockets; each test is bounded by ``max_examples``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardgate.control import ControlServer
from shardgate.handler import EventHandlerServer

SECRET = "fuzz-handler-secret-0123456789"


class _Target:
    """A ControlTarget that accepts everything valid (the fuzz is about the HTTP layer)."""

    shard_count = 4

    def owns_shard(self, shard_id: int) -> bool:
        return shard_id in (0, 1)

    async def send_to_shard(self, shard_id: int, payload: Mapping[str, Any]) -> None:
        return None

    async def send_to_all(self, payload: Mapping[str, Any]) -> None:
        return None

    def status(self) -> Mapping[str, Any]:
        return {"shard_count": 4}

    async def reshard(self, shards: int | None) -> Mapping[str, int]:
        return {"from": 4, "to": shards or 4}

    def request_shutdown(self) -> None:
        return None


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Servers:
    """Both servers on a private event loop in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.control = ControlServer(_Target(), SECRET, "127.0.0.1", 0)
        self.handler = EventHandlerServer(self._on_event, SECRET, port=0)
        self.events = 0

    async def _on_event(self, shard_id: int, data: dict[str, Any], event_id: str) -> None:
        self.events += 1

    def __enter__(self) -> Servers:
        self.thread.start()
        self._run(self.control.start())
        self._run(self.handler.start())
        return self

    def __exit__(self, *exc: object) -> None:
        self._run(self.control.stop())
        self._run(self.handler.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[Servers, _Records]]:
    records = _Records()
    root = logging.getLogger()
    root.addHandler(records)
    try:
        with Servers() as running:
            yield running, records
    finally:
        root.removeHandler(records)


def send(port: int, request: bytes) -> int:
    """One request on a fresh connection; the status of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(request)
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    assert head.startswith(b"HTTP/1."), head[:80]
    return int(head.split(b" ", 2)[1])


# -- strategies -------------------------------------------------------------------------

ROUTES = [
    "/status", "/presence", "/voice-state", "/request-guild-members",
    "/request-soundboard-sounds", "/send", "/reshard", "/shutdown", "/", "/events",
]  # fmt: skip
METHODS = st.one_of(
    st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]),
    st.from_regex(r"[A-Z]{1,12}", fullmatch=True),
)
# Header and path bytes: anything but the framing characters (CR, LF; NUL and space in
# paths), high bytes (non-ASCII, invalid UTF-8) included.
HEADER_BYTES = st.binary(max_size=60).map(
    lambda b: bytes(c for c in b if c not in (0, 10, 13)).strip()
)
PATH_BYTES = st.binary(max_size=40).map(lambda b: bytes(c for c in b if c > 32 and c != 127))
PATHS = st.one_of(
    st.sampled_from(ROUTES).map(str.encode),
    st.tuples(st.sampled_from(ROUTES), PATH_BYTES).map(lambda p: p[0].encode() + p[1]),
    PATH_BYTES.map(lambda b: b"/" + b),
)
AUTH = st.one_of(
    st.none(),
    st.just(SECRET.encode()),
    HEADER_BYTES,
    st.just(SECRET.encode() + b"\xff"),
    st.just("s\u00e9cret".encode("latin-1")),
)
NAMES = st.one_of(
    st.sampled_from([b"Upgrade", b"Connection-X", b"Accept", b"X-Shardgate-Event-Id",
                     b"Content-Encoding", b"Expect", b"Cookie", b"Sec-WebSocket-Key"]),
    st.from_regex(rb"[A-Za-z][A-Za-z0-9-]{0,20}", fullmatch=True),
)  # fmt: skip
HEADERS = st.lists(st.tuples(NAMES, HEADER_BYTES), max_size=6)
SNOWFLAKE = st.one_of(
    st.integers(-5, 2**64 - 1),  # orjson's range; longer digit strings come as text
    st.text(max_size=25),
    st.from_regex(r"[0-9]{1,22}", fullmatch=True),
)
JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
                      st.floats(allow_nan=False), st.text(max_size=30), SNOWFLAKE)  # fmt: skip
JSON = st.recursive(
    JSON_LEAF,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(
            st.sampled_from(["guild_id", "channel_id", "status", "activities", "name", "type",
                             "url", "shard_id", "payload", "op", "d", "guild_ids", "user_ids",
                             "query", "limit", "nonce", "shards", "shardId", "data", "since",
                             "afk", "presences", "self_mute", "guildState"]) | st.text(max_size=8),
            inner,
            max_size=6,
        ),
    ),
    max_leaves=20,
)  # fmt: skip
BODIES = st.one_of(
    st.just(b""),
    st.binary(max_size=300),
    JSON.map(orjson.dumps),
    st.builds(lambda s, d: orjson.dumps({"shardId": s, "data": d}), st.integers(0, 3), JSON),
)
CONTENT_TYPES = st.one_of(
    st.none(), st.just(b"application/json"), st.just(b"application/json; charset=utf-8"),
    HEADER_BYTES,
)  # fmt: skip


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A raw HTTP/1.1 request and whether it carries the right secret."""
    method, path, auth = draw(METHODS), draw(PATHS), draw(AUTH)
    body, content_type = draw(BODIES), draw(CONTENT_TYPES)
    lines = [method.encode() + b" " + path + b" HTTP/1.1", b"Host: 127.0.0.1"]
    if auth is not None:
        lines.append(b"Authorization: " + auth)
    if content_type is not None:
        lines.append(b"Content-Type: " + content_type)
    for name, value in draw(HEADERS):
        if name.lower() in (b"content-length", b"transfer-encoding", b"connection", b"host"):
            continue
        lines.append(name + b": " + value)
    lines += [b"Content-Length: %d" % len(body), b"Connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body, auth == SECRET.encode()


FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def check(status: int, authorised: bool) -> None:
    assert 400 <= status < 500 or (authorised and 200 <= status < 300), status


def no_tracebacks(records: _Records, err: str) -> None:
    assert "Traceback" not in err
    bad = [r for r in records.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


@pytest.mark.parametrize("target", ["control", "handler"])
def test_every_request_gets_4xx_or_2xx(servers, capfd, target):
    """The control API and the event handler: random methods, paths, headers, bodies."""
    running, records = servers
    records.records.clear()
    port = running.control.port if target == "control" else running.handler.port

    @FUZZ
    @given(requests())
    def fuzz(request: tuple[bytes, bool]) -> None:
        raw, authorised = request
        check(send(port, raw), authorised)

    fuzz()
    no_tracebacks(records, capfd.readouterr().err)


@pytest.mark.parametrize("target", ["control", "handler"])
def test_known_hostile_requests(servers, capfd, target):
    """Seeds of the fuzz that once broke the control API: no strategy has to find them."""
    running, records = servers
    records.records.clear()
    port = running.control.port if target == "control" else running.handler.port
    def post(path: bytes, body: bytes) -> bytes:
        return (
            b"POST " + path + b" HTTP/1.1\r\nAuthorization: " + SECRET.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % len(body) + body
        )  # fmt: skip

    hostile = [
        b"GET /status HTTP/1.1\r\nAuthorization: \xff\xfe\r\nConnection: close\r\n\r\n",
        post(b"/voice-state", '{"guild_id":"\u00b2\u00b2\u00b2"}'.encode()),
        post(b"/voice-state", b'{"guild_id":"' + b"9" * 5000 + b'"}'),
        post(b"/send", b"\xff\xfe{}"),
        # aiohttp's own Expect handler echoed the value and failed on non-UTF-8: 500
        b"GET /status HTTP/1.1\r\nExpect: \x80\r\nConnection: close\r\n\r\n",
        b"POST /nowhere HTTP/1.1\r\nExpect: 100-\xffcontinue\r\nContent-Length: 0\r\n"
        b"Connection: close\r\n\r\n",
        # unparseable request lines: aiohttp logged each at ERROR with a traceback
        b"POST /\xe9 HTTP/1.1\r\nConnection: close\r\n\r\n",
        b"GET /status HTTP/1.1\r\nBad Header\r\nConnection: close\r\n\r\n",
    ]
    for raw in hostile:
        assert 400 <= send(port, raw) < 500
    no_tracebacks(records, capfd.readouterr().err)
