"""Shared test setup.

Every async test runs twice, once on the stock asyncio loop and once on uvloop, because
shardgate runs on uvloop in production but must not depend on it (cf. uvloop's own
tests/test_tcp.py: one suite, two loops).

pytest-asyncio 1.x deprecates overriding the ``event_loop_policy`` fixture in favour of
the ``pytest_asyncio_loop_factories`` hook, so the two loops are declared there; the
test ids end in ``[asyncio]`` / ``[uvloop]``. Synchronous tests are not duplicated.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest
import uvloop

LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Run each async test on both loops."""
    return LOOP_FACTORIES
