"""Everything under /v1, mounted on the front: OpenAI's Images API and the jobs API, both answering errors in
OpenAI's shape ({"error": {"message", "type", "param", "code"}}: `param` names the field, `code` the outcome)."""

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from service.fronts import jobs_front, openai_front
from service.gateway import Rejected

app = FastAPI(title="flux-serve /v1: OpenAI-compatible Images API and async jobs")
app.include_router(openai_front.router)
app.include_router(jobs_front.router)
app.add_exception_handler(RequestValidationError, openai_front.invalid_request)
app.add_exception_handler(Rejected, openai_front.rejected)
