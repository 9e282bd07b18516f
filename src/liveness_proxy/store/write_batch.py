"""Small writes of many requests, one transaction per batch, by one writer task.

Binding a session token, using it, and claiming or settling an idempotency key are each a
statement or two that a request must see committed before it goes on. Run as a transaction each,
they would cap creates at the database's commit rate, and on SQLite their connections would fight
for the one write lock (SQLite's busy handler sleeps milliseconds at a time while it waits): an
idempotent create measured 9 times slower that way. Here every such write is an `Operation` queued
on one `GroupCommitter` (`group_commit.py`): one writer, one transaction for whatever is queued,
each operation reading its own outcome within it.

Operations are applied in the order of their `sort_key` (what they lock: a token hash, a subject
and key), so two replicas' batches that touch the same rows lock them in the same order on
PostgreSQL and cannot deadlock. An operation must not raise for an expected outcome (a conflict is
an outcome, not an error): an exception fails its whole batch, and every caller in it sees it (a
database outage does exactly that, and becomes a 503).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from liveness_proxy.store.group_commit import GroupCommitter


class Operation(Protocol):
    @property
    def sort_key(self) -> str: ...

    async def apply(self, connection: AsyncConnection) -> None:
        """Runs the operation's statements and records its outcome on itself."""
        ...


class BatchedWritesClosed(Exception):
    pass


class BatchedWrites:
    def __init__(
        self, engine: AsyncEngine, *, batch_max: int = 256, name: str = "request-integrity writer"
    ) -> None:
        self.engine = engine
        self._committer: GroupCommitter[Operation] = GroupCommitter(
            self._write, batch_max=batch_max, name=name, closed_error=BatchedWritesClosed
        )

    @property
    def postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    async def run(self, operation: Operation) -> None:
        """Returns once the operation's batch committed; its outcome is then on the operation."""
        await self._committer.submit(operation)

    async def close(self) -> None:
        """Writes what is queued, then stops the writer."""
        await self._committer.close()

    async def _write(self, batch: list[Operation]) -> Sequence[BaseException | None]:
        async with self.engine.begin() as connection:
            for operation in sorted(batch, key=_sort_key):
                await operation.apply(connection)
        return [None] * len(batch)


def _sort_key(operation: Operation) -> str:
    return operation.sort_key
