"""Job results in S3-compatible object storage (s3fs), one object per job, handed out as presigned URLs."""

import asyncio
import time

import s3fs

from service.jobs.records import Job

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}


class ResultStore:
    def __init__(self, url: str, endpoint_url: str | None, url_ttl_s: int) -> None:
        """`url`: s3://bucket/prefix; credentials come from the usual AWS variables or instance role."""
        self.fs = s3fs.S3FileSystem(endpoint_url=endpoint_url) if endpoint_url else s3fs.S3FileSystem()
        self.root, self.url_ttl_s = url.removeprefix("s3://").rstrip("/"), url_ttl_s

    def key(self, name: str, media_type: str) -> str:
        """Derived from the name only: a job rendered twice still has exactly one result."""
        return f"{self.root}/{name}.{EXTENSIONS[media_type]}"

    async def put(self, name: str, data: bytes, media_type: str) -> str:
        key = self.key(name, media_type)
        await asyncio.to_thread(self.fs.pipe_file, key, data, ContentType=media_type)
        return key

    async def put_input(self, job_id: str, name: str, data: bytes) -> str:
        """An image job's input picture, kept beside the results until the job's record expires with them."""
        key = f"{self.root}/inputs/{job_id}/{name}"
        await asyncio.to_thread(self.fs.pipe_file, key, data)
        return key

    async def read(self, key: str) -> bytes:
        return await asyncio.to_thread(self.fs.cat_file, key)

    async def presigned(self, key: str) -> tuple[str, float]:
        """A GET URL for the object, and when it stops working (epoch seconds)."""
        url = await asyncio.to_thread(self.fs.url, key, expires=self.url_ttl_s)
        return url, time.time() + self.url_ttl_s


async def job_view(job: Job, store: ResultStore) -> dict:
    """What clients and webhooks see of a job, with a fresh presigned URL for its result and the job's own URLs."""
    result = None
    if job.result_key:
        url, expires_at = await store.presigned(job.result_key)
        result = {"url": url, "expires_at": expires_at, "media_type": job.media_type}
    error = {"outcome": job.outcome, "message": job.error} if job.error else None
    return {
        "id": job.id,
        "status": job.status.value,
        "created": job.created,
        "updated": job.updated,
        "progress": {"step": job.step, "total": job.total},
        "result": result,
        "error": error,
        "webhook": job.webhook or None,
        "timings_ms": job.timings_ms or None,
        "urls": {"get": f"/v1/jobs/{job.id}", "cancel": f"/v1/jobs/{job.id}/cancel"},
    }
