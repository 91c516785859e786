"""OpenAI-compatible Images API (`POST /v1/images/generations`, `POST /v1/images/edits`, `GET /v1/models`), a
router of the /v1 app.

It only translates: an OpenAI request into the WorkItems of one call (image k with seed + k), the Results
back into OpenAI's response, and every failure into OpenAI's error object, so SDK exceptions carry the
message and the field (`param`). Edits come as multipart forms (the SDK's `images.edit`): OpenAI's mask
repaints where it is transparent, so it becomes our mask (white where its alpha is 0); with no mask, the
image's own transparent pixels are the mask, and an opaque image is redrawn whole at `strength`.
"""

import base64
import json
import time
from typing import Annotated, Literal

import bentoml
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError

from service.fronts.outcomes import http_status, retry_headers
from service.gateway import Gateway, Rejected
from service.jobs.results import ResultStore
from service.observe import REQUEST_ID_HEADER, new_request_id
from service.pictures import PictureError, transparent_as_mask
from service.runtime.result import Result
from service.schema import (
    MAX_LORAS,
    MAX_PROMPT_CHARS,
    CachePolicy,
    GenerationRequest,
    ImageFormat,
    ImageRequest,
    LoraWeight,
    WorkItem,
    field_path,
    first_problem,
)

OWNER = "flux-serve"


class ImagesRequest(BaseModel):
    """OpenAI's image generation request; `steps`, `guidance` and `seed` are this server's extensions."""

    model_config = ConfigDict(extra="forbid")

    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
    model: str | None = Field(None, description="the served artifact's name (GET /v1/models); default: it")
    n: Annotated[
        StrictInt, Field(ge=1, description="images of this prompt, seeds seed..seed+n-1, batched together")
    ] = 1
    size: Annotated[str, Field(pattern=r"^\d{2,4}x\d{2,4}$", description="WIDTHxHEIGHT")] = "1024x1024"
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: ImageFormat = ImageFormat.png
    output_compression: Annotated[StrictInt, Field(ge=1, le=100, description="JPEG/WebP quality")] = 90
    user: str | None = None
    steps: Annotated[
        StrictInt | None,
        Field(ge=1, le=100, description="extension: denoising steps (unset: the served model's default)"),
    ] = None
    guidance: Annotated[
        StrictFloat | None,
        Field(ge=0.0, le=20.0, description="extension: guidance scale, FLUX.1-dev only (unset: 3.5)"),
    ] = None
    seed: Annotated[StrictInt, Field(ge=0, lt=2**63, description="extension: seed of the first image")] = 0
    loras: Annotated[list[LoraWeight], Field(max_length=MAX_LORAS, description="extension: LoRA stack")] = []
    cache: Annotated[CachePolicy | None, Field(description="extension: step caching (off, balanced, fast)")] = None


class EditsRequest(ImagesRequest):
    """OpenAI's image edit request (the form's fields but its files); `strength` is this server's extension."""

    size: Annotated[str, Field(pattern=r"^(\d{2,4}x\d{2,4}|auto)$", description="WIDTHxHEIGHT; auto: the image's")] = (
        "auto"
    )
    strength: Annotated[
        StrictFloat, Field(gt=0.0, le=1.0, description="extension: how much of the schedule redraws the image")
    ] = 1.0


class OpenAIError(Exception):
    """An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self, rid: str = "") -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        headers = {**({REQUEST_ID_HEADER: rid} if rid else {}), **retry_headers(self.code)}
        return JSONResponse(body, status_code=self.status, headers=headers)


def param_of(field: str | None) -> str | None:
    """Our field names as the OpenAI request calls them."""
    return {"width": "size", "height": "size", "quality": "output_compression", "format": "output_format"}.get(
        field, field
    )


def served_model() -> bentoml.models.Model:
    return bentoml.get_current_service().model


def work_items(body: ImagesRequest, rid: str, pictures: dict[str, str] | None = None) -> list[WorkItem]:
    """The call's items: the generation request (or, with `pictures`, the image request) of each of n seeds."""
    if body.response_format == "url" and bentoml.get_current_service().results is None:
        raise OpenAIError(
            400,
            "response_format 'url' needs a results store (FLUX_RESULTS_URL); none is configured on this server",
            "response_format",
            "unsupported_value",
        )
    fields = {
        "prompt": body.prompt,
        **({} if body.size == "auto" else dict(zip(("width", "height"), map(int, body.size.split("x")), strict=True))),
        **{name: getattr(body, name) for name in ("steps", "guidance", "seed", "loras", "cache")},
        "format": body.output_format,
        "quality": body.output_compression,
    }
    try:
        if pictures is None:
            item = WorkItem(**GenerationRequest(**fields).model_dump(), protocol="openai")
        else:
            item = ImageRequest(**fields, **pictures, strength=body.strength).work_item(protocol="openai")
    except ValidationError as error:
        field, message = first_problem(error)
        param = param_of(field.split(".")[0].split("[")[0])
        raise OpenAIError(400, f"{param}: {message}", param, "invalid_value") from None
    item = item.model_copy(update={"request_id": rid, "arrived": time.time()})
    return [item.model_copy(update={"seed": body.seed + k}) for k in range(body.n)]


async def image_data(results: list[Result], body: ImagesRequest, rid: str) -> list[dict]:
    """Each image inline, or stored in the results store and handed out as a presigned URL."""
    if body.response_format == "b64_json":
        return [{"b64_json": base64.b64encode(result.image).decode()} for result in results]
    store: ResultStore = bentoml.get_current_service().results
    keys = [await store.put(f"openai/{rid}-{k}", result.image, result.media_type) for k, result in enumerate(results)]
    return [{"url": (await store.presigned(key))[0]} for key in keys]


async def images_response(results: list[Result], body: ImagesRequest, rid: str) -> dict:
    failed = next((result for result in results if not result.ok), None)
    if failed is not None:
        raise OpenAIError(http_status(failed.status), failed.reason, failed.field, failed.status)
    data = await image_data(results, body, rid)
    return {"created": int(time.time()), "data": data, "output_format": body.output_format.value, "size": body.size}


router = APIRouter()


async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    if first["type"] == "json_invalid":  # its location is a character position, not a field
        return OpenAIError(400, f"the body is not valid JSON: {first['msg']}", None, "invalid_json").response()
    field = field_path(tuple(part for part in first["loc"] if part != "body")) or None
    return OpenAIError(400, f"{field}: {first['msg']}" if field else first["msg"], field, "invalid_value").response()


def as_openai_error(error: Rejected, param: str | None) -> OpenAIError:
    """What the gateway refused, in OpenAI's shape: `code` is the outcome, `param` the field."""
    return OpenAIError(http_status(error.outcome), error.message, param, error.outcome)


async def rejected(request: Request, error: Rejected) -> JSONResponse:
    """For the /v1 routes that take our own request fields (jobs): `param` is our field's name."""
    return as_openai_error(error, error.field).response()


@router.post("/images/generations")
async def generate_images(body: ImagesRequest, request: Request) -> JSONResponse:
    rid = new_request_id(request.headers.get(REQUEST_ID_HEADER))
    gateway: Gateway = bentoml.get_current_service().gateway
    try:
        check_model(body.model)
        results = await gateway.render_group(work_items(body, rid), caller_left=request.is_disconnected)
        return JSONResponse(await images_response(results, body, rid), headers={REQUEST_ID_HEADER: rid})
    except Rejected as error:
        return as_openai_error(error, param_of(error.field)).response(rid)
    except OpenAIError as error:
        return error.response(rid)


@router.post("/images/edits")
async def edit_images(request: Request) -> JSONResponse:
    rid = new_request_id(request.headers.get(REQUEST_ID_HEADER))
    gateway: Gateway = bentoml.get_current_service().gateway
    try:
        body, pictures = await edit_form(request)
        check_model(body.model)
        results = await gateway.render_group(work_items(body, rid, pictures), caller_left=request.is_disconnected)
        return JSONResponse(await images_response(results, body, rid), headers={REQUEST_ID_HEADER: rid})
    except Rejected as error:
        return as_openai_error(error, param_of(error.field)).response(rid)
    except OpenAIError as error:
        return error.response(rid)


async def edit_form(request: Request) -> tuple[EditsRequest, dict[str, str]]:
    """The form's fields as an EditsRequest, and its files as our `image` and `mask` (base64)."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise OpenAIError(400, "edits take a multipart/form-data body (image, mask, prompt, ...)", None, "invalid_body")
    form = await request.form()
    uploads = [(name, value) for name, value in form.multi_items() if hasattr(value, "read")]
    if sum(name in ("image", "image[]") for name, _ in uploads) > 1:
        raise OpenAIError(400, "image: one image is taken (FLUX edits one picture)", "image", "invalid_value")
    files = {name.removesuffix("[]"): await value.read() for name, value in uploads}
    fields = {name: form_value(name, value) for name, value in form.multi_items() if not hasattr(value, "read")}
    try:
        body = EditsRequest.model_validate(fields)
    except ValidationError as error:
        param, message = first_problem(error)
        raise OpenAIError(400, f"{param}: {message}", param, "invalid_value") from None
    image = files.get("image")
    if image is None:
        raise OpenAIError(400, "image: an image file is required", "image", "invalid_value")
    try:
        mask = transparent_as_mask(files.get("mask") or image, required="mask" in files)
    except PictureError as error:
        param = "mask" if "mask" in files else "image"
        raise OpenAIError(400, f"{param}: {error}", param, "invalid_value") from None
    pictures = {"image": base64.b64encode(image).decode()}
    return body, pictures | ({"mask": base64.b64encode(mask).decode()} if mask else {})


FORM_TYPES = {"n": int, "steps": int, "seed": int, "output_compression": int, "guidance": float, "strength": float}


def form_value(name: str, text: str):
    """A form field (always text) as the request's type: numbers parsed, `loras` as JSON; what does not parse
    stays text, for validation to name."""
    try:
        return json.loads(text) if name == "loras" else FORM_TYPES.get(name, str)(text)
    except ValueError:
        return text


def check_model(name: str | None) -> None:
    model = served_model()
    if name not in (None, model.tag.name, str(model.tag)):
        raise OpenAIError(
            404, f"The model '{name}' does not exist; this server serves '{model.tag.name}'", "model", "model_not_found"
        )


@router.get("/models")
async def list_models() -> dict:
    model = served_model()
    created = int(model.info.creation_time.timestamp())
    return {
        "object": "list",
        "data": [{"id": model.tag.name, "object": "model", "created": created, "owned_by": OWNER}],
    }
