"""safetensors read and written a tensor at a time, so a 24 GB checkpoint never sits in memory.

Sources are read through `safe_open`, opened per read so that no file stays mapped; artifacts are
written in shards of bounded size with an HF-style index (`model.safetensors.index.json`).
"""

import hashlib
import json
import math
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, save_file

INDEX = "model.safetensors.index.json"
FLOATS = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
_DTYPE_BYTES = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
SHARD_BYTES = 1 << 30  # what a shard may hold before it is written out; bounds the writer's memory


class TensorFiles:
    """The tensors of one or more safetensors files, by name."""

    def __init__(self, files: list[Path]):
        if not files:
            raise FileNotFoundError("no .safetensors files")
        self.files: dict[str, Path] = {}
        for path in files:
            with safe_open(path, framework="pt") as handle:
                self.files.update(dict.fromkeys(handle.keys(), path))

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def keys(self) -> list[str]:
        return list(self.files)

    def rows(self, name: str) -> int:
        with safe_open(self.files[name], framework="pt") as handle:
            return handle.get_slice(name).get_shape()[0]

    def bf16_bytes(self) -> int:
        """What every tensor takes in bf16 (integer tensors at their own size)."""
        total = 0
        for path in set(self.files.values()):
            with safe_open(path, framework="pt") as handle:
                for name in handle.keys():
                    piece = handle.get_slice(name)
                    numel = math.prod(piece.get_shape())
                    total += numel * (2 if piece.get_dtype() in FLOATS else _DTYPE_BYTES[piece.get_dtype()])
        return total

    def get(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """One tensor, or rows [start, stop) of it, copied out of the file."""
        with safe_open(self.files[name], framework="pt") as handle:
            if start is None:
                return handle.get_tensor(name).clone()
            return handle.get_slice(name)[start:stop].clone()


class ShardWriter:
    """Collects tensors and writes them as `<name>-0000N.safetensors` shards plus `<name>.safetensors.index.json`."""

    def __init__(self, folder: Path, max_shard_bytes: int = SHARD_BYTES, name: str = "model"):
        self.folder, self.max_shard_bytes, self.name = folder, max_shard_bytes, name
        self.pending: dict[str, torch.Tensor] = {}
        self.weight_map: dict[str, str] = {}
        self.total = 0
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        self.pending.update({name: tensor.contiguous() for name, tensor in tensors.items()})
        if sum(_nbytes(t) for t in self.pending.values()) >= self.max_shard_bytes:
            self._flush()

    def close(self) -> None:
        self._flush()
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / f"{self.name}.safetensors.index.json").write_text(json.dumps(index, indent=2))

    def _flush(self) -> None:
        if not self.pending:
            return
        shard = f"{self.name}-{len(set(self.weight_map.values())) + 1:05d}.safetensors"
        save_file(self.pending, self.folder / shard, metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(self.pending, shard))
        self.total += sum(_nbytes(t) for t in self.pending.values())
        self.pending = {}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()  # releases the GIL: runs beside deserialization


def read_shards(folder: Path, sha256s: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor a ShardWriter wrote in `folder`, checked against its index.

    With `sha256s` (shard file name -> expected digest), each shard is read from disk once: its bytes
    are hashed on other cores while the same bytes are turned into tensors, and a mismatch is an error.
    """
    index = json.loads((folder / INDEX).read_text())["weight_map"]
    tensors: dict[str, torch.Tensor] = {}
    digests: dict[str, Future] = {}
    with ThreadPoolExecutor(max_workers=2) as hashers:
        for shard in sorted(set(index.values())):
            data = (folder / shard).read_bytes()
            if sha256s is not None:
                digests[shard] = hashers.submit(sha256_bytes, data)
            try:
                tensors.update({name: _aligned(tensor) for name, tensor in load(data).items()})
            except SafetensorError as error:
                _check_digest(folder / shard, digests.get(shard), sha256s)
                raise ValueError(f"{folder / shard}: unreadable ({error})") from error
            del data  # the hasher holds it until its digest is done
    for shard, digest in digests.items():
        _check_digest(folder / shard, digest, sha256s)
    if set(tensors) != set(index):
        raise ValueError(f"{folder / INDEX}: lists {len(index)} tensors, the shards hold {len(tensors)}")
    return tensors


def _check_digest(path: Path, digest: Future | None, sha256s: dict[str, str] | None) -> None:
    if digest is not None and digest.result() != sha256s.get(path.name):
        raise ValueError(f"{path}: sha256 mismatch (truncated or altered file)")


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """int8 matmul kernels crash on data that is not 16-byte aligned, as safetensors may leave it."""
    return tensor if tensor.data_ptr() % 16 == 0 else tensor.clone()
