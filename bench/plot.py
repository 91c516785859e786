"""Latency and throughput against concurrency, one line per protocol."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_levels(levels: list[dict], path: Path, title: str) -> None:
    figure, (latency, throughput) = plt.subplots(1, 2, figsize=(11, 4))
    for protocol in sorted({level["protocol"] for level in levels}):
        rows = [level for level in levels if level["protocol"] == protocol]
        x = [row["concurrency"] for row in rows]
        latency.plot(x, [row["p50_s"] for row in rows], marker="o", label=f"{protocol} p50")
        latency.plot(x, [row["p95_s"] for row in rows], marker="x", linestyle="--", label=f"{protocol} p95")
        throughput.plot(x, [row["images_per_s"] for row in rows], marker="o", label=protocol)
    latency.set(xlabel="concurrency", ylabel="latency (s)", title="latency")
    throughput.set(xlabel="concurrency", ylabel="images/s", title="throughput")
    levels = sorted({level["concurrency"] for level in levels})
    for axes in (latency, throughput):
        axes.set_xscale("log", base=2)
        axes.set_xticks(levels, labels=[str(level) for level in levels])
        axes.legend()
        axes.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
