"""The device the worker renders on: which one, its memory budget, and whether it still responds."""

import torch

from models.sizes import GIB


def device_and_budget(gpu_memory_gb: float | None) -> tuple[torch.device, int]:
    if not torch.cuda.is_available():
        return torch.device("cpu"), int((gpu_memory_gb or 1024) * GIB)
    total = torch.cuda.get_device_properties(0).total_memory
    return torch.device("cuda"), int(gpu_memory_gb * GIB) if gpu_memory_gb else total


def capability_of(device: torch.device, simulated: tuple[int, int] | None) -> tuple[int, int] | None:
    """The GPU's compute capability (None for a CPU), or the simulated one when configured."""
    if simulated is not None:
        return simulated
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def hold_to_budget(device: torch.device, budget: int) -> None:
    """Hold a bigger GPU to the configured budget, so a plan made for 16 GB is tested as 16 GB."""
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / torch.cuda.get_device_properties(0).total_memory))


def device_responds(device: torch.device) -> bool:
    """A trivial operation on the device, on a stream of its own so it does not wait behind a batch."""
    if device.type == "cuda":
        stream = torch.cuda.Stream(device)
        with torch.cuda.stream(stream):
            value = (torch.ones(1, device=device) + 1).item()
    else:
        value = (torch.ones(1, device=device) + 1).item()
    return value == 2.0


def peak_memory(device: torch.device) -> dict[str, int] | None:
    """The device's peak allocated and reserved bytes since start (None on a CPU)."""
    if device.type != "cuda":
        return None
    return {"allocated": torch.cuda.max_memory_allocated(device), "reserved": torch.cuda.max_memory_reserved(device)}
