"""Peak GPU memory against sequence length, from benchmarks/train.py results and the peers' anchor output.

    python benchmarks/plot_memory.py out.png ours.json [more.json ...] [peers.jsonl ...]

A `.json` file is what train.py writes (rows with seq, peak_gib or error, including the rows a --search tried); a
`.jsonl` file holds the JSON lines anchor_e2e.py prints ({"<mode> <shape> S=<n> N=<world>": {...} or "OOM"}), one
series per peer mode. A failed length is drawn as a cross at the top of the plot. Prints a markdown table of the same
points.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def our_points(path: Path) -> dict[str, list[tuple[int, float | None]]]:
    """{label: [(seq, peak GiB or None if it failed)]} per mode and switches of a train.py result file."""
    series: dict[str, list[tuple[int, float | None]]] = {}
    for row in json.loads(path.read_text())["results"]:
        for r in row.get("tried", [row]):
            if "seq" not in r or ("error" not in r and r.get("peak_gib") is None):
                continue  # a search summary, or a CPU run without a GPU peak
            label = f"transformers_cp {r['shape']} {r['mode']}" + (" +offload" if r.get("offload_activations") else "")
            label += " fsdp" if r.get("fsdp") else ""
            series.setdefault(label, []).append((r["seq"], None if "error" in r else r.get("peak_gib")))
    return series


def peer_points(path: Path) -> dict[str, list[tuple[int, float | None]]]:
    """{peer mode: [(seq, peak GiB or None if it failed)]} from anchor_e2e.py's output lines."""
    series: dict[str, list[tuple[int, float | None]]] = {}
    for line in path.read_text().splitlines():
        if not line.startswith("{"):
            continue
        for key, value in json.loads(line).items():
            seq = int(re.search(r"S=(\d+)", key).group(1))
            peak = value.get("peak_gib") if isinstance(value, dict) else None
            series.setdefault(f"peer: {key.split()[0]} {key.split()[1]}", []).append((seq, peak))
    return series


def main() -> None:
    out, *files = sys.argv[1:]
    series: dict[str, list[tuple[int, float | None]]] = {}
    for file in map(Path, files):
        for label, points in (peer_points(file) if file.suffix == ".jsonl" else our_points(file)).items():
            series.setdefault(label, []).extend(points)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    top = max((p for pts in series.values() for _, p in pts if p is not None), default=1.0) * 1.1
    print("| run | length | peak GiB |\n|---|---|---|")
    for label, points in series.items():
        points = sorted(set(points))
        ok = [(s / 1024, p) for s, p in points if p is not None]
        failed = [s / 1024 for s, p in points if p is None]
        line = ax.plot(*zip(*ok), marker="o", label=label)[0] if ok else None
        if failed:
            ax.scatter(failed, [top] * len(failed), marker="x", color=line.get_color() if line else None)
        for seq, peak in points:
            print(f"| {label} | {seq / 1024:g}k | {'failed' if peak is None else peak} |")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (k tokens)")
    ax.set_ylabel("peak GPU memory per GPU (GiB)")
    ax.set_title("peak memory of one training step (x: out of memory)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
