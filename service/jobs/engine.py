"""The jobs API every front translates to (submit, look up, cancel, wait, watch), over the queue, the
results store and the webhooks; it runs this replica's JobRunner."""

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator

from pydantic import ValidationError

from service.gateway import Gateway, Rejected
from service.jobs.queue import JobQueue, QueueDown
from service.jobs.records import Job, JobRequest
from service.jobs.results import ResultStore, job_view
from service.jobs.runner import JobRunner
from service.jobs.webhooks import Webhooks
from service.schema import Conditioning, GenerationRequest, Refused, first_problem
from service.settings import Settings

WATCH_POLL_S = 0.05  # how often a watcher looks at a job another replica runs (this replica's wake it at once)


class JobEngine:
    def __init__(self, settings: Settings, gateway: Gateway, results: ResultStore) -> None:
        url = settings.jobs_redis_url
        self.where = f"redis://{url.host}:{url.port or 6379}"  # for messages: no password
        self.queue = JobQueue(
            str(url), settings.jobs_stream, f"{socket.gethostname()}-{os.getpid()}", settings.jobs_retention_s
        )
        self.results = results
        self.webhooks = Webhooks(
            settings.webhook_hosts, settings.webhook_secret, settings.webhook_attempts, settings.webhook_backoff_s
        )
        self.gateway = gateway
        self.watchers: dict[str, set[asyncio.Event]] = {}  # job id -> an event per watcher on this replica
        self.runner = JobRunner(self.queue, self.results, self.webhooks, gateway, settings, self.changed)

    def start(self) -> None:
        """Pull jobs once the worker serves."""
        self._starting = asyncio.ensure_future(self._start_when_ready())

    async def _start_when_ready(self) -> None:
        await self.gateway.wait_for_worker()
        self.runner.start()

    async def stop(self, grace_s: float) -> None:
        self._starting.cancel()
        await self.runner.stop(grace_s)
        await self.queue.close()

    async def _redis(self, command):
        try:
            return await command
        except QueueDown as error:
            raise Rejected("unavailable", f"the job queue ({self.where}) is unreachable: {error}") from None

    async def submit(self, request: JobRequest, idempotency_key: str | None = None) -> Job:
        """Check the request as the synchronous path would, then queue it (or find the key's earlier job)."""
        try:
            if request.webhook:
                self.webhooks.check(str(request.webhook))
            asked = request.work_item()
        except Refused as error:
            raise Rejected("refused", error.message, error.field) from None
        except ValidationError as error:
            field, message = first_problem(error)
            raise Rejected("refused", message, field) from None
        except ValueError as error:
            raise Rejected("refused", str(error).split(": ", 1)[1], "image") from None
        item = self.gateway.check([asked])[0]
        job_id = uuid.uuid4().hex
        inputs = await self._store_inputs(job_id, asked.conditioning)
        job = Job(
            id=job_id,
            request=GenerationRequest(**asked.model_dump(include=set(GenerationRequest.model_fields))),
            inputs=inputs,
            strength=asked.conditioning.strength if asked.conditioning else None,
            total=item.steps,
            webhook=str(request.webhook or ""),
            webhook_events=request.webhook_events,
        )
        return await self._redis(self.queue.submit(job, idempotency_key))

    async def _store_inputs(self, job_id: str, conditioning: Conditioning | None) -> dict[str, str]:
        """An image job's pictures, in the results store before the job is queued: a replica that takes the job
        over reads them from there (they do not live in Redis)."""
        if conditioning is None:
            return {}
        pictures = {"image": conditioning.image_bytes, "mask": conditioning.mask_bytes}
        stored = {name: data for name, data in pictures.items() if data is not None}
        return {name: await self.results.put_input(job_id, name, data) for name, data in stored.items()}

    async def get(self, job_id: str) -> Job:
        job = await self._redis(self.queue.get(job_id))
        if job is None:
            raise Rejected("not_found", f"no job {job_id!r} (unknown, or expired after the retention)", "id")
        return job

    async def cancel(self, job_id: str) -> Job:
        """A queued job is cancelled at once; a running one stops within a step; a finished one is refused."""
        status = await self._redis(self.queue.cancel(job_id))
        if status is None:
            raise Rejected("not_found", f"no job {job_id!r}", "id")
        job = await self.get(job_id)
        if job.finished and status == job.status:
            raise Rejected("already_completed", f"job {job_id} already completed: {job.status}")
        return job

    def changed(self, job_id: str) -> None:
        """This replica changed the job's record: its watchers here look at once, not at their next poll."""
        for event in self.watchers.get(job_id, ()):
            event.set()

    async def watch(self, job_id: str) -> AsyncIterator[Job]:
        """The job each time its status or step changes, until it is finished."""
        seen, event = None, asyncio.Event()
        self.watchers.setdefault(job_id, set()).add(event)
        try:
            while True:
                job = await self.get(job_id)
                if (job.status, job.step) != seen:
                    seen = (job.status, job.step)
                    yield job
                if job.finished:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), WATCH_POLL_S)
                event.clear()
        finally:
            self.watchers[job_id].discard(event)
            if not self.watchers[job_id]:
                del self.watchers[job_id]

    async def wait(self, job_id: str, timeout_s: float) -> Job:
        """The job once finished, or as it is when `timeout_s` has passed."""
        job = await self.get(job_id)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                async for job in self.watch(job_id):
                    pass
        return job

    async def view(self, job: Job) -> dict:
        return await job_view(job, self.results)
