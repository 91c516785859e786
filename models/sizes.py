"""Expected bytes of FLUX components per weight format, counted on the meta device (no weights needed)."""

from functools import cache

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from transformers import CLIPTextModel, T5EncoderModel

from models.architecture import PRESETS
from models.tokenizers import build_clip_tokenizer

# Bytes per quantized weight, scales included: int8 per-channel; int4 groups of 128 (bf16 scale + shift);
# nf4 blocks of 64 (fp32 absmax).
BYTES_PER_WEIGHT = {"bf16": 2.0, "int8": 1.0, "int4": 0.5 + 4 / 128, "nf4": 0.5 + 4 / 64}


def _meta_module(preset_name: str, component: str) -> torch.nn.Module:
    preset = PRESETS[preset_name]
    with torch.device("meta"):
        return {
            "transformer": lambda: FluxTransformer2DModel(**preset.transformer_config()),
            "text_encoder_2": lambda: T5EncoderModel(preset.t5_config()),
            "text_encoder": lambda: CLIPTextModel(preset.clip_config(build_clip_tokenizer())),
            "vae": lambda: AutoencoderKL(**preset.vae_config()),
        }[component]()


@cache
def parameter_counts(preset_name: str, component: str) -> tuple[int, int]:
    """(weights of Linear layers, every other parameter), tied parameters counted once."""
    module = _meta_module(preset_name, component)
    linear = sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))
    total = sum(p.numel() for p in module.parameters())
    return linear, total - linear


def expected_bytes(preset_name: str, component: str, weight_format: str) -> int:
    """Linear weights in `weight_format`, everything else in bf16."""
    linear, other = parameter_counts(preset_name, component)
    return int(linear * BYTES_PER_WEIGHT[weight_format] + other * 2)
