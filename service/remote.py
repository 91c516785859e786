"""Calling the batching worker from the front."""

import aiohttp


async def call_worker(method, *args, **kwargs):
    """Call a worker API, once more if the pooled connection had gone stale.

    BentoML's internal client keeps idle connections 15 s while the worker closes them after 5 s
    (BentoML issue #4971), so the first call after a pause can fail before the request is sent.
    """
    try:
        return await method(*args, **kwargs)
    except aiohttp.ClientConnectionError:
        return await method(*args, **kwargs)
