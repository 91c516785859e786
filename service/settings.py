"""The service's configuration: one object, read from FLUX_* environment variables and validated once."""

from functools import cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, FilePath, RedisDsn, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.schema import CachePolicy

RESOLUTION_BUCKETS = (512, 768, 1024, 1536, 2048)  # one batching queue each; a request joins the smallest that holds it


def bucket_of(side: int) -> int:
    """The batching queue (resolution bucket) a side of `side` pixels belongs to."""
    return next((bucket for bucket in RESOLUTION_BUCKETS if bucket >= side), RESOLUTION_BUCKETS[-1])


class Settings(BaseSettings):
    """Every FLUX_* variable the service reads; a bad value stops start-up with the variable's name."""

    model_config = SettingsConfigDict(env_prefix="FLUX_", extra="ignore", frozen=True)

    artifact: str = Field("flux-tiny-int8:latest", description="model-store tag to serve")
    max_batch_size: int = Field(8, ge=1, le=64, description="largest batch any queue forms (the plan may lower it)")
    max_latency_ms: dict[int, int] = Field(
        {512: 15_000, 768: 30_000, 1024: 60_000, 1536: 120_000, 2048: 240_000},
        description="per resolution bucket: how long a request may wait in its queue (about 2x a full batch)",
    )
    batch_wait_ms: dict[int, int] = Field(
        {512: 10, 768: 20, 1024: 40, 1536: 80, 2048: 160},
        description="per resolution bucket: the longest a lone request waits for companions (runtime/batching.py)",
    )
    max_in_flight: int = Field(64, ge=1, description="calls per front process, HTTP and gRPC each")
    max_body_kb: int = Field(
        64, ge=16, description="largest HTTP request body (413 over it); the largest valid request is ~30 KB"
    )
    max_image_body_mb: int = Field(
        32,
        ge=1,
        description="largest body of the routes that take pictures (/img2img, /v1/images/edits; 413 over "
        "it): an image and a mask at 2048², base64 or multipart",
    )
    grpc_address: str = Field("0.0.0.0:50051", description="where the gRPC front listens")
    grpc_max_send_mb: int = Field(64, ge=4, description="largest gRPC reply (a 2048² PNG is ~10 MB)")
    grpc_max_receive_mb: int = Field(4, ge=1, description="largest gRPC request")
    shutdown_grace_s: float = Field(280, ge=0, description="in-flight gRPC calls may finish this long after SIGTERM")
    warmup_size: int = Field(256, ge=64, description="warm up at this size; the largest you serve on a GPU")
    warmup_steps: int = Field(1, ge=1)
    gpu_memory_gb: float | None = Field(None, gt=0, description="memory budget; default: the whole device")
    compute_dtype: Literal["auto", "bfloat16", "float16"] = Field(
        "auto", description="auto: bf16 on a CPU and on sm80+ GPUs, float16 on older ones (T4, V100)"
    )
    device_capability: str | None = Field(
        None,
        pattern=r"^\d+\.\d$",
        description="take the GPU (or the CPU) for a card of this CUDA compute "
        "capability, e.g. 7.5 for a T4: its compute dtype and kernel checks, to try a plan for a card you lack",
    )
    max_resolution: int = Field(2048, ge=64, le=RESOLUTION_BUCKETS[-1], description="largest side the plan must fit")
    prompt_cache_mb: int = Field(1024, ge=0, description="cached prompt embeddings, host memory")
    lora_cache_mb: int = Field(512, ge=0, description="LoRA adapters kept in device memory (the plan reserves it)")
    loras: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="adapter tags packed into the Bento at build, comma-separated (any stored adapter serves)"
    )
    step_cache: CachePolicy = Field(CachePolicy.off, description="step caching of requests that leave `cache` unset")
    compile: Literal["off", "blocks"] = Field(
        "off", description="blocks: torch.compile the transformer's repeated blocks at start (bf16, quanto recipes)"
    )
    liveness_timeout_s: float = Field(10, gt=0, description="a device check slower than this fails /livez")
    api_keys: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="bearer tokens the APIs accept, comma-separated; none here or in the file: no auth"
    )
    api_keys_file: FilePath | None = Field(None, description="more tokens, one per line (a mounted Secret)")
    jobs_redis_url: RedisDsn | None = Field(None, description="Redis of the job queue; unset: no jobs API")
    jobs_stream: str = Field("flux:jobs", min_length=1, description="the Redis Stream every replica pulls from")
    jobs_in_flight: int = Field(8, ge=1, description="jobs one replica renders at once (it pulls no more)")
    jobs_heartbeat_s: float = Field(30, gt=0, description="a job whose replica is silent this long is taken over")
    jobs_max_deliveries: int = Field(3, ge=1, description="a job taken over more often than this fails")
    jobs_retention_s: int = Field(86_400, ge=60, description="finished jobs' records expire after this long")
    results_url: str | None = Field(None, pattern=r"^s3://[^/]+", description="s3://bucket/prefix for job results")
    results_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, R2, GCS)")
    results_url_ttl_s: int = Field(3600, ge=60, le=7 * 86_400, description="presigned result URLs expire after")
    webhook_hosts: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="hosts or IP networks webhooks may be sent to, comma-separated; none: no webhooks"
    )
    webhook_secret: str | None = Field(None, min_length=16, description="HMAC-SHA256 key that signs webhooks")
    webhook_attempts: int = Field(5, ge=1, le=20, description="deliveries tried before a webhook is given up")
    webhook_backoff_s: float = Field(1.0, gt=0, description="wait before the 2nd attempt; doubles after each")

    @field_validator("api_keys", "webhook_hosts", "loras", mode="before")
    @classmethod
    def split_list(cls, value: str | tuple) -> tuple[str, ...]:
        return tuple(key.strip() for key in value.split(",") if key.strip()) if isinstance(value, str) else value

    @model_validator(mode="after")
    def jobs_complete(self) -> "Settings":
        if self.jobs_redis_url and not self.results_url:
            raise ValueError("FLUX_JOBS_REDIS_URL needs FLUX_RESULTS_URL (s3://bucket/prefix) for the results")
        if self.webhook_hosts and not self.webhook_secret:
            raise ValueError("FLUX_WEBHOOK_HOSTS needs FLUX_WEBHOOK_SECRET to sign the webhooks")
        return self

    def accepted_keys(self) -> tuple[str, ...]:
        """The tokens of FLUX_API_KEYS and of FLUX_API_KEYS_FILE."""
        lines = Path(self.api_keys_file).read_text().splitlines() if self.api_keys_file else []
        return self.api_keys + tuple(line.strip() for line in lines if line.strip())

    @property
    def capability(self) -> tuple[int, int] | None:
        """FLUX_DEVICE_CAPABILITY as (major, minor), when set."""
        return tuple(map(int, self.device_capability.split("."))) if self.device_capability else None

    def latency_ms(self, bucket: int) -> int:
        return self.max_latency_ms.get(bucket, max(self.max_latency_ms.values()))

    def wait_ms(self, bucket: int) -> int:
        return self.batch_wait_ms.get(bucket, max(self.batch_wait_ms.values()))


class SettingsError(SystemExit):
    """Start-up stops here, naming each bad variable."""


@cache
def settings() -> Settings:
    """The settings, read from the environment on first use (not at import)."""
    try:
        return Settings()
    except ValidationError as error:
        problems = "; ".join(
            f"FLUX_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" if e["loc"] else e["msg"] for e in error.errors()
        )
        raise SettingsError(f"invalid configuration: {problems}") from None
