"""Optional bearer-token auth for every API of the front (HTTP, OpenAI, gRPC); probes and metrics stay open."""

import hmac

import grpc
from starlette.responses import JSONResponse

OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})
OPEN_GRPC_PREFIXES = ("/grpc.health.", "/grpc.reflection.")
MESSAGE = "missing or invalid API key: send 'Authorization: Bearer <key>'"


def key_accepted(authorization: str, keys: tuple[str, ...]) -> bool:
    """A bearer token equal to one of `keys`, compared in constant time against every key."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token.strip().encode(), key.encode())
    return matched


class BearerAuth:
    """ASGI middleware: 401 in OpenAI's error shape unless the request carries an accepted key."""

    def __init__(self, app, keys: tuple[str, ...]) -> None:
        self.app, self.keys = app, keys

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        authorization = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        if key_accepted(authorization, self.keys):
            return await self.app(scope, receive, send)
        body = {
            "error": {"message": MESSAGE, "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}
        }
        await JSONResponse(body, status_code=401, headers={"www-authenticate": "Bearer"})(scope, receive, send)


class GrpcBearerAuth(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED unless the call's `authorization` metadata carries an accepted key (health and
    reflection stay open)."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.keys = keys

    async def intercept_service(self, continuation, details):
        authorization = dict(details.invocation_metadata or ()).get("authorization", "")
        if details.method.startswith(OPEN_GRPC_PREFIXES) or key_accepted(authorization, self.keys):
            return await continuation(details)
        return grpc.unary_unary_rpc_method_handler(self._refuse)

    @staticmethod
    async def _refuse(request, context) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, MESSAGE)
