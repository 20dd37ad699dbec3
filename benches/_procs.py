"""Process plumbing shared by the shard benchmarks: the fake's process, contenders, rusage.

Every contender is a child process, so its CPU seconds (``os.wait4`` rusage) and RSS
(``/proc/<pid>/status``, reported by the child itself) are its own. The fake Discord is
another child. On a machine with two or more cores the fake is pinned to CPU 0 and the
contender to CPU 1, so "events/s at one core" means exactly that.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parent.parent
BENCHES = REPO / "benches"
PEERS = BENCHES / "peers"
MAIN_PYTHON = str(REPO / ".venv" / "bin" / "python")
BENCH_PYTHON = str(REPO / ".venv-bench" / "bin" / "python")


def write_json(doc: Any, dest: str) -> None:
    """A benchmark's ``--json`` output: to stdout for ``-``, else to the file ``dest``."""
    text = json.dumps(doc, indent=2)
    if dest == "-":
        print(text)
    else:
        with open(dest, "w", encoding="utf-8") as f:
            f.write(text + "\n")


def cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def loadavg() -> tuple[float, float, float]:
    return os.getloadavg()


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


class LineReader:
    """Reads a child's stdout lines on a thread, so waits can have timeouts."""

    def __init__(self, stream: TextIO) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: TextIO) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def tagged(self, tag: str, timeout: float) -> Any:
        """The JSON after the next line starting with ``tag``; TimeoutError/EOFError if none."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {tag} line within {timeout} s")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise EOFError(f"process ended before printing {tag}")
            if line.startswith(tag + " "):
                return json.loads(line[len(tag) + 1 :])


@dataclass
class Child:
    """A started child process with its stdout reader and its stderr in a temp file."""

    proc: subprocess.Popen[str]
    reader: LineReader
    stderr: Any
    name: str
    rusage: Any = None
    status: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr_tail(self, lines: int = 15) -> str:
        self.stderr.flush()
        self.stderr.seek(0)
        return "".join(self.stderr.read().splitlines(keepends=True)[-lines:])

    def wait(self, timeout: float) -> None:
        """Reap with ``wait4`` (for its rusage); kill it (by pid) if it overstays."""
        deadline = time.monotonic() + timeout
        while True:
            pid, status, rusage = os.wait4(self.pid, os.WNOHANG)
            if pid == self.pid:
                self._reaped(status, rusage)
                return
            if time.monotonic() >= deadline:
                self.notes.append(f"killed after {timeout} s")
                os.kill(self.pid, signal.SIGKILL)
                _, status, rusage = os.wait4(self.pid, 0)
                self._reaped(status, rusage)
                return
            time.sleep(0.02)

    def _reaped(self, status: int, rusage: Any) -> None:
        self.status = os.waitstatus_to_exitcode(status)
        self.rusage = rusage
        self.proc.returncode = self.status  # Popen must not wait for it again

    def close_stdin(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()


def spawn(
    name: str,
    cmd: list[str],
    cpu: int | None,
    stdin: bool = False,
    env: dict[str, str] | None = None,
) -> Child:
    """Start ``cmd``; pin it to ``cpu`` when given; ``env`` replaces the environment."""
    # Kept open for the child's lifetime (read back on failure), closed with the Child.
    stderr = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")  # noqa: SIM115
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        cwd=str(REPO),
        env=env,
    )
    if cpu is not None:
        # The child may already have exited; its result will say why.
        with contextlib.suppress(OSError):
            os.sched_setaffinity(proc.pid, {cpu})
    return Child(proc, LineReader(proc.stdout), stderr, name)  # type: ignore[arg-type]


def check_pythons(need_bench: bool) -> None:
    """Fail early, with the fix, when a venv is missing."""
    if not Path(MAIN_PYTHON).exists():
        sys.exit(f"{MAIN_PYTHON} missing: run `make build` first")
    if need_bench and not Path(BENCH_PYTHON).exists():
        sys.exit(
            f"{BENCH_PYTHON} missing: python3 -m venv .venv-bench && "
            ".venv-bench/bin/pip install hikari discord.py orjson uvloop picows aiohttp"
        )


def pin_plan(pin: bool) -> tuple[int | None, int | None]:
    """(fake cpu, contender cpu): the first two CPUs we may use, or no pinning."""
    available = cpus()
    if not pin or len(available) < 2:
        return None, None
    return available[0], available[1]


def which(exe: str) -> str:
    return shutil.which(exe) or exe
