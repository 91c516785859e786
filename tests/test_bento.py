"""`bentoml build` makes a versioned Bento that references the served artifact."""

import json

from tests.conftest import run_module


def test_bento_builds_and_lists_the_served_model(tiny_int8_tag):
    built = run_module("bentoml", "build", ".", "--output", "tag", env={"FLUX_ARTIFACT": tiny_int8_tag})
    assert built.returncode == 0, built.stderr
    tag = built.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    described = run_module("bentoml", "get", tag, "-o", "json")
    bento = json.loads(described.stdout)
    worker = next(service for service in bento["services"] if service["name"] == "FluxWorker")
    assert [model["tag"] for model in worker["models"]] == [tiny_int8_tag]
    assert bento["labels"]["project"] == "flux-serve"
