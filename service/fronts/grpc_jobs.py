"""The jobs API over gRPC (flux.v1.Jobs): translates messages to the job engine and jobs back."""

from pydantic import ValidationError

from service.fronts.grpc_front import describe, picture_fields, request_fields
from service.fronts.outcomes import grpc_code
from service.fronts.stubs import messages, services
from service.gateway import Rejected
from service.jobs.engine import JobEngine
from service.jobs.records import Job, JobRequest


class Jobs(services.JobsServicer):
    def __init__(self, engine: JobEngine) -> None:
        self.engine = engine

    async def SubmitJob(self, request, context):
        try:
            body = JobRequest(
                **request_fields(request.request),
                **(picture_fields(request.request) or {}),
                webhook=request.webhook or None,
                webhook_events=list(request.webhook_events) or ["completed"],
            )
        except ValidationError as error:
            return await context.abort(grpc_code("refused"), describe(error))
        except Rejected as error:
            return await context.abort(grpc_code(error.outcome), error.reason)
        return await self._answer(context, self.engine.submit(body, request.idempotency_key or None))

    async def GetJob(self, request, context):
        return await self._answer(context, self.engine.get(request.id))

    async def CancelJob(self, request, context):
        return await self._answer(context, self.engine.cancel(request.id))

    async def WatchJob(self, request, context):
        try:
            async for job in self.engine.watch(request.id):
                yield await self._message(job)
        except Rejected as error:
            await context.abort(grpc_code(error.outcome), error.reason)

    async def _answer(self, context, operation):
        try:
            return await self._message(await operation)
        except Rejected as error:
            await context.abort(grpc_code(error.outcome), error.reason)

    async def _message(self, job: Job):
        view = await self.engine.view(job)
        result, error = view["result"] or {}, view["error"] or {}
        return messages.Job(
            id=job.id,
            status=messages.JobStatus.Value(f"JOB_STATUS_{job.status.upper()}"),
            step=job.step,
            total_steps=job.total,
            result_url=result.get("url", ""),
            result_expires_at=result.get("expires_at", 0),
            media_type=job.media_type,
            outcome=error.get("outcome", ""),
            error=error.get("message", ""),
            created=job.created,
            updated=job.updated,
        )
