"""FLUX.1's variants (dev, schnell): how each is run, its defaults and bounds. Plain data, so that the
service's fronts read them without loading diffusers."""

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Variant:
    """How a FLUX.1 variant is run: its defaults and bounds (from BFL's model cards)."""

    name: str
    steps: int  # the default number of denoising steps
    max_steps: int
    guidance: float  # the default distilled guidance; schnell has none and takes only 0
    max_sequence_length: int  # T5 tokens the variant was trained with

    @property
    def takes_guidance(self) -> bool:
        return self.guidance > 0

    def reading(self, t5_tokens: int | None) -> "Variant":
        """The variant for a model whose T5 tokenizer reads at most `t5_tokens` (the toy model reads fewer)."""
        if t5_tokens is None or t5_tokens >= self.max_sequence_length:
            return self
        return replace(self, max_sequence_length=t5_tokens)


VARIANTS = {
    "dev": Variant("dev", steps=28, max_steps=100, guidance=3.5, max_sequence_length=512),
    "schnell": Variant("schnell", steps=4, max_steps=12, guidance=0.0, max_sequence_length=256),
}


def variant_of(transformer_config: dict, t5_tokens: int | None = None) -> Variant:
    """dev has a guidance embedding, schnell does not: the transformer's config tells them apart."""
    return VARIANTS["dev" if transformer_config.get("guidance_embeds", True) else "schnell"].reading(t5_tokens)
