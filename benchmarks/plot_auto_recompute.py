"""A plot and a markdown table of automatic recomputation against every layer recomputed: tokens/s per GPU and peak
memory per model, from the one-GPU results of benchmarks/train.py, attention_models.py and hybrid.py
(docs/long_sequences.md).

    python benchmarks/plot_auto_recompute.py
writes benchmarks/results/auto_recompute_1xH200.png and prints the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# (label, every layer recomputed, automatic): result files of one row each
PAIRS = [
    ("1.5B dense, 32k", "train_noauto_1.5b_32k_1xH200.json", "train_auto_1.5b_32k_1xH200.json"),
    ("1.5B dense, 64k", "train_noauto_1.5b_64k_1xH200.json", "train_auto2_1.5b_64k_1xH200.json"),
    ("gpt-oss 2.2B, 32k", "models_gpt_oss_noauto_1xH200.json", "models_gpt_oss_auto_1xH200.json"),
    ("Nemotron-H 1.5B, 32k", "hybrid_nemotron_h_noauto_1xH200.json", "hybrid_nemotron_h_auto2_1xH200.json"),
    ("Qwen3-Next 1.6B, 32k", "hybrid_qwen3next_noauto_1xH200.json", "hybrid_qwen3next_auto2_1xH200.json"),
]


def _row(name: str) -> tuple[dict, dict]:
    data = json.load(open(RESULTS / name))
    (row,) = data["results"]
    return data["meta"], row


def rows() -> list[tuple[str, dict, dict, str]]:
    """(label, every-layer row, automatic row, machine) per model."""
    out = []
    for label, every, auto in PAIRS:
        meta, base = _row(every)
        _, chosen = _row(auto)
        out.append((label, base, chosen, meta["machine"]))
    return out


def table(pairs: list[tuple[str, dict, dict, str]]) -> str:
    lines = [
        "| model | every layer: tokens/s, GiB | automatic: tokens/s, GiB | speed-up | layers recomputed |",
        "|---|---|---|---|---|",
    ]
    for label, base, auto, _ in pairs:
        speed = auto["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"]
        lines.append(
            f"| {label} | {base['tokens_per_s_per_gpu'] / 1e3:.2f}k, {base['peak_gib']} | "
            f"{auto['tokens_per_s_per_gpu'] / 1e3:.2f}k, {auto['peak_gib']} | {speed:.2f}× | "
            f"{auto['auto_recompute_layers']} |"
        )
    return "\n".join(lines)


def plot(pairs: list[tuple[str, dict, dict, str]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 3.8))
    x = list(range(len(pairs)))
    labels = [label for label, *_ in pairs]
    for ax, key, title in ((speed, "tokens_per_s_per_gpu", "tokens/s"), (memory, "peak_gib", "peak GiB")):
        ax.bar([i - 0.2 for i in x], [base[key] for _, base, _, _ in pairs], 0.4, label="every layer recomputed")
        ax.bar([i + 0.2 for i in x], [auto[key] for _, _, auto, _ in pairs], 0.4, label="automatic (default)")
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(title)
    speed.legend(fontsize=8)
    fig.suptitle(f"Automatic recomputation, {pairs[0][3]}, one sequence per step, bf16", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(RESULTS / "auto_recompute_1xH200.png"))
    a = p.parse_args()
    pairs = rows()
    print(table(pairs))
    plot(pairs, Path(a.out))


if __name__ == "__main__":
    main()
