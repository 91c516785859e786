"""What FLUX.1 is: its component architectures, its variants (dev, schnell), and scaled presets built with
random weights."""

from dataclasses import dataclass, field, replace

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

from models.tokenizers import CLIP_MAX_LENGTH, T5_MAX_LENGTH, build_clip_tokenizer, build_t5_tokenizer
from models.toy.scenes import VOCABULARY
from models.variants import Variant, variant_of

# black-forest-labs/FLUX.1-dev, component by component.
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FLUX_DEV_T5 = dict(  # google/t5-v1_1-xxl encoder
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6,
    tie_word_embeddings=False,
)
FLUX_DEV_CLIP = dict(  # openai/clip-vit-large-patch14 text tower
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    projection_dim=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=CLIP_MAX_LENGTH,
    hidden_act="quick_gelu",
)
FLUX_DEV_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
FLUX_DEV_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
# black-forest-labs/FLUX.1-schnell differs only here: no guidance embedding, and a fixed timestep shift.
SCHNELL_TRANSFORMER = dict(guidance_embeds=False)
SCHNELL_SCHEDULER = dict(shift=1.0, use_dynamic_shifting=False)


def pipeline_variant(pipe: FluxPipeline) -> Variant:
    return variant_of(pipe.transformer.config, pipe.tokenizer_2.model_max_length)


@dataclass(frozen=True)
class FluxPreset:
    """A FLUX.1 model at some scale: overrides applied to each component's real configuration."""

    name: str
    description: str
    transformer: dict = field(default_factory=dict)
    t5: dict = field(default_factory=dict)
    clip: dict = field(default_factory=dict)
    vae: dict = field(default_factory=dict)
    scheduler: dict = field(default_factory=dict)
    words: tuple[str, ...] = ()  # whole-word T5 pieces (the toy model's captions)
    t5_tokens: int = T5_MAX_LENGTH  # T5 tokens the model reads

    def schnell(self) -> "FluxPreset":
        """The same scale as FLUX.1-schnell."""
        return replace(
            self,
            name=f"{self.name}-schnell",
            description=f"{self.description}; FLUX.1-schnell",
            transformer={**self.transformer, **SCHNELL_TRANSFORMER},
            scheduler={**self.scheduler, **SCHNELL_SCHEDULER},
        )

    def transformer_config(self) -> dict:
        return {**FLUX_DEV_TRANSFORMER, **self.transformer}

    def t5_config(self) -> T5Config:
        return T5Config(**{**FLUX_DEV_T5, **self.t5})

    def clip_config(self, tokenizer: CLIPTokenizer) -> CLIPTextConfig:
        """CLIP pools at the eos token, so its special ids follow the tokenizer's."""
        special_ids = dict(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return CLIPTextConfig(**{**FLUX_DEV_CLIP, **self.clip, **special_ids})

    def vae_config(self) -> dict:
        return {**FLUX_DEV_VAE, **self.vae}

    def scheduler_config(self) -> dict:
        return {**FLUX_DEV_SCHEDULER, **self.scheduler}


_TINY_VOCAB = dict(vocab_size=600)
TINY_T5 = dict(_TINY_VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4)  # `tiny` and `toy`
TINY_CLIP = dict(
    _TINY_VOCAB, hidden_size=64, intermediate_size=128, projection_dim=64, num_hidden_layers=1, num_attention_heads=2
)
DEV_PRESETS = (
    FluxPreset(
        "tiny",
        "64-wide, 1 double + 1 single block: seconds on a CPU, for tests and the demo",
        transformer=dict(
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=64,
            num_attention_heads=1,
            joint_attention_dim=64,
            pooled_projection_dim=64,
            axes_dims_rope=(8, 28, 28),
        ),
        t5=TINY_T5,
        clip=TINY_CLIP,
        vae=dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1),
    ),
    FluxPreset(
        "medium",
        "real FLUX.1-dev layer shapes, 1 double + 1 single block, 1 T5 and 1 CLIP layer",
        transformer=dict(num_layers=1, num_single_layers=1),
        t5=dict(num_layers=1),
        clip=dict(num_hidden_layers=1),
    ),
    FluxPreset("full", "the real FLUX.1-dev size (12B transformer, T5-XXL encoder)"),
)
TOY = FluxPreset(
    "toy",
    "128-wide, 2 double + 2 single blocks, 64² pictures: trained here to draw shapes (python -m models train)",
    transformer=dict(
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        axes_dims_rope=(8, 12, 12),
    ),
    t5=TINY_T5,
    clip=TINY_CLIP,
    vae=dict(
        block_out_channels=(16, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    ),
    words=VOCABULARY,
    t5_tokens=40,
)
PRESETS = {preset.name: preset for preset in (*DEV_PRESETS, *(preset.schnell() for preset in DEV_PRESETS), TOY)}


MODULES = ("vae", "text_encoder", "text_encoder_2", "transformer")  # in the order their random weights are drawn


def build_module(preset_name: str, component: str) -> torch.nn.Module:
    """One component with random weights in the default dtype (shapes only under `torch.device("meta")`)."""
    preset = PRESETS[preset_name]
    return {
        "vae": lambda: AutoencoderKL(**preset.vae_config()),
        "text_encoder": lambda: CLIPTextModel(preset.clip_config(build_clip_tokenizer())),
        "text_encoder_2": lambda: T5EncoderModel(preset.t5_config()),
        "transformer": lambda: FluxTransformer2DModel(**preset.transformer_config()),
    }[component]()


def build_pipeline(preset_name: str, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> FluxPipeline:
    """Build a complete FluxPipeline with random weights, reproducibly from `seed`."""
    torch.manual_seed(seed)
    modules = {name: build_module(preset_name, name).to(dtype).eval() for name in MODULES}
    scheduler = FlowMatchEulerDiscreteScheduler(**PRESETS[preset_name].scheduler_config())
    preset = PRESETS[preset_name]
    tokenizer_2 = build_t5_tokenizer(preset.words, preset.t5_tokens)
    return FluxPipeline(scheduler=scheduler, tokenizer=build_clip_tokenizer(), tokenizer_2=tokenizer_2, **modules)


def vae_in_float32(vae: AutoencoderKL) -> None:
    """Run the VAE in float32, whatever dtype its input comes in: for CPUs, where without avx512_bf16 bf16
    convolutions are ~50x slower than float32 (the VAE is small, 84 M parameters, and never quantized). The
    encoder's moments come back in the input's dtype, as from a VAE of that dtype, so diffusers' image
    pipelines (which encode an image in the transformer's dtype) and the service's own loop get the same latents."""
    if getattr(vae, "in_float32", False):
        return
    vae.in_float32 = True
    vae.to(torch.float32)
    vae.decoder.register_forward_pre_hook(lambda _, args: (args[0].float(), *args[1:]))

    def encode_in_float32(module: torch.nn.Module, args: tuple) -> tuple:
        module.input_dtype = args[0].dtype
        return (args[0].float(), *args[1:])

    vae.encoder.register_forward_pre_hook(encode_in_float32)
    last = vae.quant_conv if vae.quant_conv is not None else vae.encoder
    last.register_forward_hook(lambda _, args, output: output.to(vae.encoder.input_dtype))
