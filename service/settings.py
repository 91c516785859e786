"""The service's configuration: environment variables and their defaults, in one place."""

import os

ARTIFACT_ENV = "FLUX_ARTIFACT"
ARTIFACT = os.environ.get(ARTIFACT_ENV, "flux-tiny-int8:latest")  # model-store tag to serve
MAX_BATCH_SIZE = int(os.environ.get("FLUX_MAX_BATCH_SIZE", 8))
MAX_LATENCY_MS = int(os.environ.get("FLUX_MAX_LATENCY_MS", 60_000))  # about 2x one full batch's run
MAX_IN_FLIGHT = int(os.environ.get("FLUX_MAX_IN_FLIGHT", 64))  # per front process, HTTP and gRPC each
GRPC_ADDRESS = os.environ.get("FLUX_GRPC_ADDRESS", "0.0.0.0:50051")
WARMUP_SIZE = int(os.environ.get("FLUX_WARMUP_SIZE", 256))  # warm the largest size you serve on a GPU
WARMUP_STEPS = int(os.environ.get("FLUX_WARMUP_STEPS", 1))
GPU_MEMORY_GB = float(os.environ.get("FLUX_GPU_MEMORY_GB", 0)) or None  # budget; default: the whole device
MAX_RESOLUTION = int(os.environ.get("FLUX_MAX_RESOLUTION", 2048))  # the largest side the planner must fit
PROMPT_CACHE_MB = int(os.environ.get("FLUX_PROMPT_CACHE_MB", 1024))  # cached prompt embeddings, host memory
