"""safetensors read and written a tensor at a time, so a 24 GB checkpoint never sits in memory.

Sources are read through `safe_open`, opened per read so that no file stays mapped; artifacts are
written in shards of bounded size with an HF-style index (`model.safetensors.index.json`), their data
64-byte aligned, and read back by mapping each shard: the tensors are views of the mapping (each byte read
from disk once, never copied).
"""

import hashlib
import json
import math
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
ALIGNMENT = 64  # bytes; where the writer starts every shard's data, so tensors can be used where they are mapped
SHARD_BYTES = (
    256 << 20
)  # what a shard may hold: bounds the writer's memory, and lets the loader hash shards on all cores


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
                    dtype = DTYPES[piece.get_dtype()]
                    total += numel * (2 if dtype.is_floating_point else dtype.itemsize)
        return total

    def get(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """One tensor, or rows [start, stop) of it, copied out of the file."""
        with safe_open(self.files[name], framework="pt") as handle:
            if start is None:
                return handle.get_tensor(name).clone()
            return handle.get_slice(name)[start:stop].clone()


class ShardWriter:
    """Collects tensors and writes them as `<name>-0000N.safetensors` shards plus `<name>.safetensors.index.json`.

    safetensors packs tensors back to back, so one odd-sized tensor (a bf16 scale) would leave every tensor
    after it misaligned, to be copied on load; those go last, into a shard of their own.
    """

    def __init__(self, folder: Path, max_shard_bytes: int = SHARD_BYTES, name: str = "model"):
        self.folder, self.max_shard_bytes, self.name = folder, max_shard_bytes, name
        self.pending: dict[str, torch.Tensor] = {}
        self.odd_sized: dict[str, torch.Tensor] = {}
        self.weight_map: dict[str, str] = {}
        self.total = 0
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            tensor = tensor.contiguous()
            (self.pending if _nbytes(tensor) % ALIGNMENT == 0 else self.odd_sized)[name] = tensor
        if sum(_nbytes(t) for t in self.pending.values()) >= self.max_shard_bytes:
            self._flush(self.pending)

    def close(self) -> None:
        self._flush(self.pending)
        self._flush(self.odd_sized)
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / f"{self.name}.safetensors.index.json").write_text(json.dumps(index, indent=2))

    def _flush(self, tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:
            return
        shard = f"{self.name}-{len(set(self.weight_map.values())) + 1:05d}.safetensors"
        path = self.folder / shard
        save_file(tensors, path, metadata={"format": "pt", "padding": ""})
        if pad := -data_start(path) % ALIGNMENT:  # grow the header so the data starts on a 64-byte boundary
            save_file(tensors, path, metadata={"format": "pt", "padding": " " * pad})  # (still in the page cache)
        sort_metadata(path)
        self.weight_map.update(dict.fromkeys(tensors, shard))
        self.total += sum(_nbytes(t) for t in tensors.values())
        tensors.clear()


def read_shards(folder: Path, sha256s: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor a ShardWriter wrote in `folder`, checked against its index.

    Each shard is mapped, and its tensors are views of the mapping (the writer aligns them), so each byte is
    read from disk once and not copied; with `sha256s` (shard file name -> expected digest) the mapping is
    hashed on other cores while the next shard's tensors are set up, and a mismatch is an error.
    """
    index = json.loads((folder / INDEX).read_text())["weight_map"]
    tensors: dict[str, torch.Tensor] = {}
    digests: dict[Path, Future] = {}
    with ThreadPoolExecutor(max_workers=2) as hashers:
        for path in sorted({folder / shard for shard in index.values()}):
            buffer = map_file(path)
            if sha256s is not None:
                digests[path] = hashers.submit(sha256_buffer, buffer)
            try:
                tensors.update(shard_tensors(path, buffer))
            except ValueError:
                _check_digest(path, digests.get(path), sha256s)  # a damaged file says so first
                raise
    for path, digest in digests.items():
        _check_digest(path, digest, sha256s)
    if set(tensors) != set(index):
        raise ValueError(f"{folder / INDEX}: lists {len(index)} tensors, the shards hold {len(tensors)}")
    return tensors


def map_file(path: Path) -> torch.Tensor:
    """The file's bytes as a CPU tensor mapped from it, copy-on-write: pages come from disk once, uncopied."""
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=path.stat().st_size)
    return torch.empty(0, dtype=torch.uint8).set_(storage)


def sort_metadata(path: Path) -> None:
    """safetensors writes its metadata in a random order: rewrite the header, same length, with it sorted, so
    the same tensors always give the same bytes."""
    with path.open("r+b") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))  # stays the first key
        text = json.dumps(header, separators=(",", ":")).encode()
        if len(text) > size:
            raise ValueError(f"{path}: header grew when sorted ({len(text)} > {size} bytes)")
        handle.seek(8)
        handle.write(text.ljust(size))


def data_start(path: Path) -> int:
    """Where a safetensors file's tensor data begins: after the 8-byte header length and the header."""
    with path.open("rb") as handle:
        return 8 + int.from_bytes(handle.read(8), "little")


def sha256_buffer(buffer: torch.Tensor) -> str:
    return hashlib.sha256(memoryview(buffer.numpy())).hexdigest()  # releases the GIL: runs beside the reads


def shard_tensors(path: Path, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file held in `buffer`, as views of it (copied where misaligned)."""
    try:
        header_size = int.from_bytes(buffer[:8].numpy().tobytes(), "little")
        header = json.loads(buffer[8 : 8 + header_size].numpy().tobytes())
        header.pop("__metadata__", None)
        data = buffer[8 + header_size :]
        return {name: _tensor(data, entry) for name, entry in header.items()}
    except (KeyError, TypeError, ValueError, RuntimeError) as error:  # a header or offsets that do not add up
        raise ValueError(f"{path}: unreadable safetensors file ({error!r})") from error


def _tensor(data: torch.Tensor, entry: dict) -> torch.Tensor:
    start, stop = entry["data_offsets"]
    if not 0 <= start <= stop <= len(data):
        raise ValueError(f"data offsets {start}..{stop} outside the file")
    raw = data[start:stop]
    if raw.data_ptr() % 16:  # int8 matmul kernels crash on data that is not 16-byte aligned
        raw = raw.clone()
    return raw.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])


def _check_digest(path: Path, digest: Future | None, sha256s: dict[str, str] | None) -> None:
    if digest is not None and digest.result() != sha256s.get(path.name):
        raise ValueError(f"{path}: sha256 mismatch (truncated or altered file)")


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
