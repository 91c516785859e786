"""One drain for every protocol: on SIGTERM a process stops taking work at once and finishes what it holds.

uvicorn's own SIGTERM handling stops accepting connections and waits for open requests: new HTTP calls then
hang in the socket's backlog, probes time out, and a front whose worker has closed its socket fails new
gRPC calls with INTERNAL. `Drain` takes SIGTERM first: `draining` turns true (readiness 503, gRPC health
NOT_SERVING, new calls 503 / UNAVAILABLE, both retryable), `/livez` keeps answering, the `on_begin` hooks
run (stop pulling jobs), and only once nothing is in flight (`busy()` false for `quiet_s`) or `grace_s` has
passed is the signal handed to uvicorn, which closes the server.
"""

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable

from service.observe import logger

POLL_S = 0.05


class Drain:
    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0  # counted by CountInFlight where a process installs it
        self._task: asyncio.Task | None = None

    def install(
        self,
        busy: Callable[[], bool],
        grace_s: float,
        quiet_s: float = 0.0,
        on_begin: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Take SIGTERM from uvicorn (call it from a start-up hook: uvicorn's handler is in place by then)."""
        self.busy, self.grace_s, self.quiet_s, self.on_begin = busy, grace_s, quiet_s, on_begin
        self._loop = asyncio.get_running_loop()
        self._uvicorn = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame) -> None:
        if not self.draining:
            self.draining = True
            self._loop.call_soon_threadsafe(lambda: setattr(self, "_task", self._loop.create_task(self._finish())))

    async def _finish(self) -> None:
        logger.info("SIGTERM: draining (up to %.0f s), then stopping", self.grace_s)
        if self.on_begin is not None:
            begun = asyncio.ensure_future(self.on_begin())
        deadline, idle_since = time.monotonic() + self.grace_s, time.monotonic()
        while time.monotonic() < deadline:
            if self.busy():
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= self.quiet_s:
                break
            await asyncio.sleep(POLL_S)
        if self.on_begin is not None:
            await asyncio.wait({begun}, timeout=max(0.0, deadline - time.monotonic()))
        if callable(self._uvicorn):
            self._uvicorn(signal.SIGTERM, None)


class CountInFlight:
    """ASGI middleware: `drain.in_flight` is the number of HTTP requests this process is answering (probes and
    metrics aside), for a process whose callers are its own fronts (the worker)."""

    SKIP = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})

    def __init__(self, app, drain: Drain) -> None:
        self.app, self.drain = app, drain

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in self.SKIP:
            return await self.app(scope, receive, send)
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1


DRAIN = Drain()  # this process's
