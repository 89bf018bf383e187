"""Dynamic batching: requests wait (at most ``max_wait_ms``) to be run together (at most ``max_batch``).

Handlers ``await submit(task, features)``; one worker coroutine takes the first waiting
request, gathers more until the batch is full or the wait is over, and runs the batch on
the :class:`~audiopetl.serve.tasks.Engine` in its own thread, so the event loop keeps
accepting requests while the model runs. A pass that fails fails only its own requests.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import torch

from .tasks import Engine

logger = logging.getLogger(__name__)


class Batcher:
    def __init__(self, engine: Engine, max_batch: int = 32, max_wait_ms: float = 10.0) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.engine = engine
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.batches = 0
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audiopetl-model")

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._worker.done()

    def start(self) -> None:
        """Start the worker on the running event loop."""
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._work(), name="audiopetl-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    async def submit(self, task: str, features: torch.Tensor) -> torch.Tensor:
        """Class probabilities of one clip's (1, frames, mel) features, once its batch has run."""
        if self._queue is None:
            raise RuntimeError("the batcher is not started")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((task, features, future))
        return await future

    async def _next_batch(self) -> list:
        batch = [await self._queue.get()]
        deadline = asyncio.get_running_loop().time() + self.max_wait
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            live = [item for item in batch if not item[2].done()]  # a client that went away cancels its future
            if not live:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self.engine.run, [(t, f) for t, f, _ in live])
            except Exception as error:  # a real fault: report it to the waiting requests, keep serving
                logger.exception("batch of %d request(s) failed", len(live))
                results = [error] * len(live)
            self.batches += 1
            for (_, _, future), result in zip(live, results):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)
