"""The family table of a model sweep's JSONL (benchmarks/model_sweep.py), in Markdown: counts per outcome, the
families CP takes, and every family it does not, with the reason.

    python benchmarks/sweep_summary.py benchmarks/results/model_sweep_cpu.jsonl

A family is `taken` when every mode run matched (float32; a float32 mismatch whose float64 check matches counts as
the model's own rounding and is listed with both errors), `refused` when check_model refused it (the reason is its
message), and `not covered` otherwise (the sweep could not build or run it, or it failed under CP).
"""

from __future__ import annotations

import argparse
import collections
import json
import re


def short(why: str) -> str:
    """The reason of a record's exception, without its type, CP's common opening and the suggested fix."""
    text = re.sub(r"^\w+\((['\"])(.*?)(\1\))?$", r"\2", why.strip(), flags=re.S)  # the record cuts long ones
    text = " ".join(text.replace("\\n", " ").replace("`", "'").split())  # no code spans: the docs tests run those
    text = text.replace("context parallel attention does not support ", "").replace("\\'", "'")
    if "_supports_attention_backend" in text:  # the model's class name leads; the reason is one of a few
        text = "AttentionInterface not declared (_supports_attention_backend), and " + text.split(", and ", 1)[-1]
        text = re.sub(r" \([A-Za-z0-9_, ]+\)(?= (?:compute|takes))|: it would see .*|: it numbers .*", "", text)
        return text.replace(" (e.g. ALiBi in Bloom, Falcon or MPT)", "").replace("whose decoder", "its decoder")
    if text.startswith("these sequence mixers"):  # module paths differ per family: their classes name the kind
        kinds = dict.fromkeys(re.findall(r"\((\w+)\)", text.split("):", 1)[0]))
        return f"sequence mixers with no exact path ({', '.join(kinds)}, ...)"
    text = re.sub(r": across ranks it computes exactly only .*", "", text)
    return re.split(r"; (?:use|pass|call|set|switch|remove) ", text)[0].rstrip(".")[:280]


def probe(records) -> str:
    """What CP does with a family refused only for its undeclared AttentionInterface, once declared pluggable."""
    found = [r["declared_pluggable"] for r in records if "declared_pluggable" in r]
    if not found:
        return ""
    outcomes = dict.fromkeys(f"{p['status']}: {short(p['why'])}" if "why" in p else p["status"] for p in found)
    return " (declared pluggable: " + "; ".join(outcomes) + ")"


def cell(record: dict) -> str:
    status = record["status"]
    if status == "MISMATCH" and "float64" in record:
        check = record["float64"]
        own = check.get("packed_without_cp", {})
        return (f"MISMATCH fp32 ({record['logit_err']:.1e} / {record['grad_err']:.1e}); fp64 {check['status']} "
                f"({check.get('logit_err', float('nan')):.1e} / {check.get('grad_err', float('nan')):.1e}; "
                f"packed without CP {own.get('logit_err', float('nan')):.1e} / "
                f"{own.get('grad_err', float('nan')):.1e})")  # fmt: skip
    if status in ("match", "MISMATCH"):
        return f"{status} ({record['logit_err']:.0e} / {record['grad_err']:.0e})"
    return status


def summarize(path: str) -> str:
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    runs = [r for r in lines if "command" in r]
    records = [r for r in lines if "status" in r]
    columns = list(dict.fromkeys((r["mode"], r.get("world", 2), r.get("dtype", "float32")) for r in records))
    label = lambda c: f"{c[0]} w{c[1]}" + ("" if c[2] == "float32" else f" {c[2]}")  # noqa: E731
    by_family: dict[str, dict] = collections.defaultdict(dict)
    for r in records:
        by_family[r["family"]][(r["mode"], r.get("world", 2), r.get("dtype", "float32"))] = r
    # plain text, not code spans: the documentation tests run every documented command
    commands = "; ".join("{} ({} min)".format(r["command"], r.get("minutes", "?")) for r in runs)
    last = runs[-1] if runs else {}
    out = [f"Runs: {commands}. Machine: {last.get('machine', '?')}, transformers {last.get('transformers', '?')}.", ""]
    out += ["| outcome | " + " | ".join(label(c) for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    counts = collections.Counter(
        (r["status"], (r["mode"], r.get("world", 2), r.get("dtype", "float32"))) for r in records
    )
    for status in sorted({r["status"] for r in records}):
        out.append(f"| {status} | " + " | ".join(str(counts[status, c]) for c in columns) + " |")
    taken, partly, rounding, mismatched, refused, other = [], [], [], [], collections.defaultdict(list), []
    for family in sorted(by_family):
        rs = by_family[family].values()
        statuses = {r["status"] for r in rs}
        if statuses == {"match"}:
            taken.append(family)
        elif "match" in statuses and statuses <= {"match", "rejected_at_apply"}:  # a mode that refuses the model
            taken.append(family)
            partly.append(family)
        elif statuses <= {"match", "MISMATCH"} and all(
            r["status"] == "match" or r.get("float64", {}).get("status") == "match" for r in rs
        ):
            rounding.append(family)
            taken.append(family)
        elif statuses <= {"match", "MISMATCH"}:
            mismatched.append(family)
        elif "rejected_at_apply" in statuses:
            why = next(r["why"] for r in rs if r["status"] == "rejected_at_apply")
            refused[short(why)].append(family + probe(rs))
        else:
            other.append(family)
    out += ["", f"**Taken** ({len(taken)} families; every mode run matches the per-document run): "
            + ", ".join(taken) + "."]  # fmt: skip
    for family in partly:
        rs = by_family[family]
        refusals = "; ".join(f"{label(c)} refused: {short(r['why'])}" for c, r in rs.items() if r["status"] != "match")
        out.append(f"- {family} (the other modes match): {refusals}")
    for family in rounding:
        rs = by_family[family]
        out.append(f"- {family}: " + "; ".join(f"{label(c)}: {cell(r)}" for c, r in rs.items()))
    out += ["", f"**Mismatch** ({len(mismatched)} families; worst relative error of logits / gradients):"]
    for family in mismatched:
        out.append(f"- {family}: " + "; ".join(f"{label(c)}: {cell(r)}" for c, r in by_family[family].items()))
    out += ["", f"**Refused by check_model** ({sum(map(len, refused.values()))} families), by reason:"]
    for why, families in sorted(refused.items(), key=lambda item: -len(item[1])):
        groups: dict[str, list[str]] = collections.defaultdict(list)
        for family in families:
            name, _, found = family.partition(" (declared pluggable: ")
            groups[found[:-1]].append(name)
        if len(groups) == 1 and "" in groups:
            out.append(f"- {why}: {', '.join(families)}")
            continue
        out.append(f"- {why}; declared pluggable, CP then gives:")
        for found, names in sorted(groups.items(), key=lambda item: -len(item[1])):
            out.append(
                f"  - {found or 'nothing more (the model does not call AttentionInterface)'}: {', '.join(names)}"
            )
    out += ["", f"**Not covered** ({len(other)} families):"]
    for family in other:
        rs = by_family[family]
        notes = dict.fromkeys(f"{r['status']}: {short(r['why'])}" if "why" in r else cell(r) for r in rs.values())
        out.append(f"- {family} ({', '.join(label(c) for c in rs)}): " + "; ".join(notes))
    return "\n".join(out)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("jsonl")
    print(summarize(p.parse_args().jsonl))
