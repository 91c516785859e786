"""The original single-file FLUX layout (`flux1-dev.safetensors`), read as diffusers keys, tensor by tensor.

diffusers converts that layout with `convert_flux_transformer_checkpoint_to_diffusers`, which needs the
whole checkpoint in memory. Here the same function runs on row numbers instead of weights: every source
tensor is replaced by the ids of its rows, so the converter's splits, concatenations and scale/shift
swaps tell which rows of which source tensor make each diffusers tensor. Those rows are then read on
demand with `safe_open` slices.
"""

from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

from models.tensors import TensorFiles

ROW_BITS = 32  # a row id is (source tensor number << ROW_BITS) | row


class SingleFileTransformer(TensorFiles):
    """A single-file FLUX transformer checkpoint, seen with diffusers' key names."""

    def __init__(self, path: Path):
        super().__init__([path])
        self.source_keys = list(self.files)
        row_ids = {key: (number << ROW_BITS) + torch.arange(self.rows(key))
                   for number, key in enumerate(self.source_keys)}
        converted = convert_flux_transformer_checkpoint_to_diffusers(row_ids)
        self.pieces = {name: _runs(ids) for name, ids in converted.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.pieces

    def keys(self) -> list[str]:
        return list(self.pieces)

    def get(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        parts = [super(SingleFileTransformer, self).get(self.source_keys[number], first, last)
                 for number, first, last in self.pieces[name]]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts)
        return tensor if start is None else tensor[start:stop]


def _runs(ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """Row ids as (source tensor number, first row, end row) runs of consecutive rows."""
    runs: list[tuple[int, int, int]] = []
    for value in ids.tolist():
        number, row = value >> ROW_BITS, value & ((1 << ROW_BITS) - 1)
        if runs and runs[-1][0] == number and runs[-1][2] == row:
            runs[-1] = (number, runs[-1][1], row + 1)
        else:
            runs.append((number, row, row + 1))
    return runs
