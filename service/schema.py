"""The request every protocol accepts: typed, documented, bounded."""

from typing import Annotated

from pydantic import BaseModel, Field, field_validator

MAX_PROMPT_CHARS = 2000  # T5 reads 512 tokens; longer prompts are refused, not silently cut


class GenerationRequest(BaseModel):
    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="What to draw")]
    width: Annotated[int, Field(ge=64, le=2048, multiple_of=16, description="Pixels, a multiple of 16")] = 1024
    height: Annotated[int, Field(ge=64, le=2048, multiple_of=16, description="Pixels, a multiple of 16")] = 1024
    steps: Annotated[int, Field(ge=1, le=100, description="Denoising steps")] = 28
    guidance: Annotated[float, Field(ge=0.0, le=20.0, description="Distilled guidance scale")] = 3.5
    seed: Annotated[int, Field(ge=0, lt=2**63, description="Same seed, same image, alone or in a batch")] = 0

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


class WorkItem(GenerationRequest):
    """A request as the batching worker sees it: who sent it, and an id to follow or cancel it."""

    protocol: str = "http"
    job_id: str = ""
