"""The one path every protocol front takes to the batching worker: check, queue in the right bucket,
follow the caller, cancel on the worker when the caller leaves, count the outcome."""

import asyncio
from collections.abc import Awaitable, Callable
from http import HTTPStatus

import aiohttp

from service.observe import IN_FLIGHT, REFUSALS, REQUESTS, logger, request_id
from service.runtime.result import Result, Status, failure
from service.schema import Limits, Refused, WorkItem
from service.settings import bucket_of

POLL_S = 0.1  # how often a waiting call checks that its caller is still there
# Raised before the request reached the worker: safe to send again. Anything later (the worker closed the
# connection after reading the request: "Server disconnected") may mean the work is running, and is never retried.
NOT_SENT = (aiohttp.ClientConnectorError,)
# BentoML's client to the worker raises an exception carrying the worker server's HTTP status
_BY_WORKER_STATUS = {
    HTTPStatus.TOO_MANY_REQUESTS: "overloaded",
    HTTPStatus.SERVICE_UNAVAILABLE: "queue_full",
    HTTPStatus.GATEWAY_TIMEOUT: "timeout",
}


# Outcomes worth sending again, and after how many seconds (each front says it its own way).
RETRY_AFTER_S: dict[str, int] = {"draining": 1, "loading": 5, "overloaded": 1, "queue_full": 2, "unavailable": 2}
# What the worker's server answered, said for the caller (BentoML's own message is "An unexpected error has
# occurred, please check the server log").
WORKER_REFUSALS = {
    "queue_full": f"overloaded: requests of this size would wait in the queue past its latency cap; send it again "
    f"in {RETRY_AFTER_S['queue_full']} s (Retry-After) or to another replica",
    "overloaded": f"overloaded: the worker takes no more requests now; send it again in "
    f"{RETRY_AFTER_S['overloaded']} s",
    "timeout": "the render took longer than the server's timeout",
}


def over_in_flight(limit: int) -> str:
    """The refusal of a call over a front's in-flight limit (HTTP 429, gRPC RESOURCE_EXHAUSTED)."""
    return f"overloaded: over {limit} calls in flight; send it again in {RETRY_AFTER_S['overloaded']} s"


class Rejected(Exception):
    """A request the front answers itself, with an outcome (service.fronts.outcomes maps it to each protocol)."""

    def __init__(self, outcome: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.outcome, self.message, self.field = outcome, message, field

    @property
    def reason(self) -> str:
        """The message, led by the field it is about (for protocols with no field of their own: gRPC)."""
        return f"{self.field}: {self.message}" if self.field else self.message


class Gateway:
    def __init__(self, worker) -> None:
        self.worker = worker
        self.limits: Limits | None = None  # known once the worker has loaded and planned
        self.in_flight = 0  # calls to the worker's queues not yet answered, every protocol (the drain waits for 0)
        self._background: set[asyncio.Task] = set()

    async def wait_for_worker(self) -> None:
        """Until the worker has loaded, planned and warmed up; then learn the plan's limits."""
        while True:
            try:
                if await self.worker.is_ready(5):
                    self.limits = Limits.model_validate(await call_worker(self.worker.to_async.limits))
                    return
            except Exception:  # noqa: BLE001 - the worker is not listening yet
                pass
            await asyncio.sleep(0.5)

    def check(self, items: list[WorkItem]) -> list[WorkItem]:
        """The items as this deployment runs them (the served model's defaults filled in), or Rejected."""
        if self.limits is None:
            raise Rejected("loading", "the model is still loading")
        try:
            return self.limits.admit(items)
        except Refused as error:
            REFUSALS.labels(reason=f"{error.field}_over_plan").inc()
            raise Rejected("refused", error.message, error.field) from None

    async def render(self, item: WorkItem, caller_left: Callable[[], Awaitable[bool]] | None = None) -> Result:
        """The worker's Result for `item`; raises Rejected for what the front answers itself. A caller that
        leaves (cancelled task, or `caller_left()` turning true) is cancelled on the worker too."""
        return (await self.render_group([item], caller_left))[0]

    async def render_group(
        self, items: list[WorkItem], caller_left: Callable[[], Awaitable[bool]] | None = None
    ) -> list[Result]:
        """`render` for images of one call (one request id), queued together so they can share a batch."""
        first = items[0]
        token = request_id.set(first.request_id)
        outcome = "error"
        try:
            items = self.check(items)
            results = await self._follow(items, caller_left)
            outcome = next((result.status for result in results if not result.ok), Status.ok)
            return results
        except Rejected as error:
            outcome = error.outcome
            raise
        except asyncio.CancelledError:
            outcome = Status.cancelled
            raise
        finally:
            REQUESTS.labels(protocol=first.protocol, outcome=outcome).inc()
            logger.info("%s %d× %s: %s", first.protocol, len(items), described(items[0]), outcome)
            request_id.reset(token)

    async def _follow(self, items: list[WorkItem], caller_left) -> list[Result]:
        rid = items[0].request_id
        generate = getattr(self.worker.to_async, f"generate_{bucket_of(items[0].side)}")
        call = asyncio.ensure_future(call_worker(generate, items))
        IN_FLIGHT.inc()
        self.in_flight += 1
        try:
            while not call.done():
                await asyncio.wait({call}, timeout=POLL_S)
                if not call.done() and caller_left is not None and await caller_left():
                    self._cancel_on_worker(rid, call)
                    return [failure(Status.cancelled, "the client disconnected")] * len(items)
            return await call
        except asyncio.CancelledError:
            self._cancel_on_worker(rid, call)
            raise
        except Exception as error:  # noqa: BLE001 - BentoML raises what the worker's server answered
            outcome = outcome_of_worker_error(error)
            raise Rejected(outcome, WORKER_REFUSALS.get(outcome) or str(error) or type(error).__name__) from None
        finally:
            IN_FLIGHT.dec()
            self.in_flight -= 1

    def _cancel_on_worker(self, rid: str, call: asyncio.Future) -> None:
        """Tell the worker nobody waits for `rid` (it drops it from its queue, or stops and skips decode)."""
        call.cancel()
        task = asyncio.ensure_future(call_worker(self.worker.to_async.cancel, request_id=rid))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        logger.info("caller left: cancelling on the worker")

    async def progress(self, rid: str) -> int:
        try:
            return await call_worker(self.worker.to_async.progress, request_id=rid)
        except Exception:  # noqa: BLE001 - progress is best effort (e.g. while the worker shuts down)
            return -1

    async def alive(self, timeout_s: float) -> bool:
        """True while loading; once serving, whether the worker runs a trivial device operation in time."""
        if self.limits is None:
            return True
        try:
            return await asyncio.wait_for(call_worker(self.worker.to_async.alive), timeout_s)
        except Exception:  # noqa: BLE001 - a wedged or dead worker is exactly what this detects
            return False

    async def info(self) -> dict:
        return await call_worker(self.worker.to_async.info)


def described(item: WorkItem) -> str:
    """Size and steps for the outcome line; steps the request left to the model's default say so (a request
    refused before its defaults were filled in has none)."""
    steps = "default" if item.steps is None else item.steps
    return f"{item.width}x{item.height} {steps} steps"


async def call_worker(method, *args, **kwargs):
    """Call a worker API (BentoML's client is aiohttp, over a local socket), once more if it could not connect."""
    try:
        return await method(*args, **kwargs)
    except NOT_SENT:
        return await method(*args, **kwargs)


def outcome_of_worker_error(error: Exception) -> str:
    return _BY_WORKER_STATUS.get(getattr(error, "error_code", None), "error")
