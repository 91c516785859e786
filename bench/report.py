"""The arithmetic of a benchmark report: percentiles, throughput, $/image, batch-size histograms."""

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

BATCH_BUCKET = re.compile(
    r'bentoml_service_adaptive_batch_size_bucket\{le="([^"]+)"[^}]*method_name="generate_[0-9]+"[^}]*\} (\S+)'
)


def peak_rss_bytes() -> int:
    """This process's own resident high-water mark (VmHWM). Not `ru_maxrss`: on Linux it carries the forking
    parent's resident set across fork and exec, so a child of a large parent reports the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (not Linux?)")


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in 0..100."""
    if not values:
        raise ValueError("no values")
    return float(np.percentile(values, q))


def usd_per_image(gpu_usd_per_hour: float, images_per_s: float) -> float:
    if images_per_s <= 0:
        return float("inf")
    return gpu_usd_per_hour / 3600 / images_per_s


def batch_histogram(metrics_text: str) -> dict[float, float]:
    """Cumulative counts of the worker's batch-size histogram by upper bound, summed over workers."""
    buckets: dict[float, float] = {}
    for le, count in BATCH_BUCKET.findall(metrics_text):
        buckets[float(le)] = buckets.get(float(le), 0.0) + float(count)
    return buckets


def batches_between(before: dict[float, float], after: dict[float, float]) -> dict[str, int]:
    """Batches run between two scrapes, per bucket ("≤1", "≤2", …), not cumulative."""
    counts, previous = {}, 0.0
    for bound in sorted(after):
        cumulative = after[bound] - before.get(bound, 0.0)
        label = "+Inf" if bound == float("inf") else f"<={bound:g}"
        counts[label] = int(round(cumulative - previous))
        previous = cumulative
    return {label: count for label, count in counts.items() if count}


@dataclass
class LevelResult:
    protocol: str
    concurrency: int
    wall_s: float
    latencies_s: list[float] = field(repr=False)
    statuses: dict[str, int]
    batches: dict[str, int]

    @property
    def ok(self) -> int:
        return self.statuses.get("200", 0) + self.statuses.get("OK", 0)

    @property
    def images_per_s(self) -> float:
        return self.ok / self.wall_s if self.wall_s else 0.0

    def summary(self, gpu_usd_per_hour: float) -> dict:
        latencies = self.latencies_s or [float("nan")]
        return {
            "protocol": self.protocol,
            "concurrency": self.concurrency,
            "requests": sum(self.statuses.values()),
            "ok": self.ok,
            "errors_by_status": {k: v for k, v in self.statuses.items() if k not in ("200", "OK")},
            "images_per_s": self.images_per_s,
            "p50_s": percentile(latencies, 50),
            "p95_s": percentile(latencies, 95),
            "p99_s": percentile(latencies, 99),
            "usd_per_image": usd_per_image(gpu_usd_per_hour, self.images_per_s),
            "batches": self.batches,
        }
