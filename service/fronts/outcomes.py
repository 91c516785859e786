"""Every way a request can end, mapped once to an HTTP status and a gRPC code (the README's outcome table)."""

from http import HTTPStatus

import grpc

from service.gateway import RETRY_AFTER_S
from service.runtime.result import Status

# outcome -> (HTTP status, gRPC code). 499 is nginx's "client closed request": nobody reads it, logs do.
OUTCOMES: dict[str, tuple[int, grpc.StatusCode]] = {
    Status.ok: (HTTPStatus.OK, grpc.StatusCode.OK),
    Status.cancelled: (499, grpc.StatusCode.CANCELLED),
    Status.does_not_fit: (HTTPStatus.UNPROCESSABLE_ENTITY, grpc.StatusCode.FAILED_PRECONDITION),
    Status.deadline: (HTTPStatus.GATEWAY_TIMEOUT, grpc.StatusCode.DEADLINE_EXCEEDED),
    Status.non_finite: (HTTPStatus.INTERNAL_SERVER_ERROR, grpc.StatusCode.INTERNAL),
    Status.refused: (HTTPStatus.BAD_REQUEST, grpc.StatusCode.INVALID_ARGUMENT),  # invalid, or over the plan's limits
    "loading": (HTTPStatus.SERVICE_UNAVAILABLE, grpc.StatusCode.UNAVAILABLE),  # the model is still loading
    "draining": (HTTPStatus.SERVICE_UNAVAILABLE, grpc.StatusCode.UNAVAILABLE),  # SIGTERM: send it again elsewhere
    "too_large": (HTTPStatus.REQUEST_ENTITY_TOO_LARGE, grpc.StatusCode.RESOURCE_EXHAUSTED),  # over FLUX_MAX_BODY_KB
    "unsupported_media_type": (HTTPStatus.UNSUPPORTED_MEDIA_TYPE, grpc.StatusCode.INVALID_ARGUMENT),  # not JSON
    "overloaded": (HTTPStatus.TOO_MANY_REQUESTS, grpc.StatusCode.RESOURCE_EXHAUSTED),  # over the in-flight limit
    "queue_full": (HTTPStatus.SERVICE_UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED),  # queue would wait too long
    "timeout": (HTTPStatus.GATEWAY_TIMEOUT, grpc.StatusCode.DEADLINE_EXCEEDED),  # over the traffic timeout
    "error": (HTTPStatus.INTERNAL_SERVER_ERROR, grpc.StatusCode.INTERNAL),
    "not_found": (HTTPStatus.NOT_FOUND, grpc.StatusCode.NOT_FOUND),  # no such job (or the jobs API is off)
    "already_completed": (HTTPStatus.CONFLICT, grpc.StatusCode.FAILED_PRECONDITION),  # cancel of a finished job
    "unavailable": (HTTPStatus.SERVICE_UNAVAILABLE, grpc.StatusCode.UNAVAILABLE),  # the job queue is unreachable
}


def retry_headers(outcome: str) -> dict[str, str]:
    """`Retry-After` on HTTP (our routes and /v1), `retry-after` trailing metadata on gRPC."""
    return {"retry-after": str(RETRY_AFTER_S[outcome])} if outcome in RETRY_AFTER_S else {}


def http_status(outcome: str) -> int:
    return int(OUTCOMES[outcome][0])


def grpc_code(outcome: str) -> grpc.StatusCode:
    return OUTCOMES[outcome][1]
