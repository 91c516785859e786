"""Serve the demo artifact (the trained toy model, int8) on 127.0.0.1, render one prompt over HTTP, write the
image, read it back with the toy's checker; then repaint a quarter of it (inpainting: an object asked where the
mask is, the rest kept) and read that back too; stop the server."""

import argparse
import base64
import io
import socket
from pathlib import Path

from PIL import Image

from models.toy import SIZE, STEPS
from models.toy.checker import judge, read
from models.toy.scenes import Scene, parse_caption
from service.client import FluxClient
from service.launcher import free_port, running_server
from service.pictures import png
from service.schema import GenerationRequest, ImageRequest


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m service.demo", description=__doc__)
    parser.add_argument("--port", type=int, help="HTTP port (default: 3000, or a free one when 3000 is taken)")
    parser.add_argument("--out", type=Path, default=Path("build/demo.png"))
    parser.add_argument("--artifact", default="flux-toy-int8:latest", help="model-store tag to serve")
    parser.add_argument("--prompt", default="a large red circle at the bottom left on a black background")
    parser.add_argument("--repaint", default="a small yellow square at the top right on a black background")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    port = args.port or (3000 if port_is_free(3000) else free_port())
    env = {"FLUX_ARTIFACT": args.artifact, "FLUX_GRPC_ADDRESS": f"127.0.0.1:{free_port()}"}  # the demo speaks HTTP
    with running_server(port, args.out.with_suffix(".server.log"), env) as url:
        print(f"serving {args.artifact} on {url}")
        request = GenerationRequest(prompt=args.prompt, width=SIZE, height=SIZE, steps=STEPS, seed=42)
        args.out.write_bytes(FluxClient(url).txt2img(request))
        repainted = args.out.with_name(f"{args.out.stem}-repainted.png")
        repainted.write_bytes(FluxClient(url).img2img(inpainting(args.out.read_bytes(), args.repaint)))
    print(f"wrote {args.out.resolve()}")
    report(args.prompt, Image.open(io.BytesIO(args.out.read_bytes())))
    print(f"wrote {repainted.resolve()}: the top right quarter repainted")
    report(f"{args.prompt} (kept), {args.repaint} (repainted)", Image.open(repainted), both(args.prompt, args.repaint))


def inpainting(picture: bytes, prompt: str) -> ImageRequest:
    """Repaint the picture's top right quarter (white in the mask) with what `prompt` asks; keep the rest."""
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (SIZE // 2, 0, SIZE, SIZE // 2))
    encoded = {"image": picture, "mask": png(mask)}
    pictures = {name: base64.b64encode(data).decode() for name, data in encoded.items()}
    return ImageRequest(prompt=prompt, steps=STEPS, seed=42, strength=1.0, **pictures)


def both(kept: str, repainted: str) -> Scene | None:
    """The scene a kept picture and a repainted object make together."""
    first, second = parse_caption(kept), parse_caption(repainted)
    return Scene(first.background, first.things + second.things) if first and second else None


def report(prompt: str, image: Image.Image, asked: Scene | None = None) -> None:
    """What the checker sees, against what the prompt asked (`asked`, or the prompt's own scene)."""
    seen = read(image)
    print(f"asked:            {prompt}")
    print(f"the checker sees: {seen.caption() if seen.things else f'nothing on a {seen.background} background'}")
    if (asked := asked or parse_caption(prompt)) is not None:
        verdict = judge(asked, seen)
        wrong = [name for name, ok in verdict.matches.items() if not ok]
        print("drawn as asked" if verdict.all else f"not as asked: {', '.join(wrong)}")


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


if __name__ == "__main__":
    main()
