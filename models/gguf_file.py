"""GGUF FLUX transformers (city96's `flux1-dev-Q4_K_S.gguf` and kin), read tensor by tensor.

The files hold BFL's single-file layout, each tensor in a GGML type: quantized blocks (Q8_0, Q4_0, Q4_K,
...) or plain F32/F16/BF16. Keys are converted as for the single file (diffusers' converter run on row
numbers); a tensor is read from the file one piece at a time (the header through gguf's reader), and either
dequantized by the `gguf` package (any recipe) or handed over as its raw blocks (the `gguf` recipe keeps them).
"""

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFWriter, quants

from models.single_file import ROW_BITS, SingleFileTransformer, converted_row_ids, original_layout_shapes, runs
from models.tensors import TensorFiles

PLAIN_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


class GGUFTransformer(SingleFileTransformer):
    """A GGUF FLUX transformer, seen with diffusers' key names."""

    def __init__(self, path: Path):
        try:
            self.reader = GGUFReader(path)
        except (ValueError, OSError) as error:  # gguf raises ValueError on a bad magic or a truncated file
            raise ValueError(f"{path}: unreadable GGUF file ({error})") from error
        self.by_name = {tensor.name: tensor for tensor in self.reader.tensors}
        self.files = dict.fromkeys(self.by_name, Path(path))
        self.convert_keys()

    def rows(self, key: str) -> int:
        return self.by_name[key].data.shape[0]

    def ggml_type(self, name: str) -> GGMLQuantizationType:
        """The GGML type of a diffusers tensor (all its pieces come from tensors of one type)."""
        types = {self.by_name[self.source_keys[number]].tensor_type for number, _, _ in self.pieces[name]}
        if len(types) != 1:
            raise ValueError(f"{self.files[self.source_keys[0]]}: {name} joins tensors of types {sorted(types)}")
        return GGMLQuantizationType(types.pop())

    def is_quantized(self, name: str) -> bool:
        return self.ggml_type(name) not in PLAIN_TYPES

    def raw_rows(self, key: str, first: int, last: int) -> np.ndarray:
        """Rows of a source tensor as stored, read from the file (not through the reader's mapping, whose pages
        would stay resident: the whole file by the end of a run)."""
        tensor = self.by_name[key]
        row_bytes = tensor.n_bytes // tensor.data.shape[0]
        raw = np.fromfile(
            self.files[key],
            dtype=np.uint8,
            count=(last - first) * row_bytes,
            offset=tensor.data_offset + first * row_bytes,
        )
        return raw.view(tensor.data.dtype).reshape(last - first, *tensor.data.shape[1:])

    def source_rows(self, key: str, first: int, last: int) -> torch.Tensor:
        """Rows of a source tensor, dequantized (float32) by the gguf package."""
        return torch.from_numpy(quants.dequantize(self.raw_rows(key, first, last), self.by_name[key].tensor_type))

    def blocks(self, name: str) -> torch.Tensor:
        """A quantized diffusers tensor as its raw GGML blocks: one row of bytes per output row."""
        parts = [
            torch.from_numpy(self.raw_rows(self.source_keys[number], first, last))
            for number, first, last in self.pieces[name]
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def bf16_bytes(self) -> int:
        return sum(int(np.prod(tensor.shape)) * 2 for tensor in self.reader.tensors)


def to_original_layout(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers FluxTransformer2DModel state dict in BFL's single-file layout: diffusers' converter, run on
    row numbers, says where each diffusers tensor's rows go."""
    shapes = original_layout_shapes(config)
    keys = list(shapes)
    row_ids = {key: (number << ROW_BITS) + torch.arange(shapes[key][0]) for number, key in enumerate(keys)}
    original = {key: torch.empty(shape, dtype=torch.float32) for key, shape in shapes.items()}
    for name, ids in converted_row_ids(row_ids).items():
        done = 0
        for number, first, last in runs(ids):
            original[keys[number]][first:last] = state[name][done : done + last - first]
            done += last - first
    return original


def write_gguf(
    path: Path, shapes: dict[str, tuple[int, ...]], values: Callable[[str], torch.Tensor], ggml_type: str
) -> Path:
    """A GGUF file as city96's are made, one tensor in memory at a time (`values(name)` gives each): 2-D weights
    whose rows split into whole blocks quantized to `ggml_type` by the gguf package, the rest (biases,
    norms) F32."""
    qtype = GGMLQuantizationType[ggml_type]
    block, size = GGML_QUANT_SIZES[qtype]
    quantized = {name for name, shape in shapes.items() if len(shape) == 2 and shape[1] % block == 0}
    writer = GGUFWriter(path, arch="flux")
    for name, shape in shapes.items():  # the header first: every tensor's name, type and size
        if name in quantized:
            writer.add_tensor_info(
                name,
                (shape[0], shape[1] // block * size),
                np.dtype(np.uint8),
                shape[0] * shape[1] // block * size,
                raw_dtype=qtype,
            )
        else:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), math.prod(shape) * 4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name in shapes:
        data = values(name).float().numpy()
        writer.write_tensor_data(quants.quantize(data, qtype) if name in quantized else data)
    writer.close()
    return path


def gguf_from_diffusers(transformer_folder: Path, path: Path, ggml_type: str) -> Path:
    """A diffusers transformer folder (config + safetensors) written as a GGUF file of `ggml_type`."""
    config = json.loads((transformer_folder / "config.json").read_text())
    files = TensorFiles(sorted(transformer_folder.glob("*.safetensors")))
    original = to_original_layout({name: files.get(name) for name in files.keys()}, config)
    return write_gguf(
        path, {name: tuple(tensor.shape) for name, tensor in original.items()}, original.__getitem__, ggml_type
    )
