"""Client for the FLUX service: `python -m service.client "a prompt" -o out.png`."""

import argparse
from pathlib import Path

import httpx

from service.schema import GenerationRequest


class FluxClient:
    """HTTP client; raises httpx.HTTPStatusError with the server's message on 4xx/5xx."""

    def __init__(self, url: str = "http://127.0.0.1:3000", timeout_s: float = 900) -> None:
        self.http = httpx.Client(base_url=url, timeout=timeout_s)

    def txt2img(self, request: GenerationRequest) -> bytes:
        """PNG bytes for one request."""
        response = self.http.post("/txt2img", json=request.model_dump())
        if response.is_error:
            raise httpx.HTTPStatusError(f"{response.status_code}: {response.text}", request=response.request,
                                        response=response)
        return response.content


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m service.client", description=__doc__)
    parser.add_argument("prompt")
    parser.add_argument("-o", "--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--url", default="http://127.0.0.1:3000")
    for name, field in GenerationRequest.model_fields.items():
        if name != "prompt":
            parser.add_argument(f"--{name}", type=field.annotation, default=field.default, help=field.description)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    fields = {name: getattr(args, name) for name in GenerationRequest.model_fields}
    png = FluxClient(args.url).txt2img(GenerationRequest(**fields))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(png)
    print(args.out)


if __name__ == "__main__":
    main()
