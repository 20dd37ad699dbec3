"""Manager classes the worker tests name by import path (``worker_overrides:...``).

Worker processes import these (the test process's ``sys.path`` is handed to them), so they
live in a module of their own rather than in a test function.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
from typing import Any, ClassVar

from shardgate._native import KIND_READY, Message
from shardgate.group import ShardGroup
from shardgate.manager import GatewayManager
from shardgate.shard import Shard, ShardState
from shardgate.workers import current_worker_id

HOOK_EVENT = "TEST_HOOKS_RAN"


def in_worker() -> bool:
    return current_worker_id() is not None


class TaggedShard(Shard):
    """A user's shard class: must be the one the workers build."""


class PlacingGroup(ShardGroup):
    """Per-event hooks (run in the workers) and shard placement (runs in the main process)."""

    shard_class = TaggedShard
    placements: ClassVar[list[tuple[int, int, int, int]]] = []
    """(pid, worker_id asked, shard_id, worker chosen) of every placement, main process."""

    async def tell_cluster_to_identify(self, worker_id: int, shard_id: int, bucket_id: int) -> None:
        chosen = self.worker_count - 1 - worker_id  # type: ignore[attr-defined]
        PlacingGroup.placements.append((os.getpid(), worker_id, shard_id, chosen))
        await self.start_shard(chosen, shard_id)

    def handle_dispatch(self, shard: Shard, message: Message) -> None:
        if message.t == "TYPING_START":
            return  # this bot does not want typing events
        super().handle_dispatch(shard, message)

    def on_shard_loaded(self, shard: Shard) -> None:
        super().on_shard_loaded(shard)
        d: dict[str, Any] = {
            "pid": os.getpid(),
            "in_worker": in_worker(),
            "shard_class": type(shard).__name__,
        }
        self.notice(shard, HOOK_EVENT, d)


class PlacingGateway(GatewayManager):
    group_class = PlacingGroup


class CrashingGroup(ShardGroup):
    """The worker that holds shard 4 dies as soon as it builds its group, every time."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if in_worker() and 4 in self.shard_ids:
            os._exit(3)


class CrashingGateway(GatewayManager):
    group_class = CrashingGroup


KILL_DIR_ENV = "WORKER_TEST_KILL_DIR"
"""Directory the kill overrides mark (``<shard>-<where>``) so that only the first worker
process that gets there dies, not its replacement."""
KILL_SHARD = 5


def _first_time(shard_id: int, where: str) -> bool:
    directory = os.environ.get(KILL_DIR_ENV)
    if directory is None or not in_worker() or shard_id != KILL_SHARD:
        return False
    try:
        fd = os.open(os.path.join(directory, f"{shard_id}-{where}"), os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        return False
    os.close(fd)
    return True


class KilledAfterReadyShard(Shard):
    """Its worker is SIGKILLed right after the READY of shard 5's first session was handed
    over, before the rest of that loop iteration (the GUILD_CREATEs behind it)."""

    def on_dispatch(self, message: Message) -> None:
        super().on_dispatch(message)
        if message.kind == KIND_READY and _first_time(self.shard_id, "after-ready"):
            os.kill(os.getpid(), signal.SIGKILL)


class KilledAtReadyShard(Shard):
    """Its worker is SIGKILLed while shard 5's first READY is being read: the IDENTIFY
    succeeded, the READY was not handed over (the window a worker cannot close)."""

    def on_status(self, old: ShardState, new: ShardState) -> None:
        if new is ShardState.READY and _first_time(self.shard_id, "at-ready"):
            os.kill(os.getpid(), signal.SIGKILL)


class KilledAfterReadyGroup(ShardGroup):
    shard_class = KilledAfterReadyShard


class KilledAtReadyGroup(ShardGroup):
    shard_class = KilledAtReadyShard


class KilledAfterReadyGateway(GatewayManager):
    group_class = KilledAfterReadyGroup


class KilledAtReadyGateway(GatewayManager):
    group_class = KilledAtReadyGroup


LATE_GRANT_S = 0.4


class LateGrantGroup(ShardGroup):
    """In a worker, every other identify grant reaches the shard ``LATE_GRANT_S`` late (as
    behind a lagging loop), the others at once: a late IDENTIFY followed by a punctual
    one of the same bucket, whose grants the main process spaced by its window."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The worker's RemoteGate (of ``__main__``: the worker runs as ``python -m``, so
        # not the class ``shardgate.worker`` would give here); the main process's gate
        # has no ``granted``.
        gate = kwargs["gate"]
        on_time = getattr(gate, "granted", None)
        if in_worker() and on_time is not None:
            turns = itertools.count()

            def granted(req: int) -> None:
                if next(turns) % 2 == 0:
                    asyncio.get_running_loop().call_later(LATE_GRANT_S, on_time, req)
                else:
                    on_time(req)

            gate.granted = granted  # type: ignore[method-assign]


class LateGrantGateway(GatewayManager):
    group_class = LateGrantGroup
