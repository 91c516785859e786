"""FLUX's footprint: bytes per component and weight format (counted on the meta device), and GPU memory.

The GPU memory model (bytes; estimates to calibrate with `python -m bench.recipes` on a GPU): weights, a
CUDA context, transformer activations per image growing with tokens × hidden width, and a VAE decode
growing with pixels (bounded by tiling).
"""

from functools import cache

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from models.architecture import build_module

GIB = 1024**3
CUDA_CONTEXT = int(0.75 * GIB)
ACTIVATION_FACTOR = 24  # live tensors of tokens × hidden width (bf16) at the transformer's peak, per image
T5_ACTIVATIONS = 512 * 4096 * 2 * 16  # one prompt through T5-XXL, bf16
VAE_BYTES_PER_PIXEL = 128 * 2 * 8  # widest decoder block (128 ch at full resolution, bf16), ~8 live tensors
VAE_TILE = 512  # diffusers' tile size: tiled decoding costs what a 512² decode costs


DEFAULT_GROUP_SIZE = {"int4": 128, "nf4": 64, "fp4": 64}  # quanto's int4 groups, bitsandbytes' 4-bit blocks


def bytes_per_weight(weights: str, group_size: int | None = None, double_quant: bool = False) -> float:
    """Bytes per Linear weight, scales included (per-row scales are negligible).

    bf16; int8 and float8 (quanto, LLM.int8); int4: groups with a bf16 scale and shift (quanto);
    nf4/fp4: blocks with an fp32 absmax, or a uint8 absmax plus an fp32 per 256 blocks when double
    quantized (bitsandbytes); a GGML type (Q8_0, Q4_0, ...): its block's bytes over its weights; gguf: the
    file's own types decide, counted as Q8_0, the largest.
    """
    if weights in ("int4", "nf4", "fp4"):
        per_group = 4 if weights == "int4" else (1 + 4 / 256 if double_quant else 4)
        return 0.5 + per_group / (group_size or DEFAULT_GROUP_SIZE[weights])
    if weights in GGMLQuantizationType.__members__:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[weights]]
        return size / block
    return {"bf16": 2.0, "int8": 1.0, "float8": 1.0, "gguf": bytes_per_weight("Q8_0")}[weights]


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's tensors, tied tensors counted once."""
    unique = {tensor.data_ptr(): tensor for tensor in module.state_dict().values()}
    return sum(tensor.numel() * tensor.element_size() for tensor in unique.values())


@cache
def parameter_counts(preset_name: str, component: str) -> tuple[int, int]:
    """(weights of Linear layers, every other parameter), tied parameters counted once."""
    with torch.device("meta"):
        module = build_module(preset_name, component)
    linear = sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))
    total = sum(p.numel() for p in module.parameters())
    return linear, total - linear


@cache
def linear_layers(preset_name: str, component: str) -> dict[str, tuple[int, int]]:
    """Every Linear layer by module name: (weights, input features)."""
    with torch.device("meta"):
        module = build_module(preset_name, component)
    return {
        name: (m.weight.numel(), m.in_features) for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)
    }


def expected_bytes(preset_name: str, component: str, linear_bytes_per_weight: float = 2.0) -> int:
    """Linear weights at `linear_bytes_per_weight`, everything else in bf16."""
    linear, other = parameter_counts(preset_name, component)
    return int(linear * linear_bytes_per_weight + other * 2)


def transformer_activations(resolution: int, batch: int, hidden: int = 3072) -> int:
    tokens = (resolution // 16) ** 2 + 512
    return batch * tokens * hidden * 2 * ACTIVATION_FACTOR


def vae_decode(resolution: int, tiled: bool) -> int:
    side = min(resolution, VAE_TILE) if tiled else resolution
    return side * side * VAE_BYTES_PER_PIXEL


def resident_peak_bytes(
    weights: dict[str, int], resolution: int, batch: int = 1, tiled: bool = False, hidden: int = 3072
) -> int:
    """Peak with every component on the GPU: all weights, the context, and the larger of denoise and decode."""
    resident = sum(weights[c] for c in ("transformer", "text_encoder_2", "text_encoder", "vae")) + CUDA_CONTEXT
    return resident + max(transformer_activations(resolution, batch, hidden), vae_decode(resolution, tiled))
