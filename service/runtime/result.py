"""What the worker hands back for each request: an encoded image, or the typed reason there is none."""

from enum import StrEnum

from pydantic import BaseModel


class Status(StrEnum):
    ok = "ok"
    cancelled = "cancelled"  # the caller left (disconnected, cancelled the call)
    does_not_fit = "does_not_fit"  # out of device memory even alone
    deadline = "deadline"  # the request's deadline passed before its image was ready
    error = "error"  # the worker could not run it (e.g. a stored adapter failed its check); the message says why
    refused = "refused"  # names something this deployment does not have (e.g. a LoRA adapter); `field` says what
    non_finite = "non_finite"  # the latents or the decoded image held inf/NaN (e.g. fp16 overflow): no black image


class Result(BaseModel):
    status: Status
    image: bytes = b""
    media_type: str = ""
    message: str = ""
    field: str | None = None  # the request field a refusal is about, e.g. "loras[1].name"
    timings_ms: dict[str, float] = {}  # stage -> milliseconds spent on this request's pipeline call

    @property
    def reason(self) -> str:
        """The message, led by the field it is about."""
        return f"{self.field}: {self.message}" if self.field else self.message

    @property
    def ok(self) -> bool:
        return self.status is Status.ok


def failure(status: Status, message: str, field: str | None = None) -> Result:
    return Result(status=status, message=message, field=field)
