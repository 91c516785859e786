"""LoRA files with random weights for a preset's transformer, in the layouts trainers write: kohya
(`lora_unet_…`, `lora_down`/`lora_up`, alpha per layer, BFL names) and diffusers/peft (`transformer.…`)."""

from pathlib import Path

import torch
from safetensors.torch import save_file

from models.architecture import PRESETS


def kohya_shapes(preset_name: str) -> dict[str, tuple[int, int]]:
    """BFL layer names as kohya spells them -> (in, out), for every block of the preset."""
    config = PRESETS[preset_name].transformer_config()
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    mlp = 4 * hidden
    shapes = {}
    for i in range(config["num_layers"]):
        for stream in ("img", "txt"):
            block = f"lora_unet_double_blocks_{i}_{stream}"
            shapes |= {
                f"{block}_attn_qkv": (hidden, 3 * hidden),
                f"{block}_attn_proj": (hidden, hidden),
                f"{block}_mlp_0": (hidden, mlp),
                f"{block}_mlp_2": (mlp, hidden),
                f"{block}_mod_lin": (hidden, 6 * hidden),
            }
    for i in range(config["num_single_layers"]):
        block = f"lora_unet_single_blocks_{i}"
        shapes |= {
            f"{block}_linear1": (hidden, 3 * hidden + mlp),
            f"{block}_linear2": (hidden + mlp, hidden),
            f"{block}_modulation_lin": (hidden, 3 * hidden),
        }
    return shapes


def diffusers_shapes(transformer: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Every Linear of the transformer's blocks -> (in, out) (a meta-device model will do)."""
    return {
        name: (module.in_features, module.out_features)
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith(("transformer_blocks", "single_transformer"))
    }


def low_rank(inputs: int, outputs: int, rank: int, strength: float, generator: torch.Generator):
    down = torch.randn(rank, inputs, generator=generator) / inputs**0.5
    up = torch.randn(outputs, rank, generator=generator) * strength / rank**0.5
    return down, up


def write_kohya_lora(
    path: Path,
    preset_name: str,
    rank: int,
    seed: int,
    strength: float = 0.2,
    alpha: float | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """`lora_unet_<layer>.lora_down.weight` / `.lora_up.weight` / `.alpha` (default alpha: rank / 2)."""
    generator, tensors = torch.Generator().manual_seed(seed), {}
    for layer, (inputs, outputs) in kohya_shapes(preset_name).items():
        down, up = low_rank(inputs, outputs, rank, strength, generator)
        tensors |= {
            f"{layer}.lora_down.weight": down.to(dtype),
            f"{layer}.lora_up.weight": up.to(dtype),
            f"{layer}.alpha": torch.tensor(alpha or rank / 2),
        }
    save_file(tensors, path)
    return path


def write_diffusers_lora(
    path: Path,
    transformer: torch.nn.Module,
    rank: int,
    seed: int,
    strength: float = 0.2,
    alpha: float | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """`transformer.<module>.lora_A.weight` / `.lora_B.weight`, and `.alpha` per module when `alpha` is given."""
    generator, tensors = torch.Generator().manual_seed(seed), {}
    for module, (inputs, outputs) in diffusers_shapes(transformer).items():
        down, up = low_rank(inputs, outputs, rank, strength, generator)
        tensors |= {
            f"transformer.{module}.lora_A.weight": down.to(dtype),
            f"transformer.{module}.lora_B.weight": up.to(dtype),
        }
        if alpha is not None:
            tensors[f"transformer.{module}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, path)
    return path
