"""This replica's consumer: pulls only as many jobs as it has free slots, renders them through the gateway (so
they share batches with direct requests), stores each result, then finishes the record and acknowledges."""

import asyncio
import base64
import json
import time
from collections.abc import Callable

from service.gateway import Gateway, Rejected
from service.jobs.queue import Delivery, JobQueue, QueueDown
from service.jobs.records import FINISHED, Job, JobStatus
from service.jobs.results import ResultStore, job_view
from service.jobs.webhooks import Webhooks
from service.observe import JOBS_FINISHED, JOBS_PENDING, JOBS_RECLAIMED, JOBS_WAITING, logger, request_id
from service.runtime.result import Result, Status
from service.schema import Conditioning, WorkItem
from service.settings import Settings

READ_BLOCK_MS = 1000
WATCH_S = 0.25  # how often a running job's cancel flag and progress are checked
RETRY_S = 1.0  # wait between attempts while Redis is unreachable


class JobRunner:
    def __init__(
        self,
        queue: JobQueue,
        results: ResultStore,
        webhooks: Webhooks,
        gateway: Gateway,
        settings: Settings,
        changed: Callable[[str], None],
    ) -> None:
        """`changed(job_id)` is told each time this replica changes a job's record."""
        self.queue, self.results, self.webhooks, self.gateway = queue, results, webhooks, gateway
        self.changed = changed
        self.slots, self.heartbeat_s = settings.jobs_in_flight, settings.jobs_heartbeat_s
        self.max_deliveries = settings.jobs_max_deliveries
        self.rendering: set[str] = set()  # entries whose job holds a slot
        self.held: set[str] = set()  # entries read and not yet acknowledged
        self.tasks: set[asyncio.Task] = set()
        self.loops: list[asyncio.Task] = []

    def start(self) -> None:
        self.loops = [asyncio.ensure_future(self._pull()), asyncio.ensure_future(self._keep_alive())]

    async def stop(self, grace_s: float) -> None:
        """Pull nothing more; jobs running may finish within `grace_s`; the rest stay pending for others."""
        for loop in self.loops:
            loop.cancel()
        deadline = time.monotonic() + grace_s
        while self.tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for task in self.tasks:
            task.cancel()

    async def _pull(self) -> None:
        await self._retrying(self.queue.create_group)
        while True:
            free = self.slots - len(self.rendering)
            if free <= 0:
                await asyncio.sleep(0.05)
                continue
            try:
                self._spawn(await self.queue.read(free, READ_BLOCK_MS))
            except QueueDown as error:
                logger.warning("job queue unreachable (%s); retrying", error)
                await asyncio.sleep(RETRY_S)

    async def _keep_alive(self) -> None:
        """Keep our entries fresh, take over those of silent replicas, publish the queue's depth."""
        while True:
            await asyncio.sleep(self.heartbeat_s / 3)
            try:
                await self.queue.keep(sorted(self.held))
                free = self.slots - len(self.rendering)
                if free > 0:
                    taken = await self.queue.reclaim(self.heartbeat_s, free)
                    JOBS_RECLAIMED.inc(len(taken))
                    self._spawn(taken)
                waiting, pending = await self.queue.depth()
                JOBS_WAITING.set(waiting)
                for consumer, count in pending.items():
                    JOBS_PENDING.labels(consumer=consumer).set(count)
            except QueueDown as error:
                logger.warning("job queue unreachable (%s)", error)

    def _spawn(self, deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            self.held.add(delivery.entry)
            self.rendering.add(delivery.entry)
            task = asyncio.ensure_future(self._run(delivery))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _retrying(self, operation, *args, **kwargs):
        """Redis operations that must happen (a finished job's record, its acknowledgement): retried until
        Redis answers again, so nothing already rendered is lost while it is down."""
        while True:
            try:
                return await operation(*args, **kwargs)
            except QueueDown as error:
                logger.warning("job queue unreachable (%s); retrying", error)
                await asyncio.sleep(RETRY_S)

    async def _run(self, delivery: Delivery) -> None:
        """Render, store, finish, acknowledge. Anything unexpected leaves the entry pending and no longer kept
        alive: a replica takes it over after the heartbeat timeout (the delivery cap bounds the retries)."""
        token = request_id.set(delivery.job_id)
        try:
            picked = time.time()
            job = await self._job_to_run(delivery)
            if job is not None:
                started = asyncio.ensure_future(self._send(job, "started"))  # retries must not hold the render
                status, fields = await self._render(job, queued_ms=1000 * (picked - job.created))
                await self._retrying(self.queue.finish, job.id, status, **fields)
                self.changed(job.id)
                JOBS_FINISHED.labels(status=status.value).inc()
                logger.info("job %s", status)
                self.rendering.discard(delivery.entry)
                await started
            await self._send_completion(delivery.job_id)
            await self._retrying(self.queue.acknowledge, delivery.entry)
        except Exception:  # noqa: BLE001 - e.g. the results store failed: another attempt, not a lost job
            logger.exception("job not finished; left pending for another attempt")
        finally:
            self.rendering.discard(delivery.entry)
            self.held.discard(delivery.entry)
            request_id.reset(token)

    async def _job_to_run(self, delivery: Delivery) -> Job | None:
        """The job, marked running here; None when there is nothing to render (finished, cancelled while
        queued, expired, taken over too often)."""
        found = await self._retrying(self.queue.start, delivery.job_id)
        if found is None or found in FINISHED:
            return None
        if delivery.deliveries > self.max_deliveries:
            await self._retrying(
                self.queue.finish,
                delivery.job_id,
                JobStatus.failed,
                outcome="error",
                error=f"given up after {delivery.deliveries} deliveries: the replicas rendering it "
                f"stopped answering each time",
            )
            JOBS_FINISHED.labels(status=JobStatus.failed.value).inc()
            return None
        job = await self._retrying(self.queue.get, delivery.job_id)
        if job.cancel_requested:
            await self._retrying(
                self.queue.finish, job.id, JobStatus.cancelled, outcome="cancelled", error="cancelled while running"
            )
            return None
        return job

    async def _render(self, job: Job, queued_ms: float) -> tuple[JobStatus, dict]:
        """The job's end and the record's fields, `timings_ms` (queued, render, store) among them."""
        started = time.perf_counter()
        status, fields = await self._render_only(job)
        timings = {"queued": queued_ms, "render": 1000 * (time.perf_counter() - started)}
        if status is JobStatus.succeeded:
            started = time.perf_counter()
            fields["result_key"] = await self.results.put(job.id, fields.pop("image"), fields["media_type"])
            timings["store"] = 1000 * (time.perf_counter() - started)
        return status, {**fields, "timings_ms": json.dumps(timings)}

    async def _render_only(self, job: Job) -> tuple[JobStatus, dict]:
        item = WorkItem(
            **job.request.model_dump(),
            conditioning=await self._conditioning(job),
            protocol="jobs",
            request_id=job.id,
            arrived=time.time(),
        )
        render = asyncio.ensure_future(self.gateway.render(item))
        cancelled = False
        try:
            cancelled = await self._watch(job, render)
            result: Result = await render
        except asyncio.CancelledError:
            if not cancelled:  # this replica stops: the worker drops the render, the entry stays pending
                render.cancel()
                raise
            return JobStatus.cancelled, {"outcome": Status.cancelled.value, "error": "cancelled while running"}
        except Rejected as error:
            return JobStatus.failed, {"outcome": error.outcome, "error": error.message}
        if result.status is Status.cancelled:
            return JobStatus.cancelled, {"outcome": result.status.value, "error": result.message}
        if not result.ok:
            return JobStatus.failed, {"outcome": result.status.value, "error": result.reason}
        return JobStatus.succeeded, {"image": result.image, "media_type": result.media_type, "step": job.total}

    async def _conditioning(self, job: Job) -> Conditioning | None:
        """An image job's pictures, read back from the results store (any replica can run the job; a store that
        fails leaves the entry pending, taken over later like any unexpected failure)."""
        if not job.inputs:
            return None
        pictures = {name: await self.results.read(key) for name, key in job.inputs.items()}
        encoded = {name: base64.b64encode(data).decode() for name, data in pictures.items()}
        return Conditioning.model_construct(image=encoded["image"], mask=encoded.get("mask"), strength=job.strength)

    async def _watch(self, job: Job, render: asyncio.Future) -> bool:
        """Report progress until the render ends; cancel it when asked (True)."""
        step = 0
        while not render.done():
            await asyncio.wait({render}, timeout=WATCH_S)
            try:
                if await self.queue.cancel_requested(job.id):
                    render.cancel()
                    return True
                if (now := await self.gateway.progress(job.id)) > step:
                    step = now
                    await self.queue.update(job.id, step=step)
                    self.changed(job.id)
            except QueueDown:
                pass  # progress is best effort; the render goes on while Redis is away
        return False

    async def _send(self, job: Job, event: str) -> None:
        if job.webhook and event in job.webhook_events:
            body = json.dumps({"event": event, "job": await job_view(job, self.results)}).encode()
            await self.webhooks.deliver(job.webhook, f"{job.id}.{event}", body)

    async def _send_completion(self, job_id: str) -> None:
        """The completion webhook, once per job (also for a job finished by a replica that then died)."""
        job = await self._retrying(self.queue.get, job_id)
        if job is not None and job.finished and job.webhook and not job.webhook_sent:
            await self._send(job, "completed")
            await self._retrying(self.queue.note, job_id, webhook_sent=True)
