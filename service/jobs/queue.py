"""The job queue: a Redis Stream with one consumer group that every replica reads, and a record per job.

An entry stays pending on the replica that read it until that replica acknowledges it (result stored, record
finished); a replica that dies leaves its entries pending, and the others claim them once they have been
idle past the heartbeat timeout. Replicas keep their own entries fresh by re-claiming them while they run.
"""

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, RedisError, TimeoutError

from service.jobs.records import Job, JobStatus
from service.observe import logger

GROUP = "flux"
# queued -> running (this consumer); running -> running (taken over). Returns the status it found.
START = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'queued' or status == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'running', 'consumer', ARGV[1], 'updated', ARGV[2], 'step', '0')
end
return status
"""
# queued -> cancelled at once; running -> cancel requested (its replica stops it). Returns the status found.
CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'outcome', 'cancelled', 'error', 'cancelled while queued',
             'updated', ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
elseif status == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
end
return status
"""


def as_strings(fields: dict) -> dict[str, str]:
    return {name: str(int(value) if isinstance(value, bool) else value) for name, value in fields.items()}


class QueueDown(Exception):
    """Redis did not answer."""


@dataclass(frozen=True)
class Delivery:
    entry: str  # the stream entry's id
    job_id: str
    deliveries: int = 1  # how many times the entry has been handed to a consumer


class JobQueue:
    def __init__(self, url: str, stream: str, consumer: str, retention_s: int) -> None:
        # A command on a connection Redis closed (it restarted) is sent again on a fresh one.
        self.redis = redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=2,
            socket_timeout=10,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
            retry_on_error=[ConnectionError, TimeoutError],
            health_check_interval=5,
        )
        self.stream, self.consumer, self.retention_s = stream, consumer, retention_s
        self._start, self._cancel = self.redis.register_script(START), self.redis.register_script(CANCEL)

    @staticmethod
    def key(job_id: str) -> str:
        return f"flux:job:{job_id}"

    async def call(self, command):
        """Await a Redis command; an unreachable or failing Redis raises QueueDown."""
        try:
            return await command
        except RedisError as error:
            raise QueueDown(f"{type(error).__name__}: {error}") from None

    async def create_group(self) -> None:
        try:
            await self.call(self.redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True))
        except QueueDown as error:
            if "BUSYGROUP" not in str(error):  # the group exists: another replica made it
                raise

    async def in_group(self, command: Callable[[], Awaitable]):
        """Await a consumer-group command. When Redis has lost the group (restarted without its data, or failed
        over to an empty replica: NOGROUP), make it again, from the stream's first entry, and send it once more."""
        try:
            return await self.call(command())
        except QueueDown as error:
            if "NOGROUP" not in str(error):
                raise
        logger.warning("job queue: Redis has no consumer group %r (it lost its data?): creating it again", GROUP)
        await self.create_group()
        return await self.call(command())

    async def submit(self, job: Job, idempotency_key: str | None) -> Job:
        """Record and enqueue `job`; with a key seen before (within the retention), the job it made."""
        if idempotency_key:
            claimed = await self.call(
                self.redis.set(f"flux:idempotency:{idempotency_key}", job.id, nx=True, ex=self.retention_s)
            )
            if not claimed:
                earlier = await self.call(self.redis.get(f"flux:idempotency:{idempotency_key}"))
                return await self.get(earlier) or job
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.key(job.id), mapping=job.to_hash())
            pipe.xadd(self.stream, {"job": job.id})
            await self.call(pipe.execute())
        return job

    async def get(self, job_id: str) -> Job | None:
        fields = await self.call(self.redis.hgetall(self.key(job_id)))
        return Job.from_hash(fields) if fields else None

    async def read(self, count: int, block_ms: int) -> list[Delivery]:
        """Up to `count` entries no consumer has read yet, waiting up to `block_ms` for one."""
        answer = await self.in_group(
            lambda: self.redis.xreadgroup(GROUP, self.consumer, {self.stream: ">"}, count=count, block=block_ms)
        )
        return [Delivery(entry, fields.get("job", "")) for _, entries in answer or [] for entry, fields in entries]

    async def reclaim(self, idle_s: float, count: int) -> list[Delivery]:
        """Entries other consumers left idle longer than `idle_s` (their replica died), now ours."""
        idle_ms = int(idle_s * 1000)
        try:
            _, claimed, *_ = await self.in_group(
                lambda: self.redis.xautoclaim(self.stream, GROUP, self.consumer, idle_ms, count=count)
            )
        except QueueDown as error:
            if "unknown command" not in str(error).lower():
                raise
            claimed = await self._claim_idle(idle_ms, count)  # Redis < 6.2 has no XAUTOCLAIM
        deliveries = []
        for entry, fields in claimed:
            pending = await self.call(self.redis.xpending_range(self.stream, GROUP, entry, entry, 1))
            deliveries.append(
                Delivery(entry, (fields or {}).get("job", ""), pending[0]["times_delivered"] if pending else 1)
            )
        return deliveries

    async def _claim_idle(self, idle_ms: int, count: int) -> list:
        """XAUTOCLAIM's work with XPENDING + XCLAIM (Redis 5.0 to 6.0)."""
        pending = await self.call(self.redis.xpending_range(self.stream, GROUP, "-", "+", count * 10))
        idle = [entry["message_id"] for entry in pending if entry["time_since_delivered"] >= idle_ms][:count]
        return await self.call(self.redis.xclaim(self.stream, GROUP, self.consumer, idle_ms, idle)) if idle else []

    async def keep(self, entries: list[str]) -> None:
        """Reset our entries' idle time: we are alive and working on them."""
        if entries:
            await self.in_group(lambda: self.redis.xclaim(self.stream, GROUP, self.consumer, 0, entries, justid=True))

    async def start(self, job_id: str) -> JobStatus | None:
        """Mark the job running on this replica; the status it had (None: no record, e.g. expired)."""
        status = await self.call(self._start(keys=[self.key(job_id)], args=[self.consumer, time.time()]))
        return JobStatus(status) if status else None

    async def update(self, job_id: str, **fields) -> None:
        """Change the job (its `updated` time with it)."""
        await self.call(self.redis.hset(self.key(job_id), mapping={**as_strings(fields), "updated": time.time()}))

    async def note(self, job_id: str, **fields) -> None:
        """Record bookkeeping that is no change of the job (its `updated` time stays): e.g. webhook sent."""
        await self.call(self.redis.hset(self.key(job_id), mapping=as_strings(fields)))

    async def finish(self, job_id: str, status: JobStatus, **fields) -> None:
        """The job's final state; its record expires after the retention."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                self.key(job_id),
                mapping={
                    "status": status.value,
                    "updated": time.time(),
                    **{name: str(value) for name, value in fields.items()},
                },
            )
            pipe.expire(self.key(job_id), self.retention_s)
            await self.call(pipe.execute())

    async def acknowledge(self, entry: str) -> None:
        """Done with the entry: no replica will render it again."""

        async def acknowledge_and_delete():
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xack(self.stream, GROUP, entry)
                pipe.xdel(self.stream, entry)
                return await pipe.execute()

        await self.in_group(acknowledge_and_delete)

    async def cancel(self, job_id: str) -> JobStatus | None:
        status = await self.call(self._cancel(keys=[self.key(job_id)], args=[time.time(), self.retention_s]))
        return JobStatus(status) if status else None

    async def cancel_requested(self, job_id: str) -> bool:
        return await self.call(self.redis.hget(self.key(job_id), "cancel_requested")) == "1"

    async def depth(self) -> tuple[int, dict[str, int]]:
        """Entries no consumer has read yet, and entries pending per consumer."""
        try:
            groups = await self.call(self.redis.xinfo_groups(self.stream))
        except QueueDown as error:
            if "no such key" in str(error).lower():
                return 0, {}
            raise
        group = next((group for group in groups if group["name"] == GROUP), None)
        if group is None:
            return 0, {}
        consumers = await self.call(self.redis.xinfo_consumers(self.stream, GROUP))
        return int(group.get("lag") or 0), {consumer["name"]: consumer["pending"] for consumer in consumers}

    async def ping(self) -> None:
        await self.call(self.redis.ping())

    async def close(self) -> None:
        await self.redis.aclose()
