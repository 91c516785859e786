"""The toy model's pictures, the checker that reads them back, and the command that trains it."""

import json
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image
from safetensors.torch import load_file

from models.artifact import hash_files
from models.gguf_file import GGUFTransformer, gguf_from_diffusers
from models.toy import TRAINED
from models.toy.checker import ATTRIBUTES, adherence, judge, read, style_adherence
from models.toy.scenes import (
    COLOURS,
    HELD_OUT,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    every_pair_kept,
    held_out_prompts,
    parse_caption,
    sample_scene,
    vary,
)
from models.toy.train import Schedule, pixels, posterior_figures, train, train_lora


def scenes(count: int, seed: int = 0) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng, "train" if i % 2 else "held_out") for i in range(count)]


def test_the_checker_reads_at_least_98_percent_of_generated_pictures_entirely_right():
    asked = scenes(600)
    shares = adherence(asked, [scene.draw() for scene in asked])
    assert shares["all"] >= 0.98, shares
    assert all(shares[attribute] >= 0.98 for attribute in ATTRIBUTES), shares


def test_one_caption_has_many_pictures_and_the_checker_reads_each_ones_look():
    """The seed moves, sizes, turns and shades each object within what its caption says, and lights the
    background; the checker reads the look back (what the diversity figure measures)."""
    rng = random.Random(4)
    for caption in held_out_prompts(40, things=1, seed=9):
        pictures = [vary(caption, rng) for _ in range(3)]
        assert len({np.asarray(p.draw()).tobytes() for p in pictures}) == 3
        for picture in pictures:
            drawn, (seen,) = picture.things[0], read(picture.draw()).things
            assert seen == drawn and picture.caption() == caption.caption()
            assert np.allclose(seen.look.shift, drawn.look.shift, atol=1.0), (seen.look, drawn.look)
            assert abs(SIZES[seen.size] * seen.look.growth - drawn.half) <= 0.12 * drawn.half, (seen.look, drawn.look)
            if drawn.shape != "circle":
                assert abs(seen.look.turn - drawn.look.turn) <= 6, (seen.look, drawn.look)
            assert np.abs(np.subtract(seen.rgb(), drawn.rgb())).max() <= 1


@pytest.mark.parametrize("attribute", ["colour", "shape", "position", "size", "background", "count"])
def test_the_checker_sees_each_attribute_drawn_wrong(attribute):
    asked = Scene("white", (sample_scene(random.Random(3), count=1).things[0],))
    thing = asked.things[0]
    changed = {
        "colour": lambda: replace(
            asked, things=(replace(thing, colour=next(c for c in COLOURS if c != thing.colour)),)
        ),
        "shape": lambda: replace(asked, things=(replace(thing, shape=next(s for s in SHAPES if s != thing.shape)),)),
        "position": lambda: replace(
            asked, things=(replace(thing, position="centre" if thing.position != "centre" else "top left"),)
        ),
        "size": lambda: replace(asked, things=(replace(thing, size="small" if thing.size == "large" else "large"),)),
        "background": lambda: replace(asked, background="black"),
        "count": lambda: replace(asked, things=()),
    }[attribute]()
    verdict = judge(asked, read(changed.draw()))
    assert not verdict.matches[attribute] and not verdict.all
    assert judge(asked, read(asked.draw())).all


def test_training_never_draws_a_held_out_combination_yet_draws_every_pair_of_them():
    rng = random.Random(1)
    drawn = {thing.combination for _ in range(3000) for thing in sample_scene(rng).things}
    assert not drawn & HELD_OUT
    assert every_pair_kept(drawn)
    assert all(scene.things[0].combination in HELD_OUT for scene in scenes(50)[::2])


def test_captions_are_plain_english_and_read_back_to_their_scene():
    for scene in scenes(300):
        assert parse_caption(scene.caption()) == scene
    assert parse_caption("a lighthouse on a cliff at dawn") is None


@pytest.mark.parametrize("styles", [(), ("outlined",), ("pastel",), ("outlined", "pastel")])
def test_the_checker_reads_each_style_with_its_hue_and_tells_styles_apart(styles):
    """The adapters' effects as the checker judges them: the picture drawn as asked (pastel keeps the hue, an
    outline reads as its shape), and exactly the styles asked, not another."""
    asked = scenes(200)
    images = [scene.draw(*styles) for scene in asked]
    assert style_adherence(asked, images, frozenset(styles))["all"] >= 0.98
    for other in ({"outlined"}, {"pastel"}, set()):
        if other != set(styles):
            assert style_adherence(asked, images, frozenset(other))["effect"] <= 0.02, other


def test_the_training_command_trains_both_models_and_a_lora_and_records_them(tmp_path):
    """Also: the VAE's decoder learns from the posterior's samples, so a sampled round trip decodes as the mean
    does (diffusers' img2img, inpainting and ControlNet pipelines encode by sampling it), and its KL keeps the
    posterior tighter than the latents spread."""
    schedule = Schedule(vae_steps=150, vae_batch=4, steps=3, batch=8, scenes=16, compile=False)
    record = train(tmp_path, seed=0, schedule=schedule, argv=["--out", str(tmp_path)])
    assert set(record["final_loss"]) == {"VAE", "transformer"}
    figures = record["vae"]
    assert abs(figures["psnr_mean_db"] - figures["psnr_sample_db"]) <= 1, figures
    assert figures["posterior_std"] < 0.75 * figures["latent_std"], figures  # 0.16× after the full 3600 steps
    assert "psnr_pastel_db" in figures, figures  # recorded: the adapters' pictures through the VAE
    Image.open(tmp_path / "loss.png").verify()
    pipe = FluxPipeline.from_pretrained(tmp_path)
    assert pipe.vae.config.scaling_factor != 1.0  # set from the trained VAE's latents
    train_lora(tmp_path, "pastel", seed=0, schedule=schedule, argv=["--lora", "pastel"])
    assert (tmp_path / "loras" / "pastel.safetensors").is_file()
    saved = json.loads((tmp_path / "training.json").read_text())
    assert saved["files"] == {path: sha for path, sha in hash_files(tmp_path).items() if path != "training.json"}


def test_the_vae_posterior_is_tight_so_a_sampled_round_trip_keeps_the_picture():
    """diffusers' img2img, inpainting and ControlNet pipelines encode by sampling the posterior. (The committed VAE
    was trained on its posterior's mean; `--tighten-posterior` made its posterior a point: a sample of today's
    posterior loses 10 dB.)"""
    vae = FluxPipeline.from_pretrained(TRAINED, dtype=torch.float32).vae
    figures = posterior_figures(vae, scenes(64, seed=5), torch.Generator().manual_seed(0))
    assert figures["psnr_mean_db"] >= 24 and abs(figures["psnr_mean_db"] - figures["psnr_sample_db"]) <= 1, figures
    assert figures["posterior_std"] < 0.1 * figures["latent_std"], figures


def test_diffusers_inpainting_keeps_the_unmasked_region_as_the_vae_round_trip_does():
    """diffusers' own FluxInpaintPipeline on the toy: one held-out object kept, another asked for in a masked
    place; outside the mask the picture stays within 1 dB of the VAE's own round trip of the input."""
    from diffusers import FluxInpaintPipeline

    pipe = FluxInpaintPipeline.from_pretrained(TRAINED, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    kept, asked, masks, inputs = [], [], [], []
    for index, scene in enumerate(held_out_prompts(6, things=1, seed=13)):
        thing = scene.things[0]
        place = next(p for p in ("top right", "bottom left", "top left") if p != thing.position)
        added = sample_scene(random.Random(index), count=1).things[0]
        added = replace(added, position=place, size="small")
        mask = np.zeros((64, 64), dtype=np.uint8)
        (x, y) = POSITIONS[place]
        mask[y - 14 : y + 14, x - 14 : x + 14] = 255
        kept.append(replace(scene, things=(replace(thing, size="small"),)))
        asked.append(Scene(scene.background, (kept[-1].things[0], added)))
        inputs.append(kept[-1].draw())
        masks.append(Image.fromarray(mask))
    out = pipe(
        [scene.caption() for scene in asked],
        image=inputs,
        mask_image=masks,
        height=64,
        width=64,
        strength=1.0,
        num_inference_steps=28,
        generator=[torch.Generator().manual_seed(i) for i in range(len(asked))],
    ).images
    with torch.no_grad():
        images = pixels(kept)
        latents = pipe.vae.encode(images).latent_dist.sample(torch.Generator().manual_seed(0))
        trips = pipe.image_processor.postprocess(pipe.vae.decode(latents).sample, output_type="pil")
    outside = [np.asarray(mask) == 0 for mask in masks]
    painted = [psnr(image, result, keep) for image, result, keep in zip(inputs, out, outside, strict=True)]
    trip = [psnr(image, result, keep) for image, result, keep in zip(inputs, trips, outside, strict=True)]
    assert np.mean(painted) >= np.mean(trip) - 1.0, (painted, trip)
    pairs = zip(kept, out, strict=True)
    kept_seen = [judge(scene, only_at(read(image), scene.things[0].position)).all for scene, image in pairs]
    assert np.mean(kept_seen) >= 0.8, kept_seen


def psnr(image: Image.Image, other: Image.Image, region: np.ndarray) -> float:
    from skimage.metrics import peak_signal_noise_ratio

    return peak_signal_noise_ratio(np.asarray(image)[region], np.asarray(other)[region], data_range=255)


def only_at(seen: Scene, position: str) -> Scene:
    return Scene(seen.background, tuple(thing for thing in seen.things if thing.position == position))


def test_the_committed_weights_are_the_ones_their_record_names():
    record = json.loads((TRAINED / "training.json").read_text())
    assert record["command"].startswith("python -m models train")
    assert record["files"] == {path: sha for path, sha in hash_files(TRAINED).items() if path != "training.json"}
    assert {"outlined", "pastel"} <= set(record.get("loras", {}))


def test_a_gguf_file_of_the_toy_transformer_reads_back_as_its_tensors(tmp_path):
    """diffusers' converter assumes FLUX.1's widths (3072); the toy is 128 wide, and its GGUF file still maps
    every diffusers tensor to its rows: F32 tensors exactly, Q8_0 weights within a block's rounding."""
    folder = TRAINED / "transformer"
    weights = load_file(folder / "diffusion_pytorch_model.safetensors")
    read = GGUFTransformer(gguf_from_diffusers(folder, tmp_path / "toy.gguf", "Q8_0"))
    assert sorted(read.keys()) == sorted(weights)
    for name, tensor in weights.items():
        back, tensor = read.get(name).reshape(tensor.shape), tensor.float()
        if read.is_quantized(name):
            assert (back - tensor).abs().max() <= tensor.abs().max() / 127, name
        else:
            assert torch.equal(back, tensor), name
