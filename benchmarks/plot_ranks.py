"""A plot and a markdown table from benchmarks/attention_ranks.py results: compute-only efficiency per mode, one file
or a before and an after.

    python benchmarks/plot_ranks.py benchmarks/results/attention_ranks_1xH200.json \
        --before benchmarks/results/attention_ranks_before_1xH200.json
writes attention_ranks_1xH200.png beside the first JSON and prints the table (before → after where both hold a cell).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _cells(path: str) -> tuple[dict, dict[tuple, dict[str, float]]]:
    data = json.load(open(path))
    rows = {}
    for r in data["results"]:
        key = (r["seq"], r["hq"], r["hk"], r["docs"])
        rows[key] = {
            m: e["efficiency_compute"] for m, e in r.items() if isinstance(e, dict) and "efficiency_compute" in e
        }
    return data["meta"], rows


def table(after: dict, before: dict) -> str:
    modes = list(dict.fromkeys(m for cells in after.values() for m in cells))
    lines = ["| S | heads q/kv | docs | " + " | ".join(modes) + " |", "|" + "---|" * (3 + len(modes))]
    for key, cells in after.items():
        seq, hq, hk, docs = key
        out = []
        for m in modes:
            was = before.get(key, {}).get(m)
            now = cells.get(m)
            out.append("–" if now is None else f"{was:.2f} → **{now:.2f}**" if was is not None else f"{now:.2f}")
        lines.append(f"| {seq // 1024}k | {hq}/{hk} | {docs} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def plot(after: dict, before: dict, meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in after if k[3] != "single"] or list(after)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), sharey=True, squeeze=False)
    for ax, key in zip(axes[0], keys):
        modes = list(after[key])
        x = range(len(modes))
        if before.get(key):
            ax.bar([i - 0.2 for i in x], [before[key].get(m, 0) for m in modes], 0.4, label="before", color="#bbb")
        ax.bar(
            [i + 0.2 for i in x] if before.get(key) else list(x), [after[key][m] for m in modes], 0.4, label="after"
        )
        ax.set_xticks(list(x), modes, rotation=45, ha="right", fontsize=8)
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_title(f"{key[0] // 1024}k, {key[1]}/{key[2]} heads, {key[3]}", fontsize=9)
    axes[0][0].set_ylabel("E, compute only (slowest rank)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{meta['machine']}, {meta['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results")
    p.add_argument("--before", default=None)
    a = p.parse_args()
    meta, after = _cells(a.results)
    before = _cells(a.before)[1] if a.before else {}
    print(table(after, before))
    plot(after, before, meta, Path(a.results).with_suffix(".png"))


if __name__ == "__main__":
    main()
