"""Adaptive batching with a bounded wait: lone requests are never held for companions (a real server, tiny int8)."""

import inspect
from concurrent.futures import ThreadPoolExecutor

import pytest
from _bentoml_impl.server.app import ServiceAppFactory
from bentoml._internal.marshal.dispatcher import CorkDispatcher

from service.client import FluxGrpcClient
from service.launcher import running_server
from service.runtime.batching import RELIES_ON
from service.schema import GenerationRequest
from tests.conftest import free_port, private_home
from tests.test_lifecycle import metric

LONE = GenerationRequest(prompt="alone", width=512, height=512, steps=4)  # ~0.3 s: BentoML's own hold is ~3 renders
BURST = GenerationRequest(prompt="together", width=256, height=256, steps=2)  # the same queue (bucket 512)
HOLD_S = 0.010  # the 512 bucket's default FLUX_BATCH_WAIT_MS
SLACK_S = 0.25  # the front-to-worker call and a busy 2-core machine


@pytest.fixture(scope="module")
def servers(tiny_int8_tag, tmp_path_factory):
    grpc_target = f"127.0.0.1:{free_port()}"
    folder = tmp_path_factory.mktemp("batching")
    env = {"FLUX_ARTIFACT": tiny_int8_tag, "FLUX_GRPC_ADDRESS": grpc_target, **private_home(folder / "home")}
    with running_server(free_port(), folder / "server.log", env=env) as url:
        yield url, FluxGrpcClient(grpc_target)


def queue_wait_s(client: FluxGrpcClient, request: GenerationRequest = LONE) -> float:
    """Seconds the worker reports the request spent between the front and the start of its batch."""
    return client.generate(request).timings.stages_ms["queue_wait"] / 1000


def test_the_bentoml_internals_the_dispatcher_relies_on_are_there():
    dispatcher = CorkDispatcher(1000, 4, fallback=lambda: None)
    assert [name for name in RELIES_ON[CorkDispatcher] if not hasattr(dispatcher, name)] == []
    assert "self.dispatchers[name] = CorkDispatcher(" in inspect.getsource(ServiceAppFactory.__init__)


def test_no_lone_request_after_start_is_held(servers):
    """BentoML's dispatcher trains on its first requests: it held the 10th and 11th for several renders."""
    _, client = servers
    waits = [queue_wait_s(client) for _ in range(12)]
    assert max(waits) < HOLD_S + SLACK_S, [round(wait, 3) for wait in waits]


def test_a_burst_forms_batches_and_a_lone_request_after_it_is_not_held(servers):
    """Under load requests queue while a batch runs and go together; the wait they saw is not learnt."""
    url, client = servers
    batches_before = metric(url, "flux_batches_total")
    with ThreadPoolExecutor(12) as pool:  # more callers than a batch holds: some wait a whole batch
        list(pool.map(lambda k: client.generate(BURST.model_copy(update={"seed": k})), range(48)))
    batches = metric(url, "flux_batches_total") - batches_before
    assert batches <= 48 / 3, f"{batches:.0f} batches for 48 requests at concurrency 12"
    waits = [queue_wait_s(client) for _ in range(3)]
    assert max(waits) < HOLD_S + SLACK_S, [round(wait, 3) for wait in waits]
