"""Calling the batching worker from the fronts (BentoML's client to it is aiohttp, over a local socket)."""

import aiohttp

# Raised before the request reached the worker: safe to send again. Anything later (the worker closed the
# connection after reading the request: "Server disconnected") may mean the work is running, and is never retried.
NOT_SENT = (aiohttp.ClientConnectorError,)


async def call_worker(method, *args, **kwargs):
    """Call a worker API, once more if the connection could not be made."""
    try:
        return await method(*args, **kwargs)
    except NOT_SENT:
        return await method(*args, **kwargs)
