"""Where each component lives on a GPU memory budget, and the largest safe batch per resolution.

The memory model is models/sizes.py's (weights from the manifest, CUDA context, activations, VAE decode).
Strategies, cheapest first:
  resident            everything on the GPU
  t5-on-demand        T5 waits in host memory and joins the transformer only while a batch is encoded
  take-turns          T5 and the transformer take turns on the GPU (each moved out while the other runs)
  sequential-offload  diffusers' layer-by-layer offload: fits almost anything, slowly (last resort)
"""

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import bitsandbytes as bnb
import torch
from diffusers import FluxPipeline

from models.sizes import CUDA_CONTEXT, GIB, T5_ACTIVATIONS, resident_peak_bytes, transformer_activations, vae_decode
from service.settings import RESOLUTION_BUCKETS as RESOLUTIONS

SAFETY_MARGIN = int(0.5 * GIB)
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
    reserved_bytes: int = 0  # held back from the budget for the LoRA adapter cache

    def describe(self) -> dict:
        return asdict(self)


def peak(strategy: str, weights: dict[str, int], resolution: int, batch: int, tiled: bool, hidden: int) -> int:
    """Peak bytes of one batch: the larger of the encoding phase and the denoise + decode phase."""
    if strategy == "resident":
        return resident_peak_bytes(weights, resolution, batch, tiled, hidden)
    small = weights["text_encoder"] + weights["vae"] + CUDA_CONTEXT
    denoise = max(transformer_activations(resolution, batch, hidden), vae_decode(resolution, tiled))
    transformer, t5 = weights["transformer"], weights["text_encoder_2"]
    if strategy == "t5-on-demand":
        return max(small + transformer + t5 + T5_ACTIVATIONS * batch, small + transformer + denoise)
    if strategy == "take-turns":
        return max(small + t5 + T5_ACTIVATIONS * batch, small + transformer + denoise)
    largest_block = transformer // 57 + t5 // 24  # one transformer block and one T5 layer at a time
    return small + largest_block + denoise


def plan_placement(
    weights: dict[str, int],
    budget_bytes: int,
    max_resolution: int,
    max_batch: int,
    hidden: int = 3072,
    reserved_bytes: int = 0,
) -> Plan:
    """The cheapest strategy that renders `max_resolution` at batch 1, and its safe batch per resolution,
    with `reserved_bytes` (the LoRA cache) held back from the budget."""
    usable = budget_bytes - SAFETY_MARGIN - reserved_bytes
    resolutions = sorted({r for r in RESOLUTIONS if r < max_resolution} | {max_resolution})
    for strategy in STRATEGIES:
        tiling_above = next((r for r in resolutions if peak(strategy, weights, r, 1, False, hidden) > usable), None)

        def fits(r: int, b: int, strategy=strategy, tiling_above=tiling_above) -> bool:
            tiled = tiling_above is not None and r >= tiling_above
            return peak(strategy, weights, r, b, tiled, hidden) <= usable

        if not fits(resolutions[-1], 1):
            continue
        batches = {r: next(b for b in BATCH_SIZES if b <= max_batch and fits(r, b) or b == 1) for r in resolutions}
        top = resolutions[-1]
        return Plan(
            strategy,
            budget_bytes,
            tiling_above,
            batches,
            peak(strategy, weights, top, batches[top], tiling_above is not None, hidden),
            reserved_bytes,
        )
    needed = peak("sequential-offload", weights, resolutions[-1], 1, True, hidden) + SAFETY_MARGIN + reserved_bytes
    raise PlanError(
        f"{budget_bytes / GIB:.1f} GiB cannot render {max_resolution}² even with sequential offload "
        f"and VAE tiling (needs about {needed / GIB:.1f} GiB, {reserved_bytes / GIB:.1f} of them for the "
        f"LoRA cache); lower FLUX_MAX_RESOLUTION or FLUX_LORA_CACHE_MB, or use a smaller recipe"
    )


def move(module: torch.nn.Module, device: torch.device) -> None:
    """`module.to(device)`, with bitsandbytes' LLM.int8() layers moved by their own parameter type first.

    After its first forward a `Linear8bitLt` holds its int8 weights and scales in `layer.state` (CB, SCB);
    a parent's `.to()` goes through `_apply`, which moves parameters only, so the state (the whole int8 T5)
    would stay where it was. Quanto and 4-bit bitsandbytes keep everything in parameters.
    """
    for layer in module.modules():
        if isinstance(layer, bnb.nn.Linear8bitLt):
            move_int8_layer(layer, device)
    module.to(device)


def move_int8_layer(layer: bnb.nn.Linear8bitLt, device: torch.device) -> None:
    """Int8Params.to carries the weight and its scales; the layer's state then points at the moved ones."""
    layer.weight = layer.weight.to(device)
    if layer.state.CB is not None:
        layer.state.CB = layer.weight.data
    if layer.state.SCB is not None:
        layer.state.SCB = layer.state.SCB.to(device)


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
        for name in ("transformer", "text_encoder_2", "text_encoder", "vae"):
            move(getattr(pipe, name), self.device)
        if self.plan.strategy in ("t5-on-demand", "take-turns"):
            move(pipe.text_encoder_2, self.host)

    @contextmanager
    def encoding(self, pipe: FluxPipeline):
        """T5 on the device for the duration of one encode, per the strategy."""
        if self.plan.strategy in ("resident", "sequential-offload"):
            yield
            return
        if self.plan.strategy == "take-turns":
            move(pipe.transformer, self.host)
        move(pipe.text_encoder_2, self.device)
        try:
            yield
        finally:
            move(pipe.text_encoder_2, self.host)
            if self.plan.strategy == "take-turns":
                move(pipe.transformer, self.device)

    def max_batch(self, resolution: int) -> int:
        """The safe batch of the smallest planned resolution at or above `resolution`."""
        if not self.plan.max_batch:
            return 1 << 30  # a plan without buckets does not limit batches
        fitting = [r for r in sorted(self.plan.max_batch) if r >= resolution]
        return self.plan.max_batch[fitting[0]] if fitting else 1

    def decode_tiled(self, resolution: int) -> bool:
        return self.plan.vae_tiling_above is not None and resolution >= self.plan.vae_tiling_above
