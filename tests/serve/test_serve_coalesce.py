"""`pipelines.serve.coalesce.Coalescer` on a real asyncio loop: what it sends, when, and errors."""

import asyncio
import contextvars

import pytest

from pipelines.serve.coalesce import CallCancelledError, Coalescer


class Receiver:
    """A stand-in receiver that answers each item with its square once `release` is set, and
    records the calls it got."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.release = asyncio.Event()
        self.running = 0
        self.most_running = 0

    async def send(self, items: list[int]) -> list[int]:
        self.calls.append(list(items))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await self.release.wait()
            return [i * i for i in items]
        finally:
            self.running -= 1


def test_a_lone_request_is_sent_at_once() -> None:
    async def main() -> None:
        receiver = Receiver()
        receiver.release.set()
        coalescer = Coalescer(receiver.send, max_items=8)
        assert await asyncio.wait_for(coalescer.submit(3), 1.0) == 9
        assert receiver.calls == [[3]]

    asyncio.run(main())


def test_requests_that_queue_behind_busy_calls_go_together_in_order() -> None:
    async def main() -> None:
        receiver = Receiver()
        coalescer = Coalescer(receiver.send, max_items=4, max_in_flight=2)
        waiting = [asyncio.create_task(coalescer.submit(i)) for i in range(11)]
        await asyncio.sleep(0.01)
        # The first two found a free slot each and went alone; the rest wait for a slot.
        assert receiver.calls == [[0], [1]]
        receiver.release.set()
        assert await asyncio.gather(*waiting) == [i * i for i in range(11)]
        assert receiver.calls == [[0], [1], [2, 3, 4, 5], [6, 7, 8, 9], [10]]
        assert receiver.most_running == 2

    asyncio.run(main())


def test_each_freed_slot_takes_everything_that_queued_meanwhile() -> None:
    async def main() -> None:
        receiver = Receiver()
        coalescer = Coalescer(receiver.send, max_items=8, max_in_flight=1)
        first = asyncio.create_task(coalescer.submit(1))
        await asyncio.sleep(0.01)
        later = [asyncio.create_task(coalescer.submit(i)) for i in (2, 3, 4)]
        await asyncio.sleep(0.01)
        assert receiver.calls == [[1]]  # the lone first request did not wait for company
        receiver.release.set()
        assert await first == 1 and await asyncio.gather(*later) == [4, 9, 16]
        assert receiver.calls == [[1], [2, 3, 4]]

    asyncio.run(main())


def test_a_failed_call_fails_its_items_only_and_the_next_calls_still_go() -> None:
    async def main() -> None:
        calls: list[list[int]] = []

        async def send(items: list[int]) -> list[int]:
            calls.append(items)
            await asyncio.sleep(0)
            if 1 in items:
                raise ConnectionError("replica died")
            return items

        coalescer = Coalescer(send, max_items=2, max_in_flight=1)
        results = await asyncio.gather(*(coalescer.submit(i) for i in range(4)), return_exceptions=True)
        assert calls == [[0], [1, 2], [3]]
        assert results[0] == 0 and results[3] == 3
        assert all(isinstance(r, ConnectionError) for r in results[1:3])
        assert await coalescer.submit(7) == 7

    asyncio.run(main())


def test_a_wrong_number_of_answers_is_an_error_not_a_mix_up() -> None:
    async def main() -> None:
        async def send(items: list[int]) -> list[int]:
            return items[:1]

        coalescer = Coalescer(send, max_items=4, max_in_flight=1)
        blocker = asyncio.create_task(coalescer.submit(0))
        pair = [asyncio.create_task(coalescer.submit(i)) for i in (1, 2)]
        assert await blocker == 0
        with pytest.raises(RuntimeError, match="2 items"):
            await asyncio.gather(*pair)

    asyncio.run(main())


def test_a_waiter_that_gives_up_is_not_sent_and_the_others_get_their_answers() -> None:
    async def main() -> None:
        receiver = Receiver()
        coalescer = Coalescer(receiver.send, max_items=4, max_in_flight=1)
        blocker = asyncio.create_task(coalescer.submit(1))
        await asyncio.sleep(0.01)
        impatient = asyncio.create_task(coalescer.submit(2))
        patient = asyncio.create_task(coalescer.submit(3))
        await asyncio.sleep(0.01)
        impatient.cancel()
        receiver.release.set()
        assert await blocker == 1 and await patient == 9
        assert impatient.cancelled()
        assert receiver.calls == [[1], [3]]  # the request nobody waits for was never sent

    asyncio.run(main())


@pytest.mark.parametrize("items, in_flight", [(0, 1), (1, 0)])
def test_limits_below_one_are_refused(items: int, in_flight: int) -> None:
    with pytest.raises(ValueError, match=">= 1"):
        Coalescer(lambda batch: batch, max_items=items, max_in_flight=in_flight)


def test_a_cancelled_call_fails_its_items_with_a_retryable_error_and_the_queue_moves_on() -> None:
    async def main() -> None:
        calls: list[list[int]] = []
        gate = asyncio.Event()

        async def send(items: list[int]) -> list[int]:
            calls.append(items)
            if 0 in items:
                raise asyncio.CancelledError  # as an awaited Serve call that was cancelled
            await gate.wait()
            return items

        coalescer = Coalescer(send, max_items=4, max_in_flight=1)
        first = asyncio.create_task(coalescer.submit(0))
        later = asyncio.create_task(coalescer.submit(5))
        gate.set()
        with pytest.raises(CallCancelledError):
            await first
        assert await later == 5
        assert calls == [[0], [5]]

    asyncio.run(main())


def test_calls_do_not_run_in_a_submitters_context() -> None:
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")

    async def main() -> None:
        seen: list[str] = []

        async def send(items: list[int]) -> list[int]:
            seen.append(request_id.get())
            return items

        coalescer = Coalescer(send, max_items=4)

        async def one_request(i: int) -> int:
            request_id.set(f"request-{i}")  # as Serve's per-request context
            return await coalescer.submit(i)

        assert await asyncio.gather(*(one_request(i) for i in range(3))) == [0, 1, 2]
        assert seen and set(seen) == {"none"}

    asyncio.run(main())


def test_a_busy_coalescer_waits_for_a_fuller_batch_then_sends_what_there_is() -> None:
    async def main() -> None:
        receiver = Receiver()
        coalescer = Coalescer(receiver.send, max_items=4, max_in_flight=2, max_wait_s=0.2)
        first = asyncio.create_task(coalescer.submit(0))
        await asyncio.sleep(0.01)
        assert receiver.calls == [[0]]  # idle: no wait
        second = asyncio.create_task(coalescer.submit(1))
        await asyncio.sleep(0.05)
        assert receiver.calls == [[0]]  # a call is in flight: the free slot waits for company
        await asyncio.sleep(0.3)
        assert receiver.calls == [[0], [1]]  # the wait is over: what there is goes
        receiver.release.set()
        assert await asyncio.gather(first, second) == [0, 1]

    asyncio.run(main())


def test_a_full_batch_goes_at_once_and_retuning_applies_to_the_next_call() -> None:
    async def main() -> None:
        receiver = Receiver()
        coalescer = Coalescer(receiver.send, max_items=3, max_in_flight=2, max_wait_s=5.0)
        waiting = [asyncio.create_task(coalescer.submit(0))]
        await asyncio.sleep(0.01)
        waiting += [asyncio.create_task(coalescer.submit(i)) for i in (1, 2, 3)]
        await asyncio.sleep(0.05)
        assert receiver.calls == [[0], [1, 2, 3]]  # full: no waiting for the 5 s
        coalescer.retune(2, 0.0)
        waiting += [asyncio.create_task(coalescer.submit(i)) for i in (4, 5, 6)]
        receiver.release.set()
        assert await asyncio.gather(*waiting) == [i * i for i in range(7)]
        assert receiver.calls[2:] == [[4, 5], [6]]
        with pytest.raises(ValueError, match="max_items must be >= 1"):
            coalescer.retune(0, 0.0)

    asyncio.run(main())
