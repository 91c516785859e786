"""A job: the request it runs, where it is in its life, and how it is stored (one Redis hash per job)."""

import json
import time
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, Field, HttpUrl

from service.schema import GenerationRequest


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


FINISHED = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})
WebhookEvent = Literal["started", "completed"]


class JobRequest(GenerationRequest):
    """The txt2img body, plus where to report the job's end (and optionally its start)."""

    webhook: Annotated[
        HttpUrl | None, Field(description="POSTed the job record, signed (hosts: FLUX_WEBHOOK_HOSTS)")
    ] = None
    webhook_events: Annotated[list[WebhookEvent], Field(min_length=1, description="when to call the webhook")] = [
        "completed"
    ]

    def generation(self) -> GenerationRequest:
        return GenerationRequest(**self.model_dump(exclude={"webhook", "webhook_events"}))


class Job(BaseModel):
    id: str
    status: JobStatus = JobStatus.queued
    created: float = Field(default_factory=time.time)
    updated: float = Field(default_factory=time.time)
    step: int = 0
    total: int = 0
    request: GenerationRequest
    webhook: str = ""
    webhook_events: list[WebhookEvent] = ["completed"]
    webhook_sent: bool = False  # the completion webhook was delivered (or given up)
    consumer: str = ""  # the replica rendering it
    cancel_requested: bool = False
    outcome: str = ""  # why it failed or was cancelled (an outcome of service.fronts.outcomes)
    error: str = ""
    result_key: str = ""  # the result object in the results store
    media_type: str = ""
    timings_ms: dict[str, float] = {}  # where a finished job's time went: queued, render, store

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def to_hash(self) -> dict[str, str]:
        """Every field as a string, the way a Redis hash holds it."""
        values = self.model_dump(mode="json")
        return {
            name: json.dumps(value)
            if isinstance(value, (dict, list))
            else str(int(value) if isinstance(value, bool) else value)
            for name, value in values.items()
        }

    @classmethod
    def from_hash(cls, fields: dict[str, str]) -> "Job":
        values = {
            name: json.loads(value) if name in ("request", "webhook_events", "timings_ms") else value
            for name, value in fields.items()
        }
        values |= {name: values.get(name) == "1" for name in ("webhook_sent", "cancel_requested")}
        return cls.model_validate(values)
