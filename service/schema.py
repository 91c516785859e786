"""The request every protocol accepts: typed, documented, bounded; and the limits the plan adds."""

from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_PROMPT_CHARS = 2000  # T5 reads 512 tokens; longer prompts are refused, not silently cut
MAX_LORAS = 8


def field_path(location: tuple) -> str:
    """A pydantic error location as the request spells it: ("loras", 1, "name") -> "loras[1].name"."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in location).lstrip(".")


class ImageFormat(StrEnum):
    png = "png"
    jpeg = "jpeg"
    webp = "webp"


class LoraWeight(BaseModel):
    """One adapter of a request's LoRA stack."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+)?$",
                               description="adapter in the model store (`python -m quantize lora add`), "
                               "NAME or NAME:VERSION; /info lists them")]
    scale: Annotated[float, Field(ge=-4.0, le=4.0, description="strength: multiplies the adapter's update")] = 1.0


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field ("sede") is refused, not ignored

    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="What to draw")]
    width: Annotated[int, Field(ge=64, le=2048, multiple_of=16, description="Pixels, a multiple of 16; the "
                                "deployment's largest side is on /info")] = 1024
    height: Annotated[int, Field(ge=64, le=2048, multiple_of=16, description="Pixels, a multiple of 16")] = 1024
    steps: Annotated[int, Field(ge=1, le=100, description="Denoising steps")] = 28
    guidance: Annotated[float, Field(ge=0.0, le=20.0, description="Distilled guidance scale")] = 3.5
    seed: Annotated[int, Field(ge=0, lt=2**63, description="Same seed, same image, alone or in a batch")] = 0
    format: Annotated[ImageFormat, Field(description="Encoding of the returned image")] = ImageFormat.png
    quality: Annotated[int, Field(ge=1, le=100, description="JPEG/WebP quality (ignored for PNG)")] = 90
    loras: Annotated[list[LoraWeight], Field(max_length=MAX_LORAS, description="LoRA adapters applied together, in "
                                             "order; requests with different stacks share batches")] = []

    @field_validator("prompt")
    @classmethod
    def prompt_not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("prompt must not be blank")
        return prompt

    @property
    def shape(self) -> tuple[int, int, int, float]:
        """Requests with the same shape run as one pipeline call."""
        return (self.height, self.width, self.steps, self.guidance)

    @property
    def side(self) -> int:
        return max(self.height, self.width)


class WorkItem(GenerationRequest):
    """A request as the batching worker sees it: who sent it, an id to follow or cancel it, and when it
    arrived and must be done by (wall-clock seconds)."""

    protocol: str = "http"
    request_id: str = ""
    arrived: float = 0.0
    deadline: float | None = None


class Refused(ValueError):
    """A request this deployment will not run; `field` names what to change."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


class Limits(BaseModel):
    """What the placement plan lets this deployment serve."""

    max_side: int
    max_batch: dict[int, int]  # resolution bucket -> largest batch the plan allows

    def check(self, items: list[GenerationRequest]) -> None:
        """Images of one call: each within the largest side, and together within one batch of their size."""
        for field in ("width", "height"):
            if (value := max(getattr(item, field) for item in items)) > self.max_side:
                raise Refused(field, f"{value} is larger than this deployment serves (largest side: {self.max_side})")
        side = max(item.side for item in items)
        batch = next(batch for bucket, batch in sorted(self.max_batch.items()) if bucket >= side)
        if len(items) > batch:
            raise Refused("n", f"{len(items)} images at {items[0].width}x{items[0].height} in one call: this "
                               f"deployment renders at most {batch} together at that size")
