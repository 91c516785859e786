"""The request every protocol accepts: typed, documented, bounded; and the limits the plan adds."""

import base64
import binascii
import re
import unicodedata
from enum import StrEnum
from functools import cached_property
from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from models.variants import VARIANTS, Variant
from service.pictures import MAX_SIDE, PictureError, picture_size, read_image, read_mask

MAX_PROMPT_CHARS = 2000  # FLUX.1-dev's T5 reads 512 tokens; longer prompts are refused, not silently cut
MAX_LORAS = 8
DEFAULT_STRENGTH = 0.8  # of an image request that leaves it unset (Replicate's FLUX img2img default)


def field_path(location: tuple) -> str:
    """A pydantic error location as the request spells it: ("loras", 1, "name") -> "loras[1].name"."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in location).lstrip(".")


def first_problem(error: ValidationError) -> tuple[str, str]:
    """The first error of `error` as (field, message). A check of the whole request (a mask's size against its
    image's) has no location; its message starts with the field it names ("mask: ...")."""
    first = error.errors()[0]
    message = first["msg"].removeprefix("Value error, ")
    return field_path(first["loc"]) or message.split(":")[0], message


def check_prompt(prompt: str) -> str:
    """Not blank, and no control characters but tab and line breaks (a NUL, escape codes, lone surrogates)."""
    if not prompt.strip():
        raise ValueError("prompt must not be blank")
    for position, char in enumerate(prompt):
        if char not in "\t\n\r" and unicodedata.category(char) in ("Cc", "Cs"):
            raise ValueError(f"control character U+{ord(char):04X} at position {position} is not allowed")
    return prompt


class ImageFormat(StrEnum):
    png = "png"
    jpeg = "jpeg"
    webp = "webp"


class CachePolicy(StrEnum):
    """Step caching: `off` computes every step; `balanced` and `fast` skip the transformer's remaining blocks
    at steps where the image's first-block residual barely changed (service/runtime/blocks.py)."""

    off = "off"
    balanced = "balanced"
    fast = "fast"


class LoraWeight(BaseModel):
    """One adapter of a request's LoRA stack."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[
        str,
        Field(
            min_length=1,
            max_length=200,
            pattern=r"^[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+)?$",
            description="adapter in the model store (`python -m quantize lora add`), "
            "NAME or NAME:VERSION; /info lists them",
        ),
    ]
    scale: Annotated[StrictFloat, Field(ge=-4.0, le=4.0, description="strength: multiplies the adapter's update")] = 1.0


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field ("sede") is refused, not ignored

    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="What to draw")]
    width: Annotated[
        StrictInt,
        Field(
            ge=64,
            le=MAX_SIDE,
            multiple_of=16,
            description="Pixels, a multiple of 16; the deployment's largest side is on /info",
        ),
    ] = 1024
    height: Annotated[StrictInt, Field(ge=64, le=MAX_SIDE, multiple_of=16, description="Pixels, a multiple of 16")] = (
        1024
    )
    steps: Annotated[
        StrictInt | None,
        Field(
            ge=1,
            le=100,
            description="Denoising steps; unset: the served model's "
            "default (FLUX.1-dev 28, at most 100; FLUX.1-schnell 4, at most 12; /info)",
        ),
    ] = None
    guidance: Annotated[
        StrictFloat | None,
        Field(
            ge=0.0,
            le=20.0,
            description="Distilled guidance scale, FLUX.1-dev only "
            "(unset: 3.5); FLUX.1-schnell has none: leave it unset or 0",
        ),
    ] = None
    seed: Annotated[StrictInt, Field(ge=0, lt=2**63, description="Same seed, same image, alone or in a batch")] = 0
    format: Annotated[ImageFormat, Field(description="Encoding of the returned image")] = ImageFormat.png
    quality: Annotated[StrictInt, Field(ge=1, le=100, description="JPEG/WebP quality (ignored for PNG)")] = 90
    loras: Annotated[
        list[LoraWeight],
        Field(
            max_length=MAX_LORAS,
            description="LoRA adapters applied together, in order; requests with different stacks share batches",
        ),
    ] = []

    cache: Annotated[
        CachePolicy | None,
        Field(
            description="Step caching: off, balanced or fast (fewer transformer evaluations, a slightly different "
            "image); unset: the deployment's default (/info). The same bytes alone or in any batch"
        ),
    ] = None

    @field_validator("prompt")
    @classmethod
    def prompt_is_text(cls, prompt: str) -> str:
        return check_prompt(prompt)

    @property
    def shape(self) -> tuple[int, int, int, float]:
        """Requests with the same shape run as one pipeline call."""
        return (self.height, self.width, self.steps, self.guidance)

    @property
    def side(self) -> int:
        return max(self.height, self.width)


DATA_URL = re.compile(r"^data:[\w/+.-]+;base64,")


def picture_bytes(text: str) -> bytes:
    """A picture's bytes from its base64 text (a `data:image/png;base64,` prefix allowed)."""
    try:
        return base64.b64decode(DATA_URL.sub("", text, count=1), validate=True)
    except binascii.Error as error:
        raise ValueError(f"not base64 ({error})") from None


def refuse_picture(check, text: str) -> str:
    """`check` (a reader of service.pictures) on the picture in `text`; a refusal as the field's validation error."""
    try:
        check(picture_bytes(text), MAX_SIDE)
    except PictureError as error:
        raise ValueError(str(error)) from None
    return text


class Conditioning(BaseModel):
    """What an image request starts from: a picture, how much of the schedule redraws it, and which pixels to
    repaint. Masks: white (≥ 128 as gray) is repainted, black kept; the same size as the image."""

    model_config = ConfigDict(extra="forbid")

    image: Annotated[str, Field(description="The input picture: PNG, JPEG or WebP, base64 (or a data: URL)")]
    strength: Annotated[
        StrictFloat,
        Field(
            gt=0.0,
            le=1.0,
            description="How much of the schedule redraws the image: 1 draws from noise (the image only "
            "where the mask keeps it), 0.3 keeps most of it; the request runs about strength × steps steps",
        ),
    ] = DEFAULT_STRENGTH
    mask: Annotated[
        str | None,
        Field(description="Which pixels are repainted (white) and kept (black); unset: all of them are redrawn"),
    ] = None

    @field_validator("image")
    @classmethod
    def image_readable(cls, image: str) -> str:
        return refuse_picture(read_image, image)

    @field_validator("mask")
    @classmethod
    def mask_readable(cls, mask: str | None) -> str | None:
        return mask if mask is None else refuse_picture(read_mask, mask)

    @model_validator(mode="after")
    def mask_fits_image(self) -> "Conditioning":
        if self.mask is not None and (size := picture_size(self.mask_bytes, MAX_SIDE)) != self.size:
            raise ValueError(f"mask: {size[0]}x{size[1]} is not the image's size, {self.size[0]}x{self.size[1]}")
        return self

    @cached_property
    def image_bytes(self) -> bytes:
        return picture_bytes(self.image)

    @property
    def mask_bytes(self) -> bytes | None:
        return None if self.mask is None else picture_bytes(self.mask)

    @cached_property
    def size(self) -> tuple[int, int]:
        """The image's (width, height), as shown."""
        return picture_size(self.image_bytes, MAX_SIDE)


def side_for(pixels: int) -> int:
    """The side a picture of `pixels` is drawn at when the request leaves it unset: down to a multiple of 16."""
    return min(MAX_SIDE, max(64, pixels // 16 * 16))


class ImageRequest(GenerationRequest, Conditioning):
    """An image-to-image or inpainting request. Unset width and height come from the image (down to a multiple of
    16); set and different, the image (and mask) are resized to them, as diffusers' pipelines resize."""

    @model_validator(mode="after")
    def size_from_image(self) -> "ImageRequest":
        width, height = self.size
        for field, pixels in (("width", width), ("height", height)):
            if field not in self.model_fields_set:
                setattr(self, field, side_for(pixels))
        return self

    def work_item(self, **context) -> "WorkItem":
        """The worker's item: the text request's fields, and the conditioning in one place."""
        text = {name: getattr(self, name) for name in GenerationRequest.model_fields}
        pictures = Conditioning.model_construct(**{name: getattr(self, name) for name in Conditioning.model_fields})
        return WorkItem(**text, conditioning=pictures, **context)


class WorkItem(GenerationRequest):
    """A request as the batching worker sees it: what it starts from (an image, for image requests), who sent
    it, an id to follow or cancel it, and when it arrived and must be done by (wall-clock seconds)."""

    conditioning: Conditioning | None = None
    protocol: str = "http"
    request_id: str = ""
    arrived: float = 0.0
    deadline: float | None = None


def with_defaults(item: WorkItem, variant: Variant, cache: CachePolicy | None = None) -> WorkItem:
    """The item with the variant's steps and guidance, and the deployment's cache policy, where it left them
    unset."""
    defaults = (("steps", variant.steps), ("guidance", variant.guidance), ("cache", cache))
    unset = {field: default for field, default in defaults if getattr(item, field) is None and default is not None}
    return item.model_copy(update=unset) if unset else item


class Refused(ValueError):
    """A request this deployment will not run; `field` names what to change."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


class Limits(BaseModel):
    """What this deployment serves: the placement plan's sizes, and the served model's variant."""

    max_side: int
    max_batch: dict[int, int]  # resolution bucket -> largest batch the plan allows
    variant: str = "dev"  # models.architecture.VARIANTS: defaults and bounds of steps, guidance and prompts
    t5_tokens: int | None = None  # what the model's T5 reads, when fewer than its variant's
    model: str | None = None  # what refusals call the served model (its tag); unset: FLUX.1-<variant>

    def admit(self, items: list[WorkItem]) -> list[WorkItem]:
        """The items with the variant's defaults filled in, once they pass `check`."""
        admitted = [with_defaults(item, VARIANTS[self.variant]) for item in items]
        self.check(admitted)
        return admitted

    def check(self, items: list[GenerationRequest]) -> None:
        """Images of one call: each as the variant takes it, within the largest side, and together within one
        batch of their size."""
        for item in items:
            self.check_variant(item)
            self.check_picture(item)
        for field in ("width", "height"):
            if (value := max(getattr(item, field) for item in items)) > self.max_side:
                raise Refused(field, f"{value} is larger than this deployment serves (largest side: {self.max_side})")
        side = max(item.side for item in items)
        batch = next(batch for bucket, batch in sorted(self.max_batch.items()) if bucket >= side)
        if len(items) > batch:
            raise Refused(
                "n",
                f"{len(items)} images at {items[0].width}x{items[0].height} in one call: this "
                f"deployment renders at most {batch} together at that size",
            )

    def check_picture(self, item: GenerationRequest) -> None:
        """An input image within this deployment's largest side."""
        conditioning = getattr(item, "conditioning", None)
        if conditioning is not None and max(size := conditioning.size) > self.max_side:
            raise Refused(
                "image", f"{size[0]}x{size[1]} is larger than this deployment serves (largest side: {self.max_side})"
            )

    def check_variant(self, item: GenerationRequest) -> None:
        """FLUX.1-schnell: no guidance, at most 12 steps, prompts within its 256 T5 tokens."""
        variant = VARIANTS[self.variant].reading(self.t5_tokens)
        if item.guidance and not variant.takes_guidance:
            raise Refused(
                "guidance",
                f"FLUX.1-{variant.name} has no guidance embedding: leave guidance unset or 0 (got {item.guidance})",
            )
        if item.steps and item.steps > variant.max_steps:
            raise Refused(
                "steps",
                f"{item.steps} is more than FLUX.1-{variant.name} takes (at most "
                f"{variant.max_steps}; default {variant.steps})",
            )
        max_chars = MAX_PROMPT_CHARS * variant.max_sequence_length // VARIANTS["dev"].max_sequence_length
        if len(item.prompt) > max_chars:
            raise Refused(
                "prompt",
                f"{len(item.prompt)} characters: {self.model or f'FLUX.1-{variant.name}'} reads "
                f"{variant.max_sequence_length} T5 tokens, so at most {max_chars} characters",
            )
