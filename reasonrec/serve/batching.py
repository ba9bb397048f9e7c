"""Adaptive micro-batching of the online router: the rows of requests that arrive while a batch
is being routed are routed together in the next batch, with one vectorized Router call.

Why not ``@serve.batch``: its queue forms a batch as soon as its first request arrives and then
waits ``batch_wait_timeout_s`` for more. With a wait of 0, requests that arrive while a batch
runs each form their own batch (they queue behind the running one one by one), so concurrent
requests rarely share a router call; with a wait > 0, every request at concurrency 1 pays the
wait. Here there is no wait at all: an idle batcher routes a lone request at once, a busy one
collects what arrives meanwhile (up to ``max_rows``) for its next call. Ray-free; the ingress
replica runs it on its event loop and the router in a worker thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class MicroBatcher:
    """``await batcher(rows)`` -> ``fn(rows)``'s answers for those rows, where ``fn`` maps a list
    of rows to a list of answers of the same length and order, row by row (the rows of several
    calls are concatenated into one ``fn`` call; a row's answer must not depend on the others).

    ``fn`` runs in a worker thread (``asyncio.to_thread``), one batch at a time. A request's rows
    are never split across batches; a request of more than ``max_rows`` rows is a batch alone.
    ``on_batch(rows, requests, queued_rows)`` is called before each batch (metrics). If ``fn``
    raises, every request of that batch gets the exception."""

    def __init__(
        self,
        fn: Callable[[list], list],
        max_rows: int = 64,
        on_batch: Callable[[int, int, int], None] | None = None,
    ):
        self.fn, self.max_rows, self.on_batch = fn, max(int(max_rows), 1), on_batch
        self._pending: list[tuple[list, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None

    @property
    def queued_rows(self) -> int:
        return sum(len(rows) for rows, _ in self._pending)

    async def __call__(self, rows: list) -> list:
        if not rows:
            return []
        future = asyncio.get_running_loop().create_future()
        self._pending.append((list(rows), future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    def _take(self) -> list[tuple[list, asyncio.Future]]:
        """The next batch: the oldest requests whose rows fit ``max_rows`` (at least one request)."""
        n, size = 0, 0
        for rows, _ in self._pending:
            if n and size + len(rows) > self.max_rows:
                break
            n, size = n + 1, size + len(rows)
        batch, self._pending = self._pending[:n], self._pending[n:]
        return [(rows, f) for rows, f in batch if not f.cancelled()]

    async def _drain(self) -> None:
        while self._pending:
            batch = self._take()
            if not batch:
                continue
            flat: list[Any] = [row for rows, _ in batch for row in rows]
            if self.on_batch is not None:
                self.on_batch(len(flat), len(batch), self.queued_rows)
            try:
                out = await asyncio.to_thread(self.fn, flat)
                if len(out) != len(flat):
                    raise RuntimeError(f"batch function answered {len(out)} rows for {len(flat)}")
            except Exception as exc:  # noqa: BLE001 -- handed to every caller of the batch
                for _, f in batch:
                    if not f.done():
                        f.set_exception(exc)
                continue
            start = 0
            for rows, f in batch:
                if not f.done():
                    f.set_result(out[start : start + len(rows)])
                start += len(rows)
