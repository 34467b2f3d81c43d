"""Plots and a markdown table from benchmarks/attention.py results.

    python benchmarks/plot.py benchmarks/results/attention_2xH200.json
writes attention_2xH200.png beside the JSON and prints the README table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MODES = ["ring", "zigzag", "llama3", "ulysses", "hybrid", "torch_native_allgather", "torch_native_alltoall"]


def efficiency(row: dict, mode: str) -> float | None:
    entry = row.get(mode)
    return entry.get("efficiency") if isinstance(entry, dict) else None


def table(results: list[dict]) -> str:
    present = [m for m in MODES if any(isinstance(r.get(m), dict) for r in results)]
    head = "| S | heads q/kv | docs | single ms | " + " | ".join(present) + " |"
    lines = [head, "|" + "---|" * (4 + len(present))]
    for r in results:
        cells = [f"{r['seq'] // 1024}k", f"{r['hq']}/{r['hk']}", r["docs"], f"{r['single_ms']:.1f}"]
        cells += [f"{e:.3f}" if (e := efficiency(r, m)) is not None else "–" for m in present]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["hq"], r["hk"], r["docs"]) for r in results})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), sharey=True)
    for ax, (hq, hk, docs) in zip(axes if len(panels) > 1 else [axes], panels):
        rows = sorted((r for r in results if (r["hq"], r["hk"], r["docs"]) == (hq, hk, docs)), key=lambda r: r["seq"])
        for m in MODES:
            pts = [(r["seq"] // 1024, e) for r in rows if (e := efficiency(r, m)) is not None]
            if pts:
                style = "--" if m.startswith("torch_native") else "-"
                ax.plot(*zip(*pts), style, marker="o", label=m.replace("torch_native_", "native "))
        ax.set_xscale("log", base=2)
        ax.set_title(f"{hq}/{hk} heads, {docs}")
        ax.set_xlabel("sequence length (k tokens)")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=6, loc="lower right")
    (axes[0] if len(panels) > 1 else axes).set_ylabel("efficiency  T1 / (N · TN)")
    fig.suptitle(f"causal attention fwd+bwd, {meta['machine']}, {meta['dtype']}, head dim {meta['head_dim']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    src = Path(sys.argv[1])
    data = json.loads(src.read_text())
    plot(data["results"], data["meta"], src.with_suffix(".png"))
    print(table(data["results"]))


if __name__ == "__main__":
    main()
