"""The serving replica's coalescing queue, on its own event loop (no Ray, no HTTP).

A long ``wait_s`` (minutes) makes every wait visible: a request that should not wait finishes
at once, and one that waits would hang the test's bounded ``wait_for``.
"""

import asyncio

from sql_magics.serving.coalescer import Coalescer

LONG_WAIT_S = 600.0  # a call that waited its whole wait would fail the test's bound
BOUND_S = 10.0


class Workers:
    """A score function that records each call's items and holds it until released."""

    def __init__(self) -> None:
        self.calls: list[list] = []
        self.gates: list[asyncio.Event] = []
        self.hold = True

    async def __call__(self, items: list) -> list:
        self.calls.append(list(items))
        gate = asyncio.Event()
        self.gates.append(gate)
        if self.hold:
            await gate.wait()
        return [x * 10 for x in items]

    def release(self) -> None:
        for gate in self.gates:
            gate.set()


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def run(main):
    return asyncio.run(asyncio.wait_for(main(), BOUND_S))


def test_a_request_alone_does_not_wait_even_one_after_another():
    async def main():
        workers = Workers()
        workers.hold = False
        together = Coalescer(workers, max_batch_size=8, wait_s=LONG_WAIT_S, slots=2)
        answers = [await together(i) for i in range(5)]  # concurrency 1: each finds the function idle
        return answers, workers.calls

    answers, calls = run(main)
    assert answers == [0, 10, 20, 30, 40]
    assert calls == [[0], [1], [2], [3], [4]]


def test_requests_that_come_while_a_call_runs_share_the_next_call():
    async def main():
        workers = Workers()
        together = Coalescer(workers, max_batch_size=8, wait_s=0.0, slots=2)
        first = asyncio.ensure_future(together(1))
        await _settle()
        rest = [asyncio.ensure_future(together(i)) for i in range(2, 6)]
        await _settle()
        assert workers.calls == [[1]], "beside a running call, a call that is not full waits"
        workers.release()
        await _settle()
        workers.release()
        return await first, await asyncio.gather(*rest), workers.calls

    first, rest, calls = run(main)
    assert (first, rest) == (10, [20, 30, 40, 50])
    assert calls == [[1], [2, 3, 4, 5]]


def test_a_full_call_starts_beside_a_running_one_up_to_the_slots():
    async def main():
        workers = Workers()
        together = Coalescer(workers, max_batch_size=2, wait_s=0.0, slots=2)
        futures = [asyncio.ensure_future(together(1))]
        await _settle()
        futures += [asyncio.ensure_future(together(i)) for i in range(2, 7)]
        await _settle()
        running = [list(c) for c in workers.calls]  # both slots taken: the rest queue
        workers.release()
        for _ in range(4):
            await _settle()
            workers.release()
        return running, await asyncio.gather(*futures), workers.calls

    running, answers, calls = run(main)
    assert running == [[1], [2, 3]]
    assert answers == [10, 20, 30, 40, 50, 60]
    assert sorted(x for call in calls for x in call) == [1, 2, 3, 4, 5, 6]  # each once
    assert all(len(call) <= 2 for call in calls)


def test_a_call_waits_for_requests_that_keep_coming_until_it_is_full():
    async def main():
        workers = Workers()
        together = Coalescer(workers, max_batch_size=4, wait_s=LONG_WAIT_S, slots=1)
        futures = [asyncio.ensure_future(together(1))]
        await _settle()
        for i in (2, 3):  # come while the first call runs, 50 ms apart: requests are coming
            await asyncio.sleep(0.05)
            futures.append(asyncio.ensure_future(together(i)))
        workers.release()
        await _settle()
        waiting = [list(c) for c in workers.calls]  # 2 and 3 wait for the requests expected
        futures += [asyncio.ensure_future(together(i)) for i in (4, 5)]
        await _settle()
        workers.release()
        return waiting, await asyncio.gather(*futures), workers.calls

    waiting, answers, calls = run(main)
    assert waiting == [[1]]
    assert answers == [10, 20, 30, 40, 50]
    assert calls == [[1], [2, 3, 4, 5]]


def test_a_call_stops_waiting_when_the_requests_stop_coming():
    async def main():
        workers = Workers()
        together = Coalescer(workers, max_batch_size=8, wait_s=LONG_WAIT_S, slots=1)
        futures = [asyncio.ensure_future(together(1))]
        await _settle()
        for i in (2, 3):  # come often while the first call runs, then no more
            await asyncio.sleep(0.01)
            futures.append(asyncio.ensure_future(together(i)))
        workers.release()
        workers.hold = False
        return await asyncio.gather(*futures), workers.calls

    answers, calls = run(main)  # not LONG_WAIT_S: a few gaps of silence
    assert answers == [10, 20, 30]
    assert calls == [[1], [2, 3]]


def test_an_announced_request_is_waited_for_and_one_that_leaves_is_not():
    async def main():
        workers = Workers()
        workers.hold = False
        together = Coalescer(workers, max_batch_size=8, wait_s=LONG_WAIT_S, slots=1)
        arrived = asyncio.Event()

        async def announced(item, brings: bool):
            with together.coming():
                await arrived.wait()
                return await together(item) if brings else None

        late = asyncio.ensure_future(announced(2, True))
        gone = asyncio.ensure_future(announced(3, False))
        await _settle()
        first = asyncio.ensure_future(together(1))
        await _settle()
        held = list(workers.calls)  # 1 waits for the two announced
        arrived.set()
        return held, await first, await late, await gone, workers.calls

    held, first, late, gone, calls = run(main)
    assert held == []
    assert (first, late, gone) == (10, 20, None)
    assert calls == [[1, 2]]
