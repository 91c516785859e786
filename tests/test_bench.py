"""The benchmark's arithmetic, its failure when nothing listens, and one real run against a tiny server."""

import json
import subprocess
import sys
from pathlib import Path

import bentoml
import pytest

from bench.report import LevelResult, batch_histogram, batches_between, percentile, usd_per_image
from tests.conftest import free_port, run_module

REPO = Path(__file__).resolve().parent.parent
LABELS = 'method_name="generate_512",runner_name="FluxWorker",worker_index="1"'
METRICS = "# HELP bentoml_service_adaptive_batch_size Batch size\n" + "".join(
    f'bentoml_service_adaptive_batch_size_bucket{{le="{le}",{LABELS}}} %d\n' for le in ("1.0", "2.0", "4.0", "+Inf")
)


def test_percentiles_interpolate_linearly():
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 95) == pytest.approx(95.05)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([3.0], 99) == 3.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_usd_per_image():
    assert usd_per_image(3.6, 1.0) == pytest.approx(0.001)  # $3.60/h at 1 image/s
    assert usd_per_image(2.0, 0.5) == pytest.approx(2.0 / 3600 / 0.5)
    assert usd_per_image(2.0, 0.0) == float("inf")


def test_batch_histogram_difference_between_scrapes():
    before = batch_histogram(METRICS % (3, 3, 3, 3))
    after = batch_histogram(METRICS % (5, 6, 9, 9))
    assert batches_between(before, after) == {"<=1": 2, "<=2": 1, "<=4": 3}


def test_level_summary():
    level = LevelResult(
        "http", 4, wall_s=2.0, latencies_s=[0.1, 0.2, 0.3, 0.4], statuses={"200": 4, "503": 1}, batches={"<=4": 1}
    )
    summary = level.summary(gpu_usd_per_hour=7.2)
    assert summary["images_per_s"] == 2.0 and summary["ok"] == 4
    assert summary["errors_by_status"] == {"503": 1}
    assert summary["usd_per_image"] == pytest.approx(0.001)
    assert summary["p50_s"] == pytest.approx(0.25)


def test_fails_clearly_when_the_server_is_not_reachable(tmp_path):
    port = free_port()
    result = run_module("bench", "--url", f"http://127.0.0.1:{port}", "--out", str(tmp_path))
    assert result.returncode == 2
    assert f"http://127.0.0.1:{port}: not reachable" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # over half a minute: `make test-all`
def test_run_against_a_tiny_server_writes_json_and_png(tiny_int8_tag, tmp_path):
    mix = tmp_path / "mix.json"  # small shapes: bf16 convolutions are slow on CPUs without avx512_bf16
    mix.write_text(json.dumps([{"width": 64, "height": 64, "steps": 2}, {"width": 128, "height": 128, "steps": 2}]))
    result = run_module(
        "bench",
        "--serve",
        tiny_int8_tag,
        "--url",
        f"http://127.0.0.1:{free_port()}",
        "--grpc-target",
        f"127.0.0.1:{free_port()}",
        "--concurrency",
        "1,4",
        "--requests",
        "8",
        "--overhead-requests",
        "2",
        "--overhead-size",
        "128",
        "--mix",
        str(mix),
        "--out",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [(level["protocol"], level["concurrency"]) for level in report["levels"]] == [
        ("http", 1),
        ("http", 4),
        ("grpc", 1),
        ("grpc", 4),
    ]
    assert all(level["ok"] == 8 and not level["errors_by_status"] for level in report["levels"])
    overhead = report["overhead"]
    assert overhead["width"] == overhead["height"] == 128 and overhead["requests"] == 2
    assert (
        overhead["ratio"] > 0
        and overhead["served_median_s"] - overhead["in_process_median_s"] == overhead["overhead_s"]
    )
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "serving overhead" in result.stdout


@pytest.mark.slow  # over half a minute: `make test-all`
def test_cold_start_reports_the_load_over_cat(tiny_int8_tag):
    folder = bentoml.models.get(tiny_int8_tag).path
    result = run_module("bench.cold_start", folder)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "load now" in result.stdout and "x)" in result.stdout


def test_a_childs_peak_memory_is_its_own_not_its_parents():
    """bench.streaming and bench.recipes measure in a child: `ru_maxrss` would report the parent's size."""
    ballast = b"\x01" * (768 << 20)  # the parent's resident set grows by 768 MiB before it starts the child
    child = subprocess.run(
        [sys.executable, "-c", CHILD_PEAKS], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    own, inherited = map(int, child)
    assert inherited >= len(ballast), "ru_maxrss no longer inherits the parent's: the test cannot see the fault"
    assert own < 256 << 20, f"{own / 2**20:.0f} MiB for a child that imported numpy"


CHILD_PEAKS = """
import resource
from bench.report import peak_rss_bytes
print(peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""
