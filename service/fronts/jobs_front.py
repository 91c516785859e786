"""The jobs API over HTTP (`/v1/jobs`): submit (202, `Idempotency-Key`, `Prefer: wait=N`), look up, cancel."""

import re
from typing import Annotated

import bentoml
from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse

from service.gateway import Rejected
from service.jobs.engine import JobEngine
from service.jobs.records import Job, JobRequest

MAX_WAIT_S = 60  # Replicate's bound for `Prefer: wait`: below common ingress idle timeouts

router = APIRouter(prefix="/jobs", tags=["jobs"])


def engine() -> JobEngine:
    jobs = bentoml.get_current_service().jobs
    if jobs is None:
        raise Rejected(
            "not_found", "the jobs API is off on this server (it needs FLUX_JOBS_REDIS_URL and FLUX_RESULTS_URL)"
        )
    return jobs


def wait_seconds(prefer: str | None) -> float:
    """`Prefer: wait=N` (RFC 7240), at most MAX_WAIT_S; 0 without it."""
    found = re.search(r"\bwait=(\d+)", prefer or "")
    return min(int(found.group(1)), MAX_WAIT_S) if found else 0


async def answer(jobs: JobEngine, job: Job) -> JSONResponse:
    """200 with a finished job, 202 with one still queued or running."""
    body = await jobs.view(job)
    return JSONResponse(body, status_code=200 if job.finished else 202, headers={"location": body["urls"]["get"]})


@router.post("", status_code=202, summary="Queue a txt2img request; the result lands in object storage")
async def submit_job(
    body: JobRequest,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
    prefer: Annotated[str | None, Header(description="wait=N: answer when done, up to N s")] = None,
) -> JSONResponse:
    jobs = engine()
    job = await jobs.submit(body, idempotency_key)
    if wait_s := wait_seconds(prefer):
        job = await jobs.wait(job.id, wait_s)
    return await answer(jobs, job)


@router.get("/{job_id}", summary="queued | running (step of total) | succeeded (result URL) | failed | cancelled")
async def get_job(job_id: str) -> JSONResponse:
    jobs = engine()
    return await answer(jobs, await jobs.get(job_id))


@router.post("/{job_id}/cancel", summary="Cancel a queued or running job (409 when it already finished)")
async def cancel_job(job_id: str) -> JSONResponse:
    jobs = engine()
    return await answer(jobs, await jobs.cancel(job_id))
