"""Group commit: many callers, one transaction.

`GroupCommitter.submit(item)` queues the item and returns once the transaction holding it has
committed (or raises what that item's write raised). One writer task per committer takes whatever
is queued, at most `batch_max` items, and hands them to `write` as one batch; while that commit is in
flight, new items queue up for the next one. There is no timer: a lone caller pays one commit, and
under load a commit covers many callers. The audit log and the session bindings both write this way.

`write(batch)` returns one outcome per item (None: written; an exception: that item's failure, the
rest of the batch still counts). If `write` raises, the whole batch failed and every caller gets
that exception. A caller that is cancelled does not withdraw its item: it is still written.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

Item = TypeVar("Item")


@dataclass(slots=True)
class _Pending(Generic[Item]):
    item: Item
    done: asyncio.Future[None]


class GroupCommitter(Generic[Item]):
    def __init__(
        self,
        write: Callable[[list[Item]], Awaitable[Sequence[BaseException | None]]],
        *,
        batch_max: int,
        name: str,
        closed_error: Callable[[str], Exception],
        on_commit: Callable[[int, float], None] | None = None,
    ) -> None:
        """`name` names the writer task and the errors ("audit writer"); `closed_error` builds the
        exception for a submit after close, or an item the writer was cancelled before writing;
        `on_commit(batch size, seconds)` is told of every committed batch (e.g. a metric)."""
        if batch_max < 1:
            raise ValueError("batch_max must be at least 1")
        self._write = write
        self._batch_max = batch_max
        self._name = name
        self._closed_error = closed_error
        self._on_commit = on_commit
        self._pending: deque[_Pending[Item]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def submit(self, item: Item) -> None:
        if self._closed:
            raise self._closed_error(f"the {self._name} is closed")
        loop = asyncio.get_running_loop()
        wakeup = self._ensure_writer(loop)
        done: asyncio.Future[None] = loop.create_future()
        self._pending.append(_Pending(item, done))
        wakeup.set()
        await done

    async def close(self) -> None:
        """Writes everything already queued, then stops the writer. Later submits raise."""
        self._closed = True
        writer = self._writer
        if writer is None or writer.done() or self._wakeup is None:
            return
        self._wakeup.set()
        await writer

    def _ensure_writer(self, loop: asyncio.AbstractEventLoop) -> asyncio.Event:
        # Started on first use rather than in __init__, so a committer can be built without a loop.
        wakeup = self._wakeup
        if self._writer is None or self._writer.done() or wakeup is None:
            wakeup = self._wakeup = asyncio.Event()
            # In a context of its own: it outlives the request that started it, whose span (tracing) and
            # other context must not become every later batch's.
            self._writer = loop.create_task(
                self._write_queued(wakeup), name=self._name, context=contextvars.Context()
            )
        elif self._writer.get_loop() is not loop:
            raise RuntimeError(f"the {self._name} writes from one event loop only")
        return wakeup

    async def _write_queued(self, wakeup: asyncio.Event) -> None:
        try:
            while True:
                if not self._pending:
                    if self._closed:
                        return
                    wakeup.clear()
                    await wakeup.wait()
                    continue
                size = min(self._batch_max, len(self._pending))
                await self._commit_batch([self._pending.popleft() for _ in range(size)])
        except asyncio.CancelledError:
            # The loop is going away: nobody will write what is still queued, so say so to the waiters.
            _fail_all(self._pending, self._closed_error(f"the {self._name} was cancelled; not written"))
            self._pending.clear()
            raise

    async def _commit_batch(self, batch: list[_Pending[Item]]) -> None:
        started = time.perf_counter()
        try:
            outcomes = await self._write([pending.item for pending in batch])
        except Exception as exc:
            # The transaction rolled back: nothing of the batch was written; the writer carries on.
            _fail_all(batch, exc)
            return
        except BaseException:
            _fail_all(batch, self._closed_error(f"the {self._name} was cancelled; may not be written"))
            raise
        elapsed = time.perf_counter() - started
        for pending, outcome in zip(batch, outcomes, strict=True):
            if pending.done.done():  # a cancelled caller's future
                continue
            if outcome is None:
                pending.done.set_result(None)
            else:
                pending.done.set_exception(outcome)
        if self._on_commit is not None:
            try:
                self._on_commit(len(batch), elapsed)
            except Exception as exc:
                # A metrics hook must not stop the writer: the batch is committed and answered.
                asyncio.get_running_loop().call_exception_handler(
                    {"message": f"{self._name} on_commit hook failed", "exception": exc}
                )


def _fail_all(batch: Iterable[_Pending[Item]], error: BaseException) -> None:
    for pending in batch:
        if not pending.done.done():
            pending.done.set_exception(error)
