"""Small writes of many requests, one transaction per batch, by one writer task.

Binding a session token, using it, and claiming or settling an idempotency key are each a
statement or two that a request must see committed before it goes on. Run as a transaction each,
they would cap creates at the database's commit rate, and on SQLite their connections would fight
for the one write lock (SQLite's busy handler sleeps milliseconds at a time while it waits): an
idempotent create measured 9 times slower that way. Here every such write is an `Operation` queued
on one `GroupCommitter` (`group_commit.py`): one writer, one transaction for whatever is queued,
each operation reading its own outcome within it.

Operations are applied class by class (each class in as few statements as it can: one multi-row
INSERT for all the bindings of a batch), in a fixed order of classes and, within a class, of their
`sort_key` (what they lock: a token hash, a subject and key), so two replicas' batches that touch
the same rows lock them in the same order on PostgreSQL and cannot deadlock. An operation must not
raise for an expected outcome (a conflict is an outcome, not an error): an exception fails its
whole batch, and every caller in it sees it (a database outage does exactly that: a 503).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from liveness_proxy.store.group_commit import GroupCommitter


class Operation(Protocol):
    @property
    def sort_key(self) -> str: ...

    @classmethod
    async def apply_all(cls, connection: AsyncConnection, operations: Sequence[Any]) -> None:
        """Runs the statements of every operation of this class in the batch (as few as it can: one
        multi-row statement where the class allows it) and records each one's outcome on it."""
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

    async def run(self, operation: Operation) -> None:
        """Returns once the operation's batch committed; its outcome is then on the operation."""
        await self._committer.submit(operation)

    async def close(self) -> None:
        """Writes what is queued, then stops the writer."""
        await self._committer.close()

    async def _write(self, batch: list[Operation]) -> Sequence[BaseException | None]:
        by_class: dict[type[Operation], list[Operation]] = {}
        for operation in sorted(batch, key=_sort_key):
            by_class.setdefault(type(operation), []).append(operation)
        async with self.engine.begin() as connection:
            # Classes in a fixed order too, so every replica takes its locks in one order.
            for cls in sorted(by_class, key=_class_name):
                await cls.apply_all(connection, by_class[cls])
        return [None] * len(batch)


def _sort_key(operation: Operation) -> str:
    return operation.sort_key


def _class_name(cls: type[Operation]) -> str:
    return cls.__qualname__
