"""Ingress-side batching: requests that wait together go to the detector in one call.

Every handle call costs the ingress (routing, submitting the actor task, awaiting it) and the
detector replica (receiving, queueing) about the same whatever it carries, so one call per
request spends most of two cores on calls once tens of clients wait. `Coalescer` keeps a few
calls in flight and, each time one returns, sends everything that queued meanwhile as the next
call. An idle server sends a lone request at once (no added latency); a busy one sends
batches that grow with the load, and may wait up to `max_wait_s` for a freed slot's batch to
fill. It is the one owner of batching in `rayssd serve`: the detector runs each call as it
comes.

Serve's `@serve.batch` forms its next batch as soon as one item arrives and only then waits
for a free slot (`max_concurrent_batches`), so under load its batches stay small; here the batch
is taken when the slot frees.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class CallCancelledError(ConnectionError):
    """The call that carried a request was cancelled before it answered (the receiver went away
    or this process is stopping): the request may be retried."""


class Coalescer(Generic[Item, Result]):
    """`submit(item)` → the item's result from ``send(items)``, which answers a sequence of
    items with their results in the same order.

    At most `max_in_flight` ``send`` calls run at once, each with at most `max_items` items,
    taken in arrival order. While other calls are in flight, a freed slot waits up to
    `max_wait_s` for `max_items` items before it sends fewer; with every slot free, items go
    at once. A ``send`` that raises fails every item it carried with that error
    (`CallCancelledError` if it was cancelled); a submitter that stops waiting is left out of the
    next call, or only loses its answer if its call is already on the way. Each call runs in
    a fresh context: it belongs to no single submitter (in Serve, to no single HTTP request,
    whose cancellation would otherwise cancel the whole batch).
    """

    def __init__(
        self,
        send: Callable[[list[Item]], Awaitable[Sequence[Result]]],
        *,
        max_items: int,
        max_in_flight: int = 2,
        max_wait_s: float = 0.0,
    ) -> None:
        self._send = send
        self.max_in_flight = max_in_flight
        self.retune(max_items, max_wait_s)
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self._queue: deque[tuple[Item, asyncio.Future[Result]]] = deque()
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()  # strong references until each call ends
        self._timer: asyncio.TimerHandle | None = None  # a freed slot waiting for a fuller batch

    def retune(self, max_items: int, max_wait_s: float) -> None:
        """New batch limits, from the next call on (calls already sent keep theirs)."""
        if max_items < 1 or max_wait_s < 0:
            raise ValueError(f"max_items must be >= 1 and max_wait_s >= 0, got {max_items}, {max_wait_s}")
        self.max_items, self.max_wait_s = max_items, max_wait_s

    async def submit(self, item: Item) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._dispatch()
        return await future

    def _dispatch(self, waited: bool = False) -> None:
        while self._in_flight < self.max_in_flight:
            busy = self._in_flight > 0
            if not waited and busy and self.max_wait_s > 0 and 0 < len(self._queue) < self.max_items:
                if self._timer is None:  # let the batch fill for a while, then send what there is
                    self._timer = asyncio.get_running_loop().call_later(self.max_wait_s, self._waited)
                return
            batch: list[tuple[Item, asyncio.Future[Result]]] = []
            while self._queue and len(batch) < self.max_items:
                item, future = self._queue.popleft()
                if not future.done():  # a submitter that gave up costs the receiver nothing
                    batch.append((item, future))
            if not batch:
                return
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._in_flight += 1
            task = contextvars.Context().run(asyncio.create_task, self._call(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _waited(self) -> None:
        self._timer = None
        self._dispatch(waited=True)

    async def _call(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        try:
            results = await self._send([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"send answered {len(results)} results for {len(batch)} items")
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
        except asyncio.CancelledError:
            self._fail(batch, CallCancelledError("the call carrying this request was cancelled; retry"))
            raise
        except Exception as exc:  # every waiter hears of it; nothing is swallowed
            self._fail(batch, exc)
        finally:
            self._in_flight -= 1
            self._dispatch()  # queued requests never wait for a submit that may not come

    @staticmethod
    def _fail(batch: list[tuple[Item, asyncio.Future[Result]]], error: BaseException) -> None:
        for _, future in batch:
            if not future.done():
                future.set_exception(error)
