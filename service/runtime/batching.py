"""Adaptive batching that never holds a lone request: BentoML's batching queue with a bounded wait.

BentoML 1.4's `CorkDispatcher` learns how long to hold a request for companions: it spends its first requests
per queue "training" (holding the 10th and 11th for several render times), then holds each new request for
about the average wait it has seen, which a burst inflates and which then feeds itself. For renders of
seconds that is seconds of idle device per request. `BoundedDispatcher` keeps its queue, its batch assembly
and its time-out, and replaces that decision with one rule: start a batch as soon as this queue's previous
batch is done and either the queue holds a full batch or its oldest request has waited `hold_s` (the
bucket's `FLUX_BATCH_WAIT_MS`). Under load requests queue while a batch runs, so the next batch is full;
alone, a request waits at most `hold_s`. A request that has waited the queue's `max_latency` is dropped with
BentoML's own "overloaded" answer (503), as before.

The queues are built by BentoML's app factory; `install` swaps each batchable API's dispatcher for ours when
the factory is made. It relies on BentoML 1.4's internals named in `RELIES_ON` (tests/test_batching.py
fails when they change).
"""

import asyncio
import functools
import time

from _bentoml_impl.server.app import ServiceAppFactory
from bentoml._internal.marshal.dispatcher import CorkDispatcher

from service.observe import logger

RELIES_ON = {
    CorkDispatcher: (
        *("_queue", "_sema", "_wake_event", "_get_inputs", "outbound_call", "controller", "TICKET_INTERVAL"),
        *("max_latency", "max_batch_size", "fallback", "get_batch_size", "batch_dim"),
    ),
    ServiceAppFactory: ("dispatchers",),
}


class BoundedDispatcher(CorkDispatcher):
    """A CorkDispatcher whose lone requests wait at most `hold_s` for companions."""

    def __init__(self, *args, hold_s: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hold_s = hold_s

    @classmethod
    def replacing(cls, dispatcher: CorkDispatcher, hold_s: float) -> "BoundedDispatcher":
        return cls(
            int(dispatcher.max_latency * 1000),
            dispatcher.max_batch_size,
            fallback=dispatcher.fallback,
            get_batch_size=dispatcher.get_batch_size,
            batch_dim=dispatcher.batch_dim,
            hold_s=hold_s,
        )

    def ready(self, now: float) -> bool:
        """Whether the queue's next batch starts now (the previous one is done, and it is full or has waited)."""
        waited = now - self._queue[0].enqueue_time
        return not self._sema.is_locked() and (len(self._queue) >= self.max_batch_size or waited >= self.hold_s)

    async def controller(self) -> None:
        while True:
            try:
                async with self._wake_event:  # until a request is queued
                    await self._wake_event.wait_for(self._queue.__len__)
                now = time.time()
                if now - self._queue[0].enqueue_time >= self.max_latency:
                    self._queue.popleft().future.cancel()  # BentoML answers it with the fallback: 503
                    continue
                if not self.ready(now):
                    await asyncio.sleep(self.TICKET_INTERVAL)
                    continue
                self._sema.acquire()
                self._loop.create_task(self.outbound_call(tuple(self._get_inputs())))
            except Exception:  # noqa: BLE001 - as BentoML's own loop: log, keep serving
                logger.exception("batching queue")


def install(holds_ms: dict[str, int]) -> None:
    """Every BentoML app made from now on batches its APIs named in `holds_ms` with a BoundedDispatcher
    holding a lone request at most that many milliseconds."""
    original = ServiceAppFactory.__init__
    if getattr(original, "bounded", False):
        return

    @functools.wraps(original)
    def init(factory, *args, **kwargs) -> None:
        original(factory, *args, **kwargs)
        for name, dispatcher in factory.dispatchers.items():
            if name in holds_ms:
                factory.dispatchers[name] = BoundedDispatcher.replacing(dispatcher, holds_ms[name] / 1000)

    init.bounded = True
    ServiceAppFactory.__init__ = init
