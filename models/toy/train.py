"""`python -m models train --out DIR`: train the toy FLUX model on generated pictures.

The VAE first, as an autoencoder of the pictures; then the transformer with FLUX's rectified-flow objective on
the VAE's latents. The text encoders stay as built (random, frozen), as FLUX.1 keeps T5 and CLIP frozen: the
transformer learns to read them. Reproducible from `--seed`; writes a diffusers folder, a loss curve and
`training.json` (the command, the losses, the files' sha256)."""

import argparse
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxPipeline
from rich.progress import Progress

from models.architecture import build_pipeline
from models.artifact import hash_files
from models.toy.scenes import STYLES, Scene, sample_scene

PRESET = "toy"
LATENT_SIDE = 16  # 64² pictures, 4× down in the VAE
IMAGE_TOKENS = (LATENT_SIDE // 2) ** 2  # 2×2 patches


@dataclass(frozen=True)
class Schedule:
    vae_steps: int = 3600
    vae_batch: int = 8
    steps: int = 10000
    batch: int = 32
    scenes: int = 30000  # pictures encoded once for the transformer's training
    lr: float = 5e-4
    ema: float = 0.999
    compile: bool = True  # a compiled training step is 1.5× faster on this CPU at batch 32, after ~1 min of compiling


def pixels(scenes: list[Scene], styles: tuple[str, ...] = ()) -> torch.Tensor:
    """Pictures (drawn in `styles`) as a batch in [-1, 1]."""
    arrays = [np.asarray(scene.draw(*styles), dtype=np.float32) for scene in scenes]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1


def object_weight(images: torch.Tensor, weight: float = 8.0) -> torch.Tensor:
    """1 on the background (near the top-left pixel's colour: its light varies a little), `weight` on the objects:
    they cover a few per cent of a picture, and a plain L1 loss learns the background alone first."""
    background = (images - images[:, :, :1, :1]).abs().amax(1, keepdim=True) < 0.3
    return torch.where(background, 1.0, weight)


KL_WEIGHT = 1e-3  # of the posterior's KL divergence per latent element, in the VAE's loss
# The VAE learns the pictures the adapters draw too: half its batches in a style stack. A VAE decodes only the
# colours it was taught: the one trained on plain pictures alone turns pastel back into the named colour
# (pastel blue into purple), and no adapter on the transformer can then draw pastel.
VAE_STYLES = ((), (), ("outlined",), ("pastel",), ("outlined", "pastel"), ())


def cosine(step: int, total: int, warmup: int = 100) -> float:
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total))


def train_vae(pipe: FluxPipeline, schedule: Schedule, rng: random.Random, losses: list[float]) -> dict[str, float]:
    """Reconstruction (L1, objects weighted) of a sample of the posterior, with a KL term, on fresh pictures every
    step: a VAE as FLUX.1's is. The decoder learns to draw from samples, so diffusers' pipelines, which encode by
    sampling, get the picture back; the KL keeps the latents smooth, which the transformer needs to learn them.
    Then the latents' scale; returns the posterior's figures."""
    vae = pipe.vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    with Progress() as progress:
        task = progress.add_task("VAE", total=schedule.vae_steps)
        for step in range(schedule.vae_steps):
            for group in optimizer.param_groups:
                group["lr"] = 2e-3 * cosine(step, schedule.vae_steps)
            images = pixels([sample_scene(rng) for _ in range(schedule.vae_batch)], VAE_STYLES[step % len(VAE_STYLES)])
            posterior = vae.encode(images).latent_dist
            error = (vae.decode(posterior.sample(generator)).sample - images).abs()
            divergence = posterior.kl().mean() / posterior.mean[0].numel()
            loss = (error * object_weight(images)).mean() + KL_WEIGHT * divergence
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            progress.update(task, advance=1, description=f"VAE loss {loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        latents = vae.encode(pixels([sample_scene(rng) for _ in range(1024)])).latent_dist.mode()
    vae.register_to_config(shift_factor=latents.mean().item(), scaling_factor=1 / latents.std().item())
    scenes = [sample_scene(rng) for _ in range(256)]
    return posterior_figures(vae, scenes, generator) | {"psnr_pastel_db": round_trip_db(vae, scenes, ("pastel",))}


@torch.no_grad()
def posterior_figures(vae, scenes: list[Scene], generator: torch.Generator) -> dict[str, float]:
    """The posterior's spread (mean std) against the spread of its means, and the round trip's PSNR through the
    mean and through a sample."""
    images = pixels(scenes)
    posterior = vae.encode(images).latent_dist
    figures = {"posterior_std": posterior.std.mean().item(), "latent_std": posterior.mean.std().item()}
    for name, latents in (("mean", posterior.mode()), ("sample", posterior.sample(generator))):
        figures[f"psnr_{name}_db"] = psnr_db(vae.decode(latents).sample, images)
    return figures


@torch.no_grad()
def round_trip_db(vae, scenes: list[Scene], styles: tuple[str, ...]) -> float:
    """The round trip's PSNR (through the mean) of `scenes` drawn in `styles`."""
    images = pixels(scenes, styles)
    return psnr_db(vae.decode(vae.encode(images).latent_dist.mode()).sample, images)


def psnr_db(decoded: torch.Tensor, images: torch.Tensor) -> float:
    error = ((decoded.clamp(-1, 1) - images) / 2).pow(2).mean().item()
    return round(10 * math.log10(1 / error), 2)


@torch.no_grad()
def encode(pipe: FluxPipeline, scenes: list[Scene], styles: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Normalized, packed latents and both text encodings, in chunks."""
    parts: dict[str, list[torch.Tensor]] = {"latents": [], "prompt_embeds": [], "pooled": []}
    vae = pipe.vae.config
    for start in range(0, len(scenes), 500):
        chunk = scenes[start : start + 500]
        latents = pipe.vae.encode(pixels(chunk, styles)).latent_dist.mode()
        latents = (latents - vae.shift_factor) * vae.scaling_factor
        parts["latents"].append(pipe._pack_latents(latents, len(chunk), 16, LATENT_SIDE, LATENT_SIDE))
        embeds, pooled, _ = pipe.encode_prompt(
            [scene.caption() for scene in chunk], None, max_sequence_length=pipe.tokenizer_2.model_max_length
        )
        parts["prompt_embeds"].append(embeds)
        parts["pooled"].append(pooled)
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


def flow_loss(transformer, data: dict[str, torch.Tensor], index: torch.Tensor, generator: torch.Generator):
    """FLUX's rectified flow: the transformer predicts noise − data at a point between them. Half the batch at
    the schedule's shifted timesteps (logit-normal, shifted as the pipeline shifts its image tokens), half
    uniform: a caption has many pictures, and their edges form at low noise, which the shifted ones rarely
    reach."""
    latents = data["latents"][index]
    batch = len(index)
    noise = torch.randn(latents.shape, generator=generator)
    sigma = torch.sigmoid(torch.randn(batch, generator=generator))
    mu = math.exp(shift_mu())
    sigma = mu / (mu + (1 / sigma - 1))
    sigma = torch.where(torch.arange(batch) % 2 == 0, sigma, torch.rand(batch, generator=generator))
    noisy = (1 - sigma[:, None, None]) * latents + sigma[:, None, None] * noise
    prediction = transformer(
        hidden_states=noisy,
        timestep=sigma,
        guidance=1 + 4 * torch.rand(batch, generator=generator),
        pooled_projections=data["pooled"][index],
        encoder_hidden_states=data["prompt_embeds"][index],
        txt_ids=torch.zeros(data["prompt_embeds"].shape[1], 3),
        img_ids=FluxPipeline._prepare_latent_image_ids(batch, LATENT_SIDE // 2, LATENT_SIDE // 2, "cpu", torch.float32),
        return_dict=False,
    )[0]
    return (prediction - (noise - latents)).pow(2).mean()


def shift_mu(seq_len: int = IMAGE_TOKENS) -> float:
    """The pipeline's `calculate_shift` for FLUX.1-dev's scheduler at this many image tokens."""
    slope = (1.15 - 0.5) / (4096 - 256)
    return seq_len * slope + 0.5 - slope * 256


def train_transformer(
    transformer, data: dict[str, torch.Tensor], schedule: Schedule, seed: int, losses: list[float], label: str
) -> None:
    """AdamW with warm-up and cosine decay; the weights kept are an exponential moving average."""
    generator = torch.Generator().manual_seed(seed)
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=schedule.lr, weight_decay=0.0)
    average = [p.detach().clone() for p in trainable]
    transformer.train()
    loss_of = torch.compile(flow_loss) if schedule.compile else flow_loss
    with Progress() as progress:
        task = progress.add_task(label, total=schedule.steps)
        for step in range(schedule.steps):
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr * cosine(step, schedule.steps)
            index = torch.randint(len(data["latents"]), (schedule.batch,), generator=generator)
            loss = loss_of(transformer, data, index, generator)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            decay = min(schedule.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(average, [p.detach() for p in trainable], 1 - decay)
            losses.append(loss.item())
            progress.update(task, advance=1, description=f"{label} loss {loss.item():.4f}")
    with torch.no_grad():
        for parameter, kept in zip(trainable, average, strict=True):
            parameter.copy_(kept)
    transformer.eval()


def plot(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    curves = {name: losses for name, losses in curves.items() if losses}
    figure, axes = pyplot.subplots(1, len(curves), figsize=(5 * len(curves), 3.5))
    for axis, (name, losses) in zip(np.atleast_1d(axes), curves.items(), strict=True):
        window = max(1, len(losses) // 100)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        axis.plot(smooth)
        axis.set(title=f"{name} loss", xlabel="step", yscale="log")
    figure.tight_layout()
    figure.savefig(path, dpi=80)


def train(out: Path, seed: int, schedule: Schedule, argv: list[str]) -> dict:
    """Train both models, save the pipeline in bf16 with its record; returns the record."""
    torch.manual_seed(seed)
    started = time.perf_counter()
    rng = random.Random(seed)
    pipe = build_pipeline(PRESET, seed=seed, dtype=torch.float32)
    curves: dict[str, list[float]] = {"VAE": [], "transformer": []}
    vae_figures = train_vae(pipe, schedule, rng, curves["VAE"])
    print(f"VAE: {vae_figures}", flush=True)
    data = encode(pipe, [sample_scene(rng) for _ in range(schedule.scenes)])
    train_transformer(pipe.transformer, data, schedule, seed, curves["transformer"], "transformer")
    pipe.to(torch.bfloat16).save_pretrained(out)
    plot(curves, out / "loss.png")
    record = {
        "command": "python -m models train " + " ".join(argv),
        "seed": seed,
        "schedule": schedule.__dict__,
        "seconds": round(time.perf_counter() - started),
        "final_loss": {name: float(np.mean(losses[-50:])) for name, losses in curves.items() if losses},
        "vae": vae_figures,
    }
    write_record(out, record)
    return record


def write_record(out: Path, record: dict) -> None:
    """`training.json`, with the sha256 of every other file in the folder."""
    record["files"] = {path: sha for path, sha in hash_files(out).items() if path != "training.json"}
    (out / "training.json").write_text(json.dumps(record, indent=2))


# Attention and MLP projections of every block, and the output projections (single blocks' and the last):
# colour and fill are decided late in the network.
LORA_TARGETS = [
    *("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
    *("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out"),
]


def train_lora(folder: Path, style: str, seed: int, schedule: Schedule, argv: list[str]) -> dict:
    """A PEFT LoRA on the trained transformer in `folder`, taught `style` on the same captions; written as a
    diffusers LoRA file to `folder/loras/STYLE.safetensors`."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    started = time.perf_counter()
    pipe = FluxPipeline.from_pretrained(folder, dtype=torch.float32)
    rng = random.Random(seed)
    data = encode(pipe, [sample_scene(rng) for _ in range(schedule.scenes)], (style,))
    pipe.transformer.requires_grad_(False)
    pipe.transformer.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=LORA_TARGETS), adapter_name=style)
    losses: list[float] = []
    train_transformer(pipe.transformer, data, schedule, seed, losses, f"LoRA {style}")
    layers = {
        name: tensor.to(torch.bfloat16)
        for name, tensor in get_peft_model_state_dict(pipe.transformer, adapter_name=style).items()
    }
    FluxPipeline.save_lora_weights(folder / "loras", transformer_lora_layers=layers, weight_name=f"{style}.safetensors")
    record = {
        "command": "python -m models train " + " ".join(argv),
        "seconds": round(time.perf_counter() - started),
        "final_loss": float(np.mean(losses[-50:])),
    }
    training = json.loads((folder / "training.json").read_text())
    training.setdefault("loras", {})[style] = record
    write_record(folder, training)
    return record


LOGVAR_DROP = 20.0  # the posterior's log-variance lowered by this much: its spread times e^-10


def tighten_posterior(folder: Path, seed: int, argv: list[str]) -> dict:
    """A VAE trained on its posterior's mean (the committed weights, 65ff0cd) never learned a variance: its
    encoder says log-variance ~0, a spread of 1.0 against means spread ~0.4, so a sampled encode (diffusers'
    image pipelines') speckles every picture. As an autoencoder of its means its posterior is a point: lower
    its log-variance output (the encoder's last bias, second half) by LOGVAR_DROP. The means, the decoder and
    the transformer are untouched. Records the posterior's figures before and after in `training.json`."""
    pipe = FluxPipeline.from_pretrained(folder, dtype=torch.bfloat16)
    vae, rng = pipe.vae.float(), random.Random(seed)
    scenes = [sample_scene(rng) for _ in range(256)]
    before = posterior_figures(vae, scenes, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        vae.encoder.conv_out.bias[vae.config.latent_channels :] -= LOGVAR_DROP
    after = posterior_figures(vae, scenes, torch.Generator().manual_seed(seed))
    vae.to(torch.bfloat16).save_pretrained(folder / "vae")
    config = json.loads((folder / "vae" / "config.json").read_text())
    config.pop("_name_or_path", None)  # where it was read from: not part of the model
    (folder / "vae" / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    training = json.loads((folder / "training.json").read_text())
    training["vae_posterior_tightened"] = {
        "command": "python -m models train " + " ".join(argv),
        "logvar_drop": LOGVAR_DROP,
        "before": before,
        "after": after,
    }
    write_record(folder, training)
    return {"seconds": 0, **after}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m models train", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="folder to write (diffusers layout)")
    parser.add_argument("--seed", type=int, default=0)
    for name, default in Schedule().__dict__.items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            parser.add_argument(flag, type=type(default), default=default)
    parser.add_argument(
        "--lora", choices=STYLES, help="train this style's LoRA on the trained model in --out (--steps, --scenes)"
    )
    parser.add_argument(
        "--tighten-posterior",
        action="store_true",
        help="make the VAE in --out (trained on its posterior's mean) encode to its means when sampled",
    )
    args = parser.parse_args(argv)
    schedule = Schedule(**{name: getattr(args, name) for name in Schedule().__dict__})
    if args.tighten_posterior:
        record = tighten_posterior(args.out, args.seed, argv)
    elif args.lora:
        record = train_lora(args.out, args.lora, args.seed, schedule, argv)
    else:
        record = train(args.out, args.seed, schedule, argv)
    print(f"trained in {record['seconds']} s: {args.out}")
