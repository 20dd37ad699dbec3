"""Fuzzing what shardgate takes from outside, beyond the raw-request fuzz of
``test_fuzz_http.py``: the event handler's websocket receiver, wrongly typed commands for
every control route, and huge, empty and over-declared bodies.

The rule everywhere: a 4xx (or, for a valid authorised request, a 2xx), never a 5xx, a
hang or a traceback. On the websocket: a well-formed batch frame is acknowledged with
``{"ack": batch, "n": k}`` (``0 <= k <= len(events)``), anything else closes the
connection with 1003, and a wrong secret is refused at the upgrade with 401. Every wait
is bounded (``TIMEOUT``), so a hang fails the test instead of stalling it.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_fuzz_http import (
    FUZZ,
    JSON,
    SECRET,
    check,
    no_tracebacks,
    send,
    servers,  # noqa: F401  (the fixture)
)

from shardgate.control import MAX_REQUEST_BYTES

TIMEOUT = 15.0
"""Seconds any one answer may take on a busy 2-core machine before it counts as a hang."""

# -- the websocket receiver ---------------------------------------------------------------

INT_OR_NOT = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.booleans(), st.none(), st.text(max_size=5),
    st.floats(allow_nan=False), st.lists(st.integers(-5, 5), max_size=2),
)  # fmt: skip
EVENT = st.one_of(
    st.builds(lambda s, d: {"shardId": s, "data": d}, st.integers(0, 3), JSON),
    st.builds(lambda s, d: {"shardId": s, "data": d}, INT_OR_NOT, JSON),
    st.builds(
        lambda s, d, g: {"guildState": g, "shardId": s, "data": d},
        st.integers(0, 3), st.dictionaries(st.text(max_size=4), JSON, max_size=3), JSON,
    ),
    JSON,
)  # fmt: skip


@st.composite
def batch_frames(draw: st.DrawFn) -> dict[str, Any]:
    """Batch-shaped frames: mostly well formed, some with one field of the wrong type or
    ids and events of different lengths."""
    events = draw(st.lists(EVENT, max_size=6))
    ids = draw(
        st.one_of(
            st.lists(st.text(max_size=20), min_size=len(events), max_size=len(events)),
            st.lists(st.sampled_from(["0:s:1", "0:s:2", "1:s:1"]),
                     min_size=len(events), max_size=len(events)),
            st.lists(INT_OR_NOT, max_size=4),
        )
    )  # fmt: skip
    frame: dict[str, Any] = {
        "batch": draw(st.one_of(st.integers(0, 2**62), INT_OR_NOT)),
        "shard": draw(st.one_of(st.integers(0, 3), INT_OR_NOT)),
        "ids": ids,
        "events": events,
    }
    for key in draw(st.lists(st.sampled_from(sorted(frame)), max_size=1)):
        if draw(st.booleans()):
            del frame[key]
        else:
            frame[key] = draw(JSON)
    return frame


def well_formed(frame: object) -> bool:
    """The receiver's frame rule, restated: an object with integer batch and shard, and
    lists of ids (strings) and events of one length."""
    if not isinstance(frame, dict):
        return False
    ids, events = frame.get("ids"), frame.get("events")
    return (
        type(frame.get("batch")) is int
        and type(frame.get("shard")) is int
        and isinstance(ids, list)
        and isinstance(events, list)
        and len(ids) == len(events)
        and all(type(i) is str for i in ids)
    )


WS_PAYLOADS = st.one_of(
    batch_frames().map(lambda f: ("binary", orjson.dumps(f))),
    batch_frames().map(lambda f: ("text", orjson.dumps(f))),
    JSON.map(lambda v: ("binary", orjson.dumps(v))),
    st.binary(max_size=200).map(lambda b: ("binary", b)),
    st.text(max_size=100).map(lambda t: ("text", t.encode("utf-8", "surrogatepass"))),
)
AUTHS = st.one_of(st.just(SECRET), st.just(SECRET + "x"), st.just(""), st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30))  # fmt: skip


async def ws_exchange(port: int, auth: str, kind: str, payload: bytes) -> tuple[str, Any]:
    """Upgrade with ``auth``, send one frame, and read what comes back: ``("status", n)``
    for a refused upgrade, ``("ack", {...})`` or ``("closed", code)``."""
    headers = {"Authorization": auth} if auth else {}
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        try:
            ws = await session.ws_connect(
                f"http://127.0.0.1:{port}/", headers=headers, autoping=True, max_msg_size=0
            )
        except aiohttp.WSServerHandshakeError as exc:
            return "status", exc.status
        async with ws:
            if kind == "text":
                # aiohttp's send_str encodes; send the bytes as a text frame as they are.
                await ws.send_frame(payload, aiohttp.WSMsgType.TEXT)
            else:
                await ws.send_bytes(payload)
            async with asyncio.timeout(TIMEOUT):
                message = await ws.receive()
            if message.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                return "ack", orjson.loads(message.data)
            return "closed", ws.close_code


def test_websocket_receiver_acks_good_frames_and_closes_on_bad_ones(servers, capfd):  # noqa: F811
    running, records = servers
    records.records.clear()

    @FUZZ
    @given(auth=AUTHS, sent=WS_PAYLOADS)
    def fuzz(auth: str, sent: tuple[str, bytes]) -> None:
        kind, payload = sent
        outcome, value = running._run(ws_exchange(running.handler.port, auth, kind, payload))
        if auth != SECRET:
            assert (outcome, value) == ("status", 401)
            return
        try:
            frame = orjson.loads(payload)
        except orjson.JSONDecodeError:
            frame = None
        if well_formed(frame):
            assert outcome == "ack", (outcome, value)
            assert value["ack"] == frame["batch"]
            assert 0 <= value["n"] <= len(frame["events"])
        else:
            assert (outcome, value) == ("closed", 1003)

    fuzz()
    no_tracebacks(records, capfd.readouterr().err)


# -- wrongly typed commands, per control route --------------------------------------------

# Guild 4194304 routes to shard 1, which the fuzz target owns.
VALID = {
    "/presence": {"status": "online", "activities": [{"name": "x", "type": 0}], "since": None,
                  "afk": False},
    "/voice-state": {"guild_id": "4194304", "channel_id": None, "self_mute": False,
                     "self_deaf": False},
    "/request-guild-members": {"guild_id": "4194304", "query": "", "limit": 0,
                               "presences": False, "nonce": "n"},
    "/request-soundboard-sounds": {"guild_ids": ["4194304"]},
    "/send": {"shard_id": 0, "payload": {"op": 3, "d": {"status": "online", "since": None,
                                                         "activities": [], "afk": False}}},
    "/reshard": {"shards": 8},
}  # fmt: skip


@st.composite
def mistyped(draw: st.DrawFn) -> tuple[str, bytes]:
    """A valid command with some of its fields given random values (any JSON type),
    removed, or joined by unknown ones."""
    route = draw(st.sampled_from(sorted(VALID)))
    body: dict[str, Any] = orjson.loads(orjson.dumps(VALID[route]))
    for key in draw(st.lists(st.sampled_from(sorted(body)), min_size=1, max_size=3)):
        action = draw(st.sampled_from(["retype", "retype", "delete", "nest"]))
        if action == "delete":
            body.pop(key, None)
        elif action == "nest" and isinstance(body.get(key), dict):
            inner = body[key]
            if inner:
                inner[draw(st.sampled_from(sorted(inner)))] = draw(JSON)
        else:
            body[key] = draw(JSON)
    if draw(st.booleans()):
        body[draw(st.text(max_size=6))] = draw(JSON)
    return route, orjson.dumps(body)


def post(path: str, body: bytes, *, auth: str = SECRET, extra: bytes = b"") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {auth}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n".encode()
        + extra + b"Connection: close\r\n\r\n" + body
    )  # fmt: skip


def test_every_control_route_with_wrongly_typed_fields_gets_4xx_or_2xx(servers, capfd):  # noqa: F811
    running, records = servers
    records.records.clear()

    @FUZZ
    @given(mistyped())
    def fuzz(command: tuple[str, bytes]) -> None:
        route, body = command
        check(send(running.control.port, post(route, body)), authorised=True)

    fuzz()
    for route, body in VALID.items():  # the unmutated commands are accepted
        assert 200 <= send(running.control.port, post(route, orjson.dumps(body))) < 300, route
    no_tracebacks(records, capfd.readouterr().err)


# -- huge, empty and over-declared bodies -------------------------------------------------


def send_declared(port: int, path: str, declared: int, body: bytes) -> int | None:
    """Declare ``declared`` body bytes, send ``body`` (fewer), and return the status if the
    server answers within a few seconds without the rest (None: it waits for the body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {SECRET}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
        ).encode()
        sock.sendall(head + body)
        sock.settimeout(3.0)
        try:
            answer = sock.recv(4096)
        except TimeoutError:
            return None
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.") else None


HUGE = [
    b"",
    b"{}",
    b"[" * 5000 + b"]" * 5000,  # deeper than orjson's recursion limit
    b'{"shardId":0,"data":{"t":"X","s":1,"op":0,"d":"' + b"x" * (3 << 20) + b'"}}',  # 3 MiB
    b"\x00" * (2 << 20),
    orjson.dumps({"status": "online", "activities": [{"name": "a" * 70_000}]}),
]


@pytest.mark.parametrize("target", ["control", "handler"])
@pytest.mark.parametrize("index", range(len(HUGE)))
def test_huge_and_empty_bodies(servers, capfd, target, index):  # noqa: F811
    running, records = servers
    records.records.clear()
    port = running.control.port if target == "control" else running.handler.port
    path = "/presence" if target == "control" else "/"
    body = HUGE[index]
    status = send(port, post(path, body))
    if target == "handler" and index == 3:
        assert status == 200  # a valid 3 MiB event is delivered
    elif target == "control" and len(body) > MAX_REQUEST_BYTES:
        assert status == 413
    else:
        assert 400 <= status < 500, status
    no_tracebacks(records, capfd.readouterr().err)


def test_a_body_declared_over_the_limit_is_refused_without_waiting_for_it(servers):  # noqa: F811
    """The control API refuses a Content-Length over its limit from the head alone."""
    running, _records = servers
    status = send_declared(running.control.port, "/presence", MAX_REQUEST_BYTES * 100, b"{")
    assert status == 413


@pytest.mark.parametrize("status", [[], {}, [1], {"a": 1}])
def test_found_by_the_fuzz_an_unhashable_presence_status_is_400_not_500(servers, status):  # noqa: F811
    """``status`` was checked by membership in a frozenset alone: a list raised TypeError."""
    running, _records = servers
    body = orjson.dumps({"status": status, "activities": []})
    assert send(running.control.port, post("/presence", body)) == 400
