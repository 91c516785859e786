"""Prompt embeddings, cached: a repeated prompt skips both text encoders (and the moves that run them)."""

from collections import OrderedDict

import torch
from diffusers import FluxPipeline

Embedding = tuple[torch.Tensor, torch.Tensor]  # T5 embeds, pooled CLIP embeds


class PromptCache:
    """LRU of (T5 embeds, pooled CLIP embeds) per prompt, bounded in bytes, kept in host memory."""

    def __init__(self, encoder_id: str, max_bytes: int) -> None:
        self.encoder_id, self.max_bytes = encoder_id, max_bytes
        self.entries: OrderedDict[tuple[str, str], Embedding] = OrderedDict()
        self.bytes = self.hits = self.misses = 0

    def get(self, prompt: str) -> Embedding | None:
        entry = self.entries.get((self.encoder_id, prompt))
        if entry is not None:
            self.entries.move_to_end((self.encoder_id, prompt))
        return entry

    def put(self, prompt: str, embeds: torch.Tensor, pooled: torch.Tensor) -> None:
        size = _bytes(embeds) + _bytes(pooled)
        if size > self.max_bytes or (self.encoder_id, prompt) in self.entries:
            return
        self.entries[(self.encoder_id, prompt)] = (embeds.cpu(), pooled.cpu())
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (old_embeds, old_pooled) = self.entries.popitem(last=False)
            self.bytes -= _bytes(old_embeds) + _bytes(old_pooled)


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def cached_embeddings(prompts: list[str], cache: PromptCache | None) -> dict[str, Embedding]:
    """What the cache already holds for `prompts`; counts hits and misses."""
    found = {prompt: entry for prompt in dict.fromkeys(prompts) if cache and (entry := cache.get(prompt)) is not None}
    if cache:
        cache.hits += sum(prompt in found for prompt in prompts)
        cache.misses += sum(prompt not in found for prompt in prompts)
    return found


@torch.no_grad()  # outside the pipeline's own no_grad: without it the cache would keep autograd graphs alive
def encode_missing(
    pipe: FluxPipeline, prompts: list[str], cache: PromptCache | None, max_sequence_length: int
) -> dict[str, Embedding]:
    """Encode `prompts` (distinct, not cached) in one batch through both encoders (T5 reads `max_sequence_length`
    tokens: the variant's), caching them."""
    embeds, pooled, _ = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, device=pipe._execution_device, max_sequence_length=max_sequence_length
    )
    encoded = {prompt: (embeds[index], pooled[index]) for index, prompt in enumerate(prompts)}
    for prompt, (one_embeds, one_pooled) in encoded.items():
        if cache:
            cache.put(prompt, one_embeds, one_pooled)
    return encoded


def stack(found: dict[str, Embedding], prompts: list[str], device: torch.device) -> Embedding:
    """The batch's embeddings in request order, on the device."""
    return (
        torch.stack([found[p][0] for p in prompts]).to(device),
        torch.stack([found[p][1] for p in prompts]).to(device),
    )
