"""A real ``redis-server`` for tests and benchmarks: started on a free loopback port in its
own directory with AOF on, stopped by its PID, restartable on the same port and data.

Never a mock: the Redis backends' promises (leases that expire, streams that survive a
restart) are about what a real server does. A missing ``redis-server`` binary raises
:class:`RedisServerMissing` so a test that needs it fails instead of skipping.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

__all__ = ["RedisServer", "RedisServerMissing"]


class RedisServerMissing(RuntimeError):
    """``redis-server`` is not installed (Debian: ``apt-get install redis-server``)."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One ``redis-server`` process owned by the caller.

    ``start()`` waits until it answers PING; ``stop()`` sends SIGTERM (Redis fsyncs the
    AOF and exits) and ``kill()`` SIGKILL; ``restart()`` brings it back on the same port
    and directory, so whatever the AOF holds is there again. Use as a context manager.
    """

    def __init__(
        self,
        *,
        directory: str | os.PathLike[str] | None = None,
        port: int | None = None,
        appendfsync: str = "always",
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisServerMissing(
                "redis-server not found on PATH: install it (apt-get install redis-server)"
            )
        self.binary = binary
        self._own_dir = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="shardgate-redis-"))
        self.port = port or _free_port()
        self.appendfsync = appendfsync
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def start(self, timeout: float = 30.0) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = (
                    self.process.stderr.read().decode(errors="replace")
                    if self.process.stderr
                    else ""
                )
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: {err}")
            if self._ping():
                return
            time.sleep(0.02)
        self.kill()
        raise TimeoutError(f"redis-server did not answer PING on port {self.port} in {timeout}s")

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _end(self, sig: signal.Signals, timeout: float) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)
        if process.stderr is not None:
            process.stderr.close()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM: Redis writes what it holds and exits."""
        self._end(signal.SIGTERM, timeout)

    def kill(self, timeout: float = 30.0) -> None:
        """SIGKILL: what ``appendfsync`` wrote survives, nothing else."""
        self._end(signal.SIGKILL, timeout)

    def restart(self, *, hard: bool = False) -> None:
        (self.kill if hard else self.stop)()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
