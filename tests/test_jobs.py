"""Async jobs on real servers: Redis (Debian's redis-server), a local S3 server (moto), `bentoml serve`
replicas of the tiny int8 artifact, and a webhook receiver of our own."""

import asyncio
import hashlib
import hmac
import json
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import httpx
import psutil
import pytest
import redis
from PIL import Image

from service.client import FluxClient, FluxGrpcClient
from service.fronts.stubs import messages
from service.jobs.records import Job
from service.launcher import LocalRedis, local_s3, start_server, stop, wait_ready
from service.pictures import png
from service.schema import GenerationRequest
from tests.conftest import free_port, private_home, run_module
from tests.test_images_in import b64

SECRET = "test-webhook-secret-0123456789"
SMALL = {"prompt": "a job", "width": 128, "height": 128, "steps": 2}
SLOW = {"prompt": "a long job", "width": 1024, "height": 1024, "steps": 40}  # ~0.25 s a step on 2 cores
PICTURE = b64(png(Image.radial_gradient("L").resize((128, 128)).convert("RGB")))
MASK_PNG = b64(png(Image.new("L", (128, 128), 255).crop((0, 0, 128, 128))))
FINISHED = ("succeeded", "failed", "cancelled")


class Receiver(BaseHTTPRequestHandler):
    """Records every webhook; answers 500 to the first `failures[path]` posts on a path."""

    received: list[tuple[str, dict, bytes]] = []
    failures: dict[str, int] = {}

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        self.received.append((self.path, dict(self.headers.items()), body))
        failing = self.failures.get(self.path, 0)
        self.failures[self.path] = failing - 1
        self.send_response(500 if failing > 0 else 200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def receiver():
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    """Redis (append-only, fsync on every write) and S3 with a results bucket."""
    queue = LocalRedis(tmp_path_factory.mktemp("redis"), free_port())
    queue.start()
    with local_s3("flux-results") as aws:
        yield queue, aws
    queue.stop()


def replica_env(tiny_int8_tag: str, backends, folder, **extra: str) -> dict[str, str]:
    queue, aws = backends
    return {
        **aws,
        "FLUX_ARTIFACT": tiny_int8_tag,
        "FLUX_GRPC_ADDRESS": f"127.0.0.1:{free_port()}",
        "FLUX_MAX_RESOLUTION": "1024",
        "FLUX_JOBS_REDIS_URL": queue.url,
        "FLUX_RESULTS_URL": "s3://flux-results/jobs",
        "FLUX_WEBHOOK_HOSTS": "127.0.0.1",
        "FLUX_WEBHOOK_SECRET": SECRET,
        "FLUX_WEBHOOK_BACKOFF_S": "0.2",
        "FLUX_JOBS_HEARTBEAT_S": "3",
        **private_home(folder / "home"),
        **extra,
    }


@pytest.fixture(scope="module")
def server(tiny_int8_tag, backends, tmp_path_factory):
    """One replica that renders one job at a time, so a second job stays queued."""
    folder = tmp_path_factory.mktemp("jobs")
    env = replica_env(tiny_int8_tag, backends, folder, FLUX_JOBS_IN_FLIGHT="1")
    port = free_port()
    process = start_server(port, folder / "server.log", env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, folder / "server.log", timeout_s=300)
        yield url, env["FLUX_GRPC_ADDRESS"]
    finally:
        stop(process)


def submit(url: str, body: dict, **headers: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/jobs", json=body, headers=headers, timeout=60)


def until(url: str, job_id: str, done, timeout_s: float = 120) -> dict:
    """Poll the job until `done(job)`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/jobs/{job_id}").json()
        if done(job):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {job}")


def finished(url: str, job_id: str, timeout_s: float = 120) -> dict:
    return until(url, job_id, lambda job: job["status"] in FINISHED, timeout_s)


def settled(store: redis.Redis, stream: str, timeout_s: float = 10) -> int:
    """The stream's pending entries once none is left (the replica acknowledges just after it records the
    job's end), or after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while (pending := store.xpending(stream, "flux")["pending"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pending


def objects(aws: dict[str, str]) -> list[str]:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=aws["AWS_ENDPOINT_URL"],
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    )
    return [item["Key"] for item in client.list_objects_v2(Bucket="flux-results").get("Contents", [])]


def test_a_jobs_result_is_the_synchronous_image(server):
    url = server[0]
    accepted = submit(url, {**SMALL, "seed": 7})
    assert accepted.status_code == 202 and accepted.json()["status"] == "queued"
    assert accepted.headers["location"] == f"/v1/jobs/{accepted.json()['id']}"
    job = finished(url, accepted.json()["id"])
    assert job["status"] == "succeeded" and job["progress"] == {"step": 2, "total": 2}
    assert job["result"]["expires_at"] > time.time() + 600 and job["result"]["media_type"] == "image/png"
    stored = httpx.get(job["result"]["url"]).content
    direct = httpx.post(f"{url}/txt2img", json={**SMALL, "seed": 7}, timeout=60)
    assert direct.status_code == 200 and stored == direct.content


def test_an_image_jobs_result_is_the_img2img_image(server):
    """An image job: its pictures kept in the results store (not in Redis), its result /img2img's bytes."""
    url = server[0]
    fields = {**SMALL, "seed": 5, "image": PICTURE, "mask": MASK_PNG, "strength": 0.5}
    answer = submit(url, fields, prefer="wait=60")
    assert answer.status_code == 200 and answer.json()["status"] == "succeeded", answer.text
    direct = httpx.post(f"{url}/img2img", json=fields, timeout=60)
    assert direct.status_code == 200 and httpx.get(answer.json()["result"]["url"]).content == direct.content
    refused = submit(url, {**SMALL, "image": b64(b"GIF89a")})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "image", refused.text
    refused = submit(url, {**SMALL, "strength": 0.5})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "image", refused.text


def test_prefer_wait_returns_the_finished_job_with_where_its_time_went(server):
    answer = submit(server[0], SMALL, prefer="wait=30")
    assert answer.status_code == 200 and answer.json()["status"] == "succeeded"
    timings = answer.json()["timings_ms"]
    assert set(timings) == {"queued", "render", "store"} and all(ms >= 0 for ms in timings.values()), timings
    assert timings["render"] > 0 and timings["store"] > 0


def test_bad_requests_are_refused_naming_the_field(server):
    url = server[0]
    for body, field in [
        ({**SMALL, "width": 100}, "width"),
        ({**SMALL, "sede": 1}, "sede"),
        ({**SMALL, "webhook": "http://example.com/hook"}, "webhook"),
        ({**SMALL, "webhook": "http://10.0.0.1/hook"}, "webhook"),
        ({**SMALL, "width": 2048}, "width"),
    ]:
        answer = submit(url, body)
        assert answer.status_code == 400, (body, answer.text)
        assert answer.json()["error"]["param"] == field, answer.text
    missing = httpx.get(f"{url}/v1/jobs/no-such-job")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert httpx.post(f"{url}/v1/jobs/no-such-job/cancel").status_code == 404


def test_an_idempotency_key_gives_the_same_job(server):
    url = server[0]
    first = submit(url, SMALL, **{"idempotency-key": "order-42"}).json()
    again = submit(url, {**SMALL, "seed": 5}, **{"idempotency-key": "order-42"}).json()
    other = submit(url, SMALL, **{"idempotency-key": "order-43"}).json()
    assert again["id"] == first["id"] != other["id"]
    for job in (first, other):
        assert finished(url, job["id"])["status"] == "succeeded"


def test_cancel_a_queued_job_a_running_one_and_a_finished_one(server):
    url = server[0]
    running = submit(url, SLOW).json()["id"]
    queued = submit(url, SMALL).json()["id"]
    until(url, running, lambda job: job["status"] == "running" and job["progress"]["step"] >= 2)
    assert httpx.get(f"{url}/v1/jobs/{queued}").json()["status"] == "queued"  # one job at a time
    answer = httpx.post(f"{url}/v1/jobs/{queued}/cancel")
    assert answer.status_code == 200 and answer.json()["status"] == "cancelled"
    asked = time.monotonic()
    answer = httpx.post(f"{url}/v1/jobs/{running}/cancel")
    assert answer.status_code == 202 and answer.json()["status"] == "running"
    job = finished(url, running)
    stopped_s = time.monotonic() - asked
    assert job["status"] == "cancelled" and job["error"]["outcome"] == "cancelled"
    assert job["progress"]["step"] < SLOW["steps"] and stopped_s < 3, (job, stopped_s)  # a step is ~0.25 s
    for job_id in (queued, running):
        again = httpx.post(f"{url}/v1/jobs/{job_id}/cancel")
        assert again.status_code == 409 and again.json()["error"]["code"] == "already_completed"
    done = submit(url, SMALL, prefer="wait=30").json()
    assert httpx.post(f"{url}/v1/jobs/{done['id']}/cancel").status_code == 409
    assert finished(url, queued)["status"] == "cancelled"  # never rendered later


def test_webhooks_are_signed_and_retried(server, receiver):
    url = server[0]
    Receiver.failures["/flaky"] = 2
    job = submit(url, {**SMALL, "webhook": f"{receiver}/flaky", "webhook_events": ["started", "completed"]}).json()
    assert finished(url, job["id"])["status"] == "succeeded"
    deadline = time.monotonic() + 30
    while len([r for r in Receiver.received if r[0] == "/flaky"]) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    calls = [(headers, body) for path, headers, body in Receiver.received if path == "/flaky"]
    events = [json.loads(body)["event"] for _, body in calls]
    assert events == ["started", "started", "started", "completed"], events  # 500, 500, then 200s
    assert len({headers["flux-webhook-id"] for headers, body in calls if json.loads(body)["event"] == "completed"}) == 1
    for headers, body in calls:
        stamp, signature = (part.split("=", 1)[1] for part in headers["flux-signature"].split(","))
        expected = hmac.new(SECRET.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(signature, expected) and abs(time.time() - int(stamp)) < 60
    completed = json.loads(calls[-1][1])["job"]
    assert completed["id"] == job["id"] and completed["status"] == "succeeded"
    assert httpx.get(completed["result"]["url"]).content[:4] == b"\x89PNG"
    later = httpx.get(f"{url}/v1/jobs/{job['id']}").json()  # the job as a client sees it, after the webhook
    assert (
        completed["urls"] == later["urls"] == {"get": f"/v1/jobs/{job['id']}", "cancel": f"/v1/jobs/{job['id']}/cancel"}
    )
    assert completed["updated"] == later["updated"], (completed, later)


def test_jobs_over_grpc_and_the_python_client(server):
    url, target = server
    client = FluxGrpcClient(target)
    request = GenerationRequest(**{**SMALL, "width": 512, "height": 512, "steps": 8}, seed=3)
    job = client.submit_job(request)
    assert job.status == messages.JOB_STATUS_QUEUED
    states = [event.status for event in client.watch_job(job.id)]
    assert states[-1] == messages.JOB_STATUS_SUCCEEDED and messages.JOB_STATUS_RUNNING in states
    done = client.get_job(job.id)
    assert httpx.get(done.result_url).content == FluxClient(url).txt2img(request)
    with pytest.raises(grpc.RpcError) as refused:
        client.cancel_job(job.id)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as unknown:
        client.get_job("no-such-job")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    over_http = FluxClient(url).wait_job(FluxClient(url).submit_job(GenerationRequest(**SMALL))["id"])
    assert over_http["status"] == "succeeded"


def test_jobs_queued_while_redis_is_down_are_not_lost(server, backends):
    url, (queue, _) = server[0], backends
    ids = [submit(url, {**SMALL, "steps": 6, "seed": seed}).json()["id"] for seed in range(3)]
    queue.stop()
    try:
        refused = submit(url, SMALL)
        assert refused.status_code == 503 and "job queue" in refused.json()["error"]["message"]
        assert refused.json()["error"]["code"] == "unavailable"
        time.sleep(2)
    finally:
        queue.start()
    assert [finished(url, job_id)["status"] for job_id in ids] == ["succeeded"] * 3


def test_the_queue_heals_when_redis_comes_back_without_its_data(server, backends):
    """A restart without persistence (or a failover to an empty replica) loses the stream and its consumer
    group: the replica makes the group again, and jobs accepted after it run."""
    url, (queue, _) = server[0], backends
    queue.stop()
    for kept in Path(queue.folder).iterdir():
        if kept.name != "redis.log":
            shutil.rmtree(kept) if kept.is_dir() else kept.unlink()
    queue.start()
    accepted = submit(url, {**SMALL, "seed": 5})
    assert accepted.status_code == 202, accepted.text
    assert finished(url, accepted.json()["id"], timeout_s=60)["status"] == "succeeded"
    assert httpx.get(f"{url}/readyz").status_code == 200


def test_a_job_taken_over_too_often_fails_with_the_reason(server, backends):
    """A job whose replicas keep dying (it was delivered 6 times, the cap is 3) fails instead of killing the next."""
    url, store = server[0], redis.Redis.from_url(backends[0].url, decode_responses=True)
    job = Job(id="poisoned-job", request=GenerationRequest(**SMALL), total=2)
    with store.pipeline(transaction=True) as pipe:  # a replica reads it and dies, before any other can read it
        pipe.hset(f"flux:job:{job.id}", mapping=job.to_hash())
        pipe.xadd("flux:jobs", {"job": job.id})
        pipe.xreadgroup("flux", "replica-that-died", {"flux:jobs": ">"}, count=1)
        entry = pipe.execute()[2][0][1][0][0]
    store.xclaim("flux:jobs", "flux", "replica-that-died", 0, [entry], retrycount=5, justid=True)
    failed = finished(url, job.id, timeout_s=60)
    assert failed["status"] == "failed" and "6 deliveries" in failed["error"]["message"], failed
    assert settled(store, "flux:jobs") == 0


@pytest.mark.slow  # about a minute: `make test-all`
def test_a_replica_killed_mid_job_leaves_it_to_another(tiny_int8_tag, backends, tmp_path):
    queue, aws = backends
    replicas = []
    for name in ("a", "b"):
        port, folder = free_port(), tmp_path / name
        folder.mkdir()
        env = replica_env(tiny_int8_tag, backends, folder, FLUX_JOBS_STREAM="flux:jobs:pair")  # not the module's
        process = start_server(port, folder / "server.log", env)
        replicas.append((f"http://127.0.0.1:{port}", process, folder / "server.log"))
    try:
        for url, process, log in replicas:
            wait_ready(url, process, log, timeout_s=300)
        url = replicas[0][0]
        image_job = {**SLOW, "steps": 24, "image": PICTURE, "strength": 1.0}  # its picture survives the death
        job_id = submit(url, image_job).json()["id"]
        until(url, job_id, lambda job: job["status"] == "running" and job["progress"]["step"] >= 1)
        store = redis.Redis.from_url(queue.url, decode_responses=True)
        killed = store.hget(f"flux:job:{job_id}", "consumer")
        consumer_pid = int(killed.rsplit("-", 1)[1])
        rendering = next(r for r in replicas if consumer_pid in tree_pids(r[1].pid))
        survivor = next(r for r in replicas if r is not rendering)
        for pid in tree_pids(rendering[1].pid):
            psutil.Process(pid).kill()
        job = finished(survivor[0], job_id, timeout_s=180)
        assert job["status"] == "succeeded", job
        assert store.hget(f"flux:job:{job_id}", "consumer") not in ("", killed)
        assert {key for key in objects(aws) if job_id in key} == {f"jobs/inputs/{job_id}/image", f"jobs/{job_id}.png"}
        direct = httpx.post(f"{survivor[0]}/img2img", json=image_job, timeout=300)
        assert httpx.get(job["result"]["url"]).content == direct.content
        assert settled(store, "flux:jobs:pair") == 0 and store.xlen("flux:jobs:pair") == 0
        metrics = httpx.get(f"{survivor[0]}/metrics").text
        assert "flux_jobs_reclaimed_total 1.0" in metrics
    finally:
        for _, process, _ in replicas:
            stop(process)


def tree_pids(pid: int) -> set[int]:
    try:
        parent = psutil.Process(pid)
        return {pid} | {child.pid for child in parent.children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def test_openai_url_responses_come_from_the_results_store(server):
    import openai

    client = openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused")
    images = client.images.generate(
        prompt="two foxes", n=2, size="128x128", response_format="url", extra_body={"steps": 2, "seed": 11}
    )
    fetched = [httpx.get(image.url).content for image in images.data]
    direct = httpx.post(f"{server[0]}/txt2img", json={**SMALL, "prompt": "two foxes", "seed": 12}, timeout=60).content
    assert fetched[0][:4] == b"\x89PNG" and fetched[1] == direct and fetched[0] != fetched[1]


@pytest.mark.parametrize("redis_before_6_2", [False, True])
def test_a_dead_consumers_entries_are_taken_over(backends, redis_before_6_2):
    """Against the real Redis; for Redis < 6.2 (none here) XAUTOCLAIM answers as an older server would."""
    from redis.exceptions import ResponseError

    from service.jobs.queue import JobQueue

    async def scenario() -> list:
        stream = f"flux:jobs:takeover-{redis_before_6_2}"
        dead, alive = (JobQueue(backends[0].url, stream, name, 60) for name in ("dead", "alive"))
        await dead.create_group()
        await dead.redis.xadd(stream, {"job": "job-1"})
        assert [d.job_id for d in await dead.read(5, 100)] == ["job-1"]
        if redis_before_6_2:

            async def unknown(*args, **kwargs):
                raise ResponseError("unknown command 'XAUTOCLAIM'")

            alive.redis.xautoclaim = unknown
        assert await alive.reclaim(idle_s=5, count=5) == []  # not idle long enough yet
        await asyncio.sleep(0.3)
        taken = await alive.reclaim(idle_s=0.2, count=5)
        assert await alive.reclaim(idle_s=0.2, count=5) == []  # now fresh, held by alive
        await dead.close()
        await alive.close()
        return taken

    taken = asyncio.run(scenario())
    assert [(d.job_id, d.deliveries) for d in taken] == [("job-1", 2)]


@pytest.mark.parametrize("grpc_flag", [[], ["--grpc"]])
def test_the_command_line_runs_a_job_and_writes_its_image(server, tmp_path, grpc_flag):
    out = tmp_path / "job.png"
    ran = run_module(
        "service.client",
        "a job from the shell",
        "-o",
        str(out),
        "--job",
        *grpc_flag,
        "--url",
        server[0],
        "--target",
        server[1],
        "--width",
        "128",
        "--height",
        "128",
        "--steps",
        "2",
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert Image.open(out).size == (128, 128)
