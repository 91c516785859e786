"""A job: the request it runs, where it is in its life, and how it is stored (one Redis hash per job)."""

import json
import time
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, Field, HttpUrl

from service.schema import DEFAULT_STRENGTH, GenerationRequest, ImageRequest, WorkItem


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


FINISHED = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})
WebhookEvent = Literal["started", "completed"]


class JobRequest(GenerationRequest):
    """The txt2img body (or /img2img's, with `image`), plus where to report the job's end (and its start)."""

    image: Annotated[str | None, Field(description="as /img2img: the input picture, base64 (an image job)")] = None
    mask: Annotated[str | None, Field(description="as /img2img: white repainted, black kept")] = None
    strength: Annotated[float | None, Field(description=f"as /img2img (default {DEFAULT_STRENGTH})")] = None

    webhook: Annotated[
        HttpUrl | None, Field(description="POSTed the job record, signed (hosts: FLUX_WEBHOOK_HOSTS)")
    ] = None
    webhook_events: Annotated[list[WebhookEvent], Field(min_length=1, description="when to call the webhook")] = [
        "completed"
    ]

    def work_item(self) -> WorkItem:
        """The request as the worker takes it; an image job's pictures checked as /img2img checks them
        (pydantic's ValidationError otherwise)."""
        text = self.model_dump(exclude={"webhook", "webhook_events", "image", "mask", "strength"})
        if self.image is None:
            if self.mask is not None or self.strength is not None:
                raise ValueError("image: mask and strength need an image")
            return WorkItem(**text)
        unset = {"width", "height"} - self.model_fields_set  # taken from the image, as /img2img does
        pictures = {"image": self.image, "mask": self.mask, "strength": self.strength or DEFAULT_STRENGTH}
        return ImageRequest(**{k: v for k, v in text.items() if k not in unset}, **pictures).work_item()


class Job(BaseModel):
    id: str
    status: JobStatus = JobStatus.queued
    created: float = Field(default_factory=time.time)
    updated: float = Field(default_factory=time.time)
    step: int = 0
    total: int = 0
    request: GenerationRequest
    inputs: dict[str, str] = {}  # an image job's pictures ("image", "mask") -> their objects in the results store
    strength: float | None = None  # an image job's
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
        values = self.model_dump(mode="json", exclude_none=True)  # a text job has no strength: no field
        return {
            name: json.dumps(value)
            if isinstance(value, (dict, list))
            else str(int(value) if isinstance(value, bool) else value)
            for name, value in values.items()
        }

    @classmethod
    def from_hash(cls, fields: dict[str, str]) -> "Job":
        values = {
            name: json.loads(value) if name in ("request", "inputs", "webhook_events", "timings_ms") else value
            for name, value in fields.items()
        }
        values |= {name: values.get(name) == "1" for name in ("webhook_sent", "cancel_requested")}
        return cls.model_validate(values)
