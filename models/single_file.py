"""The original single-file FLUX layout (`flux1-dev.safetensors`), read as diffusers keys, tensor by tensor.

diffusers converts that layout with `convert_flux_transformer_checkpoint_to_diffusers`, which needs the
whole checkpoint in memory. Here the same function runs on row numbers instead of weights: every source
tensor is replaced by the ids of its rows, so the converter's splits, concatenations and scale/shift
swaps tell which rows of which source tensor make each diffusers tensor. Those rows are then read on
demand with `safe_open` slices.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

from models.tensors import TensorFiles

ROW_BITS = 32  # a row id is (source tensor number << ROW_BITS) | row
# diffusers' converter splits each single block's fused `linear1` (q, k, v, MLP) at FLUX.1's widths
FLUX_SPLIT = (3072, 3072, 3072, 12288)
PADDING = -1  # a row id that stands for no row


def converted_row_ids(row_ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' converter run on row ids, at any width: each single block's `linear1` ids are padded to the
    widths the converter splits at, and the padding dropped from what it returns."""
    padded = {key: fused_to_flux_widths(ids) if ".linear1." in key else ids for key, ids in row_ids.items()}
    converted = convert_flux_transformer_checkpoint_to_diffusers(padded)
    return {name: ids[ids != PADDING] for name, ids in converted.items()}


def fused_to_flux_widths(ids: torch.Tensor) -> torch.Tensor:
    """`linear1` rows (q, k, v of `inner` rows each, then 4 × `inner` MLP rows), each part padded to FLUX.1's."""
    inner = len(ids) // 7
    parts = torch.split(ids, (inner, inner, inner, 4 * inner))
    padded = [F.pad(part, (0, width - len(part)), value=PADDING) for part, width in zip(parts, FLUX_SPLIT, strict=True)]
    return torch.cat(padded)


class SingleFileTransformer(TensorFiles):
    """A single-file FLUX transformer checkpoint, seen with diffusers' key names."""

    def __init__(self, path: Path):
        super().__init__([path])
        self.convert_keys()

    def convert_keys(self) -> None:
        """Where each diffusers tensor's rows lie in the source tensors."""
        self.source_keys = list(self.files)
        row_ids = {
            key: (number << ROW_BITS) + torch.arange(self.rows(key)) for number, key in enumerate(self.source_keys)
        }
        converted = converted_row_ids(row_ids)
        self.pieces = {name: runs(ids) for name, ids in converted.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.pieces

    def keys(self) -> list[str]:
        return list(self.pieces)

    def get(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        parts = [self.source_rows(self.source_keys[number], first, last) for number, first, last in self.pieces[name]]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts)
        return tensor if start is None else tensor[start:stop]

    def source_rows(self, key: str, first: int, last: int) -> torch.Tensor:
        """Rows [first, last) of a tensor as the source file names it."""
        return TensorFiles.get(self, key, first, last)


def original_layout_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of BFL's single-file layout (`flux1-dev.safetensors`) for a FluxTransformer2DModel config."""
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    mlp, head = 4 * hidden, config["attention_head_dim"]
    shapes = {
        "img_in.weight": (hidden, config["in_channels"]),
        "txt_in.weight": (hidden, config["joint_attention_dim"]),
        "final_layer.linear.weight": (config["in_channels"], hidden),
        "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
    }
    embedders = (
        ("time_in", 256),
        ("vector_in", config["pooled_projection_dim"]),
        *((("guidance_in", 256),) if config["guidance_embeds"] else ()),
    )
    for embedder, inputs in embedders:
        shapes |= {f"{embedder}.in_layer.weight": (hidden, inputs), f"{embedder}.out_layer.weight": (hidden, hidden)}
    for i in range(config["num_layers"]):
        for stream in ("img", "txt"):
            block = f"double_blocks.{i}.{stream}"
            shapes |= {
                f"{block}_mod.lin.weight": (6 * hidden, hidden),
                f"{block}_attn.qkv.weight": (3 * hidden, hidden),
                f"{block}_attn.norm.query_norm.scale": (head,),
                f"{block}_attn.norm.key_norm.scale": (head,),
                f"{block}_attn.proj.weight": (hidden, hidden),
                f"{block}_mlp.0.weight": (mlp, hidden),
                f"{block}_mlp.2.weight": (hidden, mlp),
            }
    for i in range(config["num_single_layers"]):
        block = f"single_blocks.{i}"
        shapes |= {
            f"{block}.linear1.weight": (3 * hidden + mlp, hidden),
            f"{block}.linear2.weight": (hidden, hidden + mlp),
            f"{block}.norm.query_norm.scale": (head,),
            f"{block}.norm.key_norm.scale": (head,),
            f"{block}.modulation.lin.weight": (3 * hidden, hidden),
        }
    biases = {name.replace(".weight", ".bias"): shape[:1] for name, shape in shapes.items() if name.endswith(".weight")}
    return shapes | biases


def runs(ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """Row ids as (source tensor number, first row, end row) runs of consecutive rows."""
    runs: list[tuple[int, int, int]] = []
    for value in ids.tolist():
        number, row = value >> ROW_BITS, value & ((1 << ROW_BITS) - 1)
        if runs and runs[-1][0] == number and runs[-1][2] == row:
            runs[-1] = (number, runs[-1][1], row + 1)
        else:
            runs.append((number, row, row + 1))
    return runs
