"""What the end-to-end tests share: the gateway's config against a fake Discord, and a
bounded wait. (``tests`` is not a package; pytest puts this directory on the path, as it
does for ``worker_overrides``.)"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
from typing import Any

from shardgate.config import Config
from shardgate.testing.fake_discord import FakeDiscord

GUILDS_AND_MESSAGES = (1 << 0) | (1 << 9) | (1 << 11) | (1 << 15)


def gateway_config(
    fake: FakeDiscord, handler_port: int, *, secret: str, **overrides: Any
) -> Config:
    """A gateway for ``fake`` forwarding to ``127.0.0.1:handler_port``: fast identify
    spacing (the fake enforces it), the control API on any free port."""
    values: dict[str, Any] = {
        "token": fake.config.token,
        "intents": GUILDS_AND_MESSAGES,
        "rest_url": fake.rest_url,
        "event_handler_url": f"http://127.0.0.1:{handler_port}/",
        "event_handler_secret": secret,
        "spawn_shard_delay": 200,
        "allow_fast_identify": True,
        "control_port": 0,
        "metrics_port": 0,
        **overrides,
    }
    return Config(**values)


async def wait_until(predicate: Any, timeout: float = 20.0) -> None:
    """Poll ``predicate`` until true; TimeoutError after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def spawn_interruptible(args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """Popen whose child starts with SIGINT at its default, whatever this process inherited.

    A shell runs a background job (``pytest &``, e.g. two suites side by side) with SIGINT
    ignored, and an ignored signal stays ignored across exec: the child would never see
    the SIGINT that is meant to stop it (and rightly so: a program leaves a signal ignored
    at start ignored). A handled signal is reset to the default at exec, so handle it here
    while the child is spawned.
    """
    inherited = signal.getsignal(signal.SIGINT)
    if inherited == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(args, **kwargs)
    finally:
        if inherited == signal.SIG_IGN:
            signal.signal(signal.SIGINT, inherited)


class ChildOutput:
    """Everything a child writes to its stdout pipe, read on a thread from the start, so
    the pipe never fills and a test can wait for a line before it signals the child."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self._proc = proc
        self._stdout = proc.stdout
        self._data = bytearray()
        self._closed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while chunk := self._stdout.read1(65536):
            with self._changed:
                self._data += chunk
                self._changed.notify_all()
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    @property
    def data(self) -> bytes:
        with self._changed:
            return bytes(self._data)

    def wait_for(self, marker: bytes, timeout: float) -> None:
        """Until ``marker`` was written; AssertionError if the child closed its output
        (exited) or ``timeout`` passed first, with what it wrote."""
        with self._changed:
            self._changed.wait_for(lambda: marker in self._data or self._closed, timeout)
            if marker not in self._data:
                raise AssertionError(f"no {marker!r} from the child: {bytes(self._data)!r}")

    def send(self, signum: int) -> None:
        self._proc.send_signal(signum)

    def stop(self, signum: int | None, timeout: float) -> int:
        """Send ``signum`` (None: nothing, it was sent) and wait for the exit; a child
        still running after ``timeout`` is killed (by its PID) and the test fails with its
        output. Returns the status."""
        if signum is not None:
            self._proc.send_signal(signum)
        try:
            status = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
            self._thread.join(10)
            raise AssertionError(
                f"not ended {timeout} s after "
                f"{'the signal' if signum is None else signal.Signals(signum).name}: "
                f"{self.data!r}"
            ) from None
        self._thread.join(10)
        return status
