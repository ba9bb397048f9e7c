"""The fused ingress's micro-batcher (reasonrec/serve/batching.py), without Ray: requests that arrive
while a batch runs share the next call, each caller gets its own rows' answers in order, a lone
request is not held back, batches respect ``max_rows``, and a failing batch fails only its callers.
The router's answers batched vs one at a time, over HTTP: tests/test_serve.py."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from reasonrec.serve.batching import MicroBatcher


class Gated:
    """A batch function that records its batches and blocks until released."""

    def __init__(self):
        self.batches: list[list] = []
        self.entered, self.gate = threading.Event(), threading.Event()

    def __call__(self, rows: list) -> list:
        self.batches.append(list(rows))
        self.entered.set()
        assert self.gate.wait(30)
        if "boom" in rows:
            raise ValueError("boom in the batch")
        return [r * 10 for r in rows]


async def _until(pred, deadline_s: float = 10.0) -> None:
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() < t0 + deadline_s, "condition not reached"
        await asyncio.sleep(0.001)


def test_requests_arriving_during_a_batch_share_the_next_call():
    async def main():
        fn = Gated()
        seen = []
        b = MicroBatcher(fn, max_rows=64, on_batch=lambda rows, reqs, queued: seen.append((rows, reqs, queued)))
        first = asyncio.create_task(b([1, 2]))
        await _until(fn.entered.is_set)  # the first batch is running (blocked in its thread)
        later = [asyncio.create_task(b(rows)) for rows in ([3], [4, 5, 6], [7])]
        await _until(lambda: b.queued_rows == 5)
        fn.gate.set()
        return fn.batches, seen, await first, [await t for t in later]

    batches, seen, first, later = asyncio.run(main())
    assert batches == [[1, 2], [3, 4, 5, 6, 7]]  # one call for the three waiting requests
    assert seen == [(2, 1, 0), (5, 3, 0)]
    assert first == [10, 20] and later == [[30], [40, 50, 60], [70]]


def test_a_lone_request_is_routed_at_once_and_empty_is_no_call():
    async def main():
        fn = Gated()
        fn.gate.set()
        return await b_call(MicroBatcher(fn), fn)

    async def b_call(b, fn):
        out = await asyncio.wait_for(b([5]), timeout=10)
        return out, await b([]), fn.batches

    out, empty, batches = asyncio.run(main())
    assert out == [50] and empty == [] and batches == [[5]]


def test_batches_respect_max_rows_and_keep_requests_whole():
    async def main():
        fn = Gated()
        b = MicroBatcher(fn, max_rows=4)
        first = asyncio.create_task(b([0]))
        await _until(fn.entered.is_set)
        rest = [asyncio.create_task(b(rows)) for rows in ([1, 2], [3, 4], [5], [6, 7, 8, 9, 10], [11])]
        await _until(lambda: b.queued_rows == 11)
        fn.gate.set()
        return fn.batches, await first, [await t for t in rest]

    batches, first, rest = asyncio.run(main())
    assert batches == [[0], [1, 2, 3, 4], [5], [6, 7, 8, 9, 10], [11]]  # an oversize request goes alone
    assert first == [0] and rest == [[10, 20], [30, 40], [50], [60, 70, 80, 90, 100], [110]]


def test_a_failing_batch_fails_its_callers_only():
    async def main():
        fn = Gated()
        b = MicroBatcher(fn)
        first = asyncio.create_task(b([1]))
        await _until(fn.entered.is_set)
        bad = [asyncio.create_task(b(rows)) for rows in (["boom"], [2])]
        await _until(lambda: b.queued_rows == 2)
        fn.gate.set()
        results = await asyncio.gather(first, *bad, return_exceptions=True)
        return results, await b([3])

    (first, boom, two), after = asyncio.run(main())
    assert first == [10]
    assert isinstance(boom, ValueError) and isinstance(two, ValueError)  # same batch as the bad row
    assert after == [30]  # the batcher goes on


def test_a_wrong_answer_count_is_an_error():
    async def main():
        return await MicroBatcher(lambda rows: rows[:-1])([1, 2])

    with pytest.raises(RuntimeError, match="answered 1 rows for 2"):
        asyncio.run(main())
