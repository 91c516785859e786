"""Where each component lives on a GPU memory budget, and the largest safe batch per resolution.

Memory model (bytes; estimates to calibrate with `python -m bench.recipes` on a GPU):
weights from the artifact's manifest, a CUDA context, transformer activations per image growing with
tokens × hidden width, and a VAE decode growing with pixels (bounded by tiling). Strategies, cheapest first:
  resident            everything on the GPU
  t5-on-demand        T5 waits in host memory and joins the transformer only while a batch is encoded
  take-turns          T5 and the transformer take turns on the GPU (each moved out while the other runs)
  sequential-offload  diffusers' layer-by-layer offload: fits almost anything, slowly (last resort)
"""

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from diffusers import FluxPipeline

GIB = 1024**3
CUDA_CONTEXT = int(0.75 * GIB)
SAFETY_MARGIN = int(0.5 * GIB)
ACTIVATION_FACTOR = 24  # live tensors of tokens × hidden width (bf16) at the transformer's peak, per image
T5_ACTIVATIONS = 512 * 4096 * 2 * 16  # one prompt through T5-XXL, bf16
VAE_BYTES_PER_PIXEL = 128 * 2 * 8  # widest decoder block (128 ch at full resolution, bf16), ~8 live tensors
VAE_TILE = 512  # diffusers' tile size: tiled decoding costs what a 512² decode costs
RESOLUTIONS = (512, 768, 1024, 1536, 2048)
BATCH_SIZES = (8, 4, 2, 1)
STRATEGIES = ("resident", "t5-on-demand", "take-turns", "sequential-offload")


class PlanError(ValueError):
    """No placement fits: the message says what was asked and what it would need."""


@dataclass(frozen=True)
class Plan:
    strategy: str
    budget_bytes: int
    vae_tiling_above: int | None  # resolution from which decoding is tiled; None: never
    max_batch: dict[int, int] = field(default_factory=dict)  # resolution -> largest safe batch
    peak_bytes: int = 0  # at the largest resolution and its batch

    def describe(self) -> dict:
        return asdict(self)


def transformer_activations(resolution: int, batch: int, hidden: int) -> int:
    tokens = (resolution // 16) ** 2 + 512
    return batch * tokens * hidden * 2 * ACTIVATION_FACTOR


def vae_decode(resolution: int, tiled: bool) -> int:
    side = min(resolution, VAE_TILE) if tiled else resolution
    return side * side * VAE_BYTES_PER_PIXEL


def peak(strategy: str, weights: dict[str, int], resolution: int, batch: int, tiled: bool, hidden: int) -> int:
    """Peak bytes of one batch: the larger of the encoding phase and the denoise + decode phase."""
    small = weights["text_encoder"] + weights["vae"] + CUDA_CONTEXT
    denoise = max(transformer_activations(resolution, batch, hidden), vae_decode(resolution, tiled))
    transformer, t5 = weights["transformer"], weights["text_encoder_2"]
    if strategy == "resident":
        return small + transformer + t5 + denoise
    if strategy == "t5-on-demand":
        return max(small + transformer + t5 + T5_ACTIVATIONS * batch, small + transformer + denoise)
    if strategy == "take-turns":
        return max(small + t5 + T5_ACTIVATIONS * batch, small + transformer + denoise)
    largest_block = transformer // 57 + t5 // 24  # one transformer block and one T5 layer at a time
    return small + largest_block + denoise


def plan_placement(weights: dict[str, int], budget_bytes: int, max_resolution: int, max_batch: int,
                   hidden: int = 3072) -> Plan:
    """The cheapest strategy that renders `max_resolution` at batch 1, and its safe batch per resolution."""
    usable = budget_bytes - SAFETY_MARGIN
    resolutions = [r for r in RESOLUTIONS if r <= max_resolution] or [max_resolution]
    for strategy in STRATEGIES:
        tiling_above = next((r for r in resolutions
                             if peak(strategy, weights, r, 1, False, hidden) > usable), None)
        fits = lambda r, b: peak(strategy, weights, r, b, tiling_above is not None and r >= tiling_above,  # noqa: E731
                                 hidden) <= usable
        if not fits(resolutions[-1], 1):
            continue
        batches = {r: next(b for b in BATCH_SIZES if b <= max_batch and fits(r, b) or b == 1) for r in resolutions}
        top = resolutions[-1]
        return Plan(strategy, budget_bytes, tiling_above, batches,
                    peak(strategy, weights, top, batches[top], tiling_above is not None, hidden))
    needed = peak("sequential-offload", weights, resolutions[-1], 1, True, hidden) + SAFETY_MARGIN
    raise PlanError(f"{budget_bytes / GIB:.1f} GiB cannot render {max_resolution}² even with sequential offload "
                    f"and VAE tiling (needs about {needed / GIB:.1f} GiB); lower FLUX_MAX_RESOLUTION or use a "
                    f"smaller recipe")


class Placement:
    """Carries out a plan on a pipeline: initial placement, moves around encoding, VAE tiling."""

    def __init__(self, plan: Plan, device: torch.device) -> None:
        self.plan, self.device, self.host = plan, device, torch.device("cpu")

    @classmethod
    def resident(cls, device: torch.device) -> "Placement":
        """Everything on `device`, no batch limit: for measuring, not for serving on a budget."""
        return cls(Plan("resident", budget_bytes=0, vae_tiling_above=None), device)

    def apply(self, pipe: FluxPipeline) -> None:
        if self.plan.strategy == "sequential-offload" and self.device.type == "cuda":
            pipe.enable_sequential_cpu_offload(device=self.device)
            return
        pipe.to(self.device)
        if self.plan.strategy in ("t5-on-demand", "take-turns"):
            pipe.text_encoder_2.to(self.host)

    @contextmanager
    def encoding(self, pipe: FluxPipeline):
        """T5 on the device for the duration of one encode, per the strategy."""
        if self.plan.strategy in ("resident", "sequential-offload"):
            yield
            return
        if self.plan.strategy == "take-turns":
            pipe.transformer.to(self.host)
        pipe.text_encoder_2.to(self.device)
        try:
            yield
        finally:
            pipe.text_encoder_2.to(self.host)
            if self.plan.strategy == "take-turns":
                pipe.transformer.to(self.device)

    def max_batch(self, resolution: int) -> int:
        """The safe batch of the smallest planned resolution at or above `resolution`."""
        if not self.plan.max_batch:
            return 1 << 30  # a plan without buckets does not limit batches
        fitting = [r for r in sorted(self.plan.max_batch) if r >= resolution]
        return self.plan.max_batch[fitting[0]] if fitting else 1

    def decode_tiled(self, resolution: int) -> bool:
        return self.plan.vae_tiling_above is not None and resolution >= self.plan.vae_tiling_above
