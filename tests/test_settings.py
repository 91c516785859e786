"""One settings object, validated once; nothing heavy at import; the worker called at most once more, only when
the request was never sent."""

import asyncio
import os
import subprocess
import sys
from types import SimpleNamespace

import aiohttp
import pytest

from service.gateway import call_worker
from service.settings import Settings, settings
from tests.conftest import REPO

NOTHING_HEAVY_AT_IMPORT = """
import models.artifact, torch
def refuse(*args, **kwargs):
    raise AssertionError("read at import")
models.artifact.read_manifest = models.artifact.load_pipeline = refuse
torch.cuda.is_available = torch.cuda.get_device_properties = refuse
import service.service
print("imported", [name for name in service.service.FluxWorker.apis if name.startswith("generate_")])
"""


def test_importing_the_service_reads_no_manifest_and_queries_no_gpu(tiny_int8_tag):
    result = subprocess.run(
        [sys.executable, "-c", NOTHING_HEAVY_AT_IMPORT],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "FLUX_ARTIFACT": tiny_int8_tag},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "imported ['generate_1024'" in result.stdout


@pytest.fixture
def uncached():
    """settings() reads the environment again, and the next test's settings() too."""
    settings.cache_clear()
    yield settings
    settings.cache_clear()


def test_a_bad_setting_is_named(monkeypatch, uncached):
    monkeypatch.setenv("FLUX_MAX_BATCH_SIZE", "many")
    with pytest.raises(SystemExit, match="FLUX_MAX_BATCH_SIZE: Input should be a valid integer"):
        uncached()


def test_per_bucket_latency_from_a_json_mapping(monkeypatch):
    monkeypatch.setenv("FLUX_MAX_LATENCY_MS", '{"512": 1000, "2048": 9000}')
    assert (Settings().latency_ms(512), Settings().latency_ms(1024)) == (1000, 9000)


def test_jobs_settings_that_cannot_work_are_named(monkeypatch, uncached):
    monkeypatch.setenv("FLUX_JOBS_REDIS_URL", "redis://redis:6379/0")
    with pytest.raises(SystemExit, match="FLUX_JOBS_REDIS_URL needs FLUX_RESULTS_URL"):
        uncached()
    monkeypatch.setenv("FLUX_RESULTS_URL", "https://not-s3/bucket")
    with pytest.raises(SystemExit, match="FLUX_RESULTS_URL: String should match pattern"):
        uncached()
    monkeypatch.setenv("FLUX_RESULTS_URL", "s3://flux-results/jobs")
    monkeypatch.setenv("FLUX_WEBHOOK_HOSTS", "hooks.example.com, 10.0.0.0/8")
    with pytest.raises(SystemExit, match="FLUX_WEBHOOK_HOSTS needs FLUX_WEBHOOK_SECRET"):
        uncached()
    monkeypatch.setenv("FLUX_WEBHOOK_SECRET", "0123456789abcdef")
    assert uncached().webhook_hosts == ("hooks.example.com", "10.0.0.0/8")


def test_api_keys_from_a_list_and_a_file_and_a_missing_file_is_named(monkeypatch, tmp_path, uncached):
    (tmp_path / "keys").write_text("k3\n\n k4 \n")
    monkeypatch.setenv("FLUX_API_KEYS", " k1,k2 ,")
    monkeypatch.setenv("FLUX_API_KEYS_FILE", str(tmp_path / "keys"))
    assert Settings().accepted_keys() == ("k1", "k2", "k3", "k4")
    monkeypatch.setenv("FLUX_API_KEYS_FILE", str(tmp_path / "absent"))
    with pytest.raises(SystemExit, match="FLUX_API_KEYS_FILE: Path does not point to a file"):
        uncached()


class Worker:
    """A worker method that fails the first time with `error`, then answers."""

    def __init__(self, error: Exception) -> None:
        self.error, self.calls = error, 0

    async def generate(self) -> str:
        self.calls += 1
        if self.calls == 1:
            raise self.error
        return "image"


def test_a_connection_that_was_never_made_is_retried_once():
    """With the exceptions of the client BentoML really uses to call the worker (aiohttp)."""
    refused = aiohttp.ClientConnectorError(
        SimpleNamespace(host="worker", port=0, ssl=None), ConnectionRefusedError(111, "Connection refused")
    )
    worker = Worker(refused)
    assert asyncio.run(call_worker(worker.generate)) == "image" and worker.calls == 2


def test_a_request_the_worker_may_have_read_is_never_sent_twice():
    worker = Worker(aiohttp.ServerDisconnectedError())
    with pytest.raises(aiohttp.ServerDisconnectedError):
        asyncio.run(call_worker(worker.generate))
    assert worker.calls == 1
