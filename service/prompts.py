"""Prompt embeddings, cached: a repeated prompt skips both text encoders."""

from collections import OrderedDict

import torch
from diffusers import FluxPipeline

T5_SEQUENCE_LENGTH = 512


class PromptCache:
    """LRU of (T5 embeds, pooled CLIP embeds) per prompt, bounded in bytes, kept in host memory."""

    def __init__(self, encoder_id: str, max_bytes: int) -> None:
        self.encoder_id, self.max_bytes = encoder_id, max_bytes
        self.entries: OrderedDict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.bytes = self.hits = self.misses = 0

    def get(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        entry = self.entries.get((self.encoder_id, prompt))
        if entry is not None:
            self.entries.move_to_end((self.encoder_id, prompt))
        return entry

    def put(self, prompt: str, embeds: torch.Tensor, pooled: torch.Tensor) -> None:
        size = embeds.numel() * embeds.element_size() + pooled.numel() * pooled.element_size()
        if size > self.max_bytes or (self.encoder_id, prompt) in self.entries:
            return
        self.entries[(self.encoder_id, prompt)] = (embeds.cpu(), pooled.cpu())
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (old_embeds, old_pooled) = self.entries.popitem(last=False)
            self.bytes -= old_embeds.numel() * old_embeds.element_size() + old_pooled.numel() * old_pooled.element_size()


@torch.no_grad()  # outside the pipeline's own no_grad: without it the cache would keep autograd graphs alive
def encode_prompts(pipe: FluxPipeline, prompts: list[str], cache: PromptCache | None) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 and pooled CLIP embeddings for `prompts`, encoding only the ones the cache lacks, in one batch."""
    found = {prompt: cache.get(prompt) for prompt in prompts} if cache else {}
    missing = list(dict.fromkeys(p for p in prompts if found.get(p) is None))
    if missing:
        embeds, pooled, _ = pipe.encode_prompt(prompt=missing, prompt_2=None, device=pipe._execution_device,
                                               max_sequence_length=T5_SEQUENCE_LENGTH)
        for index, prompt in enumerate(missing):
            found[prompt] = (embeds[index], pooled[index])
            if cache:
                cache.put(prompt, embeds[index], pooled[index])
    if cache:
        cache.hits += len(prompts) - len(missing)
        cache.misses += len(missing)
    device = pipe._execution_device
    return (torch.stack([found[p][0] for p in prompts]).to(device),
            torch.stack([found[p][1] for p in prompts]).to(device))
