"""The GPU check (`python -m bench.gpu`) runs end to end in its CPU dry run: every part, every row."""

import json

import pytest

from bench.gpu import ANCHORS, RECIPE_ROWS
from tests.conftest import run_module

PARTS = ["machine", "weights", "service", "recipes", "anchors", "schnell", "lora_and_cache", "cost"]


@pytest.mark.slow  # over a minute: every part of the GPU check, on CPU
def test_the_dry_run_writes_every_part_of_the_report(tmp_path):
    result = run_module("bench.gpu", "--dry-run", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    parts = {row["part"]: row for row in map(json.loads, (tmp_path / "report.jsonl").read_text().splitlines())}
    assert list(parts) == PARTS
    assert all(row["status"] == "ok" for name, row in parts.items() if name != "machine"), parts
    service = parts["service"]
    assert service["strategy"] and service["s_per_image_batch_1"] > 0 and service["oom_splits"] == 0
    assert service[f"s_per_image_batch_{service['plan_batch']}"] > 0 and service["lora_4_stacks_over_none"] > 0
    recipes = {row["recipe"]: row for row in parts["recipes"]["rows"]}
    assert list(recipes) == list(RECIPE_ROWS) and all(row["s_per_image"] > 0 for row in recipes.values())
    assert "GGUFLinear" in recipes["gguf Q4_0"]["modules_that_ran"]
    assert (
        "QLinear" in recipes["int8"]["modules_that_ran"] and "Linear8bitLt" in recipes["int8-bnb"]["modules_that_ran"]
    )
    anchors = {row["anchor"]: row for row in parts["anchors"]["rows"]}
    assert list(anchors) == list(ANCHORS)
    assert all(anchors[name]["s_per_image"] > 0 for name in ANCHORS[:3])
    assert "GPU" in anchors[ANCHORS[3]]["error"]  # diffusers' bitsandbytes quantizer refuses a CPU
    assert parts["cost"]["usd_per_image"] > 0
    markdown = (tmp_path / "report.md").read_text()
    assert all(f"## {number}." in markdown for number in range(1, 8))
