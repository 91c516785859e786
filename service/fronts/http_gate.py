"""What every HTTP call of the front passes first: a request id, then the checks no route should repeat.

- every call gets an `x-request-id` (the caller's, when sane), visible to the route and on the response;
- every 4xx is logged with it, also those BentoML's own validation answers;
- while the server drains, new calls get 503 (retryable) and probes and metrics still answer;
- over `max_in_flight` calls at once, a new one gets 429 with `Retry-After` (BentoML's own limit answers
  before any middleware of the service runs: no request id, no `Retry-After`);
- a body over the limit is refused with 413 before it is read whole; a body that is not JSON with 415.
"""

from starlette.responses import JSONResponse

from service.drain import Drain
from service.fronts.auth import OPEN_PATHS
from service.fronts.outcomes import http_status, retry_headers
from service.gateway import over_in_flight
from service.observe import REQUEST_ID_HEADER, logger, new_request_id, request_id

JSON_TYPES = ("application/json",)
IMAGE_PATHS = frozenset({"/img2img", "/v1/images/edits", "/v1/jobs"})  # routes that take pictures: own body limit
MULTIPART_PATHS = frozenset({"/v1/images/edits"})  # OpenAI's edits take multipart/form-data
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def error_response(path: str, outcome: str, message: str, rid: str) -> JSONResponse:
    """In OpenAI's shape under /v1, in the shape of BentoML's validation errors elsewhere."""
    status = http_status(outcome)
    if path.startswith("/v1/"):
        kind = "invalid_request_error" if status < 500 else "server_error"
        body = {"error": {"message": message, "type": kind, "param": None, "code": outcome}}
    else:
        body = {"error": message, "outcome": outcome, "detail": [{"loc": [], "msg": message, "type": outcome}]}
    headers = {REQUEST_ID_HEADER: rid, **retry_headers(outcome)}
    return JSONResponse(body, status_code=status, headers=headers)


class HttpGate:
    """ASGI middleware of the front; `max_body_bytes` bounds every request body but those of the routes that
    take pictures (IMAGE_PATHS), which `max_image_body_bytes` bounds; `max_in_flight` the calls answered at once."""

    def __init__(self, app, drain: Drain, max_body_bytes: int, max_image_body_bytes: int, max_in_flight: int) -> None:
        self.app, self.drain = app, drain
        self.max_body_bytes, self.max_image_body_bytes = max_body_bytes, max_image_body_bytes
        self.max_in_flight, self.in_flight = max_in_flight, 0

    def body_limit(self, path: str) -> int:
        return self.max_image_body_bytes if path in IMAGE_PATHS else self.max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        rid = new_request_id(headers.get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1"))
        scope = {**scope, "headers": [*_without_id(scope["headers"]), (REQUEST_ID_HEADER.encode(), rid.encode())]}
        token = request_id.set(rid)
        try:
            refusal = self._refusal(scope, headers)
            if refusal is None:
                body, refusal = await self._read_body(receive, self.body_limit(scope["path"]))
            if refusal is not None:
                return await self._answer(scope, *refusal, rid, receive, send)
            self.in_flight += 1
            try:
                await self.app(scope, _replay(body, receive), _stamped(send, rid, scope))
            finally:
                self.in_flight -= 1
        finally:
            request_id.reset(token)

    def _refusal(self, scope, headers: dict[bytes, bytes]) -> tuple[str, str] | None:
        """(outcome, message) for a call refused before its body is read."""
        if self.drain.draining:
            return "draining", "the server is shutting down: send the request again (another replica answers)"
        if self.in_flight >= self.max_in_flight:
            return "overloaded", over_in_flight(self.max_in_flight)
        if scope["method"] not in BODY_METHODS:
            return None
        length, limit = headers.get(b"content-length", b""), self.body_limit(scope["path"])
        if length.isdigit() and int(length) > limit:
            return "too_large", f"the body is {int(length)} bytes, over this route's {limit}"
        kind = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        multipart = scope["path"] in MULTIPART_PATHS and kind == "multipart/form-data"
        if kind not in JSON_TYPES and not multipart and (length not in (b"", b"0") or b"transfer-encoding" in headers):
            return "unsupported_media_type", f"the body must be JSON (Content-Type: application/json), not {kind!r}"
        return None

    async def _read_body(self, receive, limit: int) -> tuple[bytes, tuple[str, str] | None]:
        """The whole body, or a 413 once it outgrows `limit` (a chunked body states no length)."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size, more = size + len(chunks[-1]), message.get("more_body", False)
            if size > limit:
                return b"", ("too_large", f"the body is over this route's {limit} bytes")
        return b"".join(chunks), None

    async def _answer(self, scope, outcome: str, message: str, rid: str, receive, send) -> None:
        logger.info("%s %s: %d %s", scope["method"], scope["path"], http_status(outcome), message)
        await error_response(scope["path"], outcome, message, rid)(scope, receive, send)


def _without_id(headers: list) -> list:
    return [(name, value) for name, value in headers if name.lower() != REQUEST_ID_HEADER.encode()]


def _replay(body: bytes, receive):
    """`receive` for the route: the body read here, then the connection's own messages (disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed


def _stamped(send, rid: str, scope):
    """`send` that puts the request id on the response and logs a 4xx with it."""

    async def stamped(message) -> None:
        if message["type"] == "http.response.start":
            headers = [*_without_id(message.get("headers", [])), (REQUEST_ID_HEADER.encode(), rid.encode())]
            message = {**message, "headers": headers}
            if 400 <= message["status"] < 500:
                logger.info("%s %s: %d", scope["method"], scope["path"], message["status"])
        await send(message)

    return stamped
