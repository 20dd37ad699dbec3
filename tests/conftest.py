"""Shared test setup.

Every async test runs twice, once on the stock asyncio loop and once on uvloop, because
shardgate runs on uvloop in production but must not depend on it (cf. uvloop's own
tests/test_tcp.py: one suite, two loops).

pytest-asyncio 1.x deprecates overriding the ``event_loop_policy`` fixture in favour of
the ``pytest_asyncio_loop_factories`` hook, so the two loops are declared there; the
test ids end in ``[asyncio]`` / ``[uvloop]``. Synchronous tests are not duplicated.

The environment of the machine running the suite must not leak into it: every
``SHARDGATE_*`` variable is removed for each test (a test sets what it needs). The
hypothesis profile is loaded here, so property tests anywhere in the tree get it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator, Mapping

import pytest
import uvloop
from hypothesis import HealthCheck, settings

from shardgate.testing.redis_server import RedisServer

LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}

# No per-example deadline and no "too slow" health check: the machines running the suite
# are shared and busy, and some strategies build realistic 10-300 KB payloads on purpose.
# Each test bounds its own ``max_examples``.
settings.register_profile(
    "shardgate",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile("shardgate")


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Run each async test on both loops."""
    return LOOP_FACTORIES


@pytest.fixture(autouse=True)
def _no_shardgate_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests see no SHARDGATE_* variable of the machine's environment."""
    for name in list(os.environ):
        if name.startswith("SHARDGATE_"):
            monkeypatch.delenv(name)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A real ``redis-server`` (AOF on) on a free loopback port, stopped by its PID after
    the test. A machine without ``redis-server`` fails the test: it is never skipped."""
    with RedisServer() as server:
        yield server
