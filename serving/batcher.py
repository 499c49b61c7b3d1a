"""Adaptive micro-batching: concurrent requests' rows are scored in one call.

No timer: a request that finds the batcher idle is scored on the next turn of the event loop, so an idle
server adds no wait. Requests that arrive while a batch is being prepared join it (up to ``max_batch``
rows); under load batches grow by themselves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np

Score = Callable[[np.ndarray], tuple[np.ndarray, Any]]


class MicroBatcher:
    def __init__(self, score: Score, max_batch: int = 256, on_batch: Callable[[int], None] | None = None) -> None:
        self._score = score
        self._max_batch = max_batch
        self._on_batch = on_batch or (lambda n: None)
        self._pending: list[tuple[np.ndarray, asyncio.Future]] = []
        self._scheduled = False
        self._loaded = False  # the last batch held more than one request

    async def submit(self, x: np.ndarray) -> tuple[np.ndarray, Any]:
        """Score ``x`` (rows of one request) with whatever else is waiting; return (scores, tag)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((x, future))
        if not self._scheduled:
            self._scheduled = True
            if self._loaded:  # under load: one more turn of the loop lets more requests join this batch
                loop.call_soon(loop.call_soon, self._drain)
            else:
                loop.call_soon(self._drain)
        return await future

    def _drain(self) -> None:
        taken, rows = [], 0
        while self._pending and (not taken or rows + len(self._pending[0][0]) <= self._max_batch):
            item = self._pending.pop(0)
            taken.append(item)
            rows += len(item[0])
        if self._pending:
            asyncio.get_running_loop().call_soon(self._drain)
        else:
            self._scheduled = False
        self._loaded = len(taken) > 1
        live = [(x, f) for x, f in taken if not f.done()]  # a cancelled request's rows are skipped
        if not live:
            return
        try:
            scores, tag = self._score(live[0][0] if len(live) == 1 else np.concatenate([x for x, _ in live]))
        except Exception as error:  # every waiting request gets the error, none hangs
            for _, future in live:
                future.set_exception(error)
            return
        self._on_batch(len(scores))
        start = 0
        for x, future in live:
            future.set_result((scores[start:start + len(x)], tag))
            start += len(x)
