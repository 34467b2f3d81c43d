"""The model sweep's own logic, without running a model: its packed documents, `--merge`, and the summary's groups."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import model_sweep  # noqa: E402
import sweep_summary  # noqa: E402


@pytest.mark.parametrize("world", [2, 4])
def test_documents_cover_the_shard_cases(world: int) -> None:
    """One document of one token, one shorter and one longer than a rank's shard, at 2 and 4 ranks."""
    shard = sum(model_sweep.DOCS) / world
    assert 1 in model_sweep.DOCS
    assert any(1 < n < shard for n in model_sweep.DOCS)
    assert any(n > shard for n in model_sweep.DOCS)
    assert sum(model_sweep.DOCS) % (2 * world) == 0  # the zigzag layout's 2·world chunks, no padding


def test_every_override_names_a_family_and_a_reason() -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for family, (settings, why) in model_sweep.OVERRIDES.items():
        assert family in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and settings and why, family


def record(family: str, mode: str, status: str, **extra) -> dict:
    return {"family": family, "mode": mode, "world": 2, "dtype": "float32", "status": status, **extra}


def test_merge_replaces_only_the_named_families(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "sweep.jsonl"
    old = [{"command": "first run"}, record("llama", "zigzag", "match", logit_err=0.0, grad_err=0.0),
           record("gpt2", "zigzag", "build_failed", why="x")]  # fmt: skip
    out.write_text("".join(json.dumps(r) + "\n" for r in old))
    new = record("gpt2", "zigzag", "match", logit_err=0.0, grad_err=0.0)
    monkeypatch.setattr(model_sweep, "run_pairs", lambda pairs, world, dtype, timeout: [new])
    monkeypatch.setattr(sys, "argv", ["model_sweep.py", "--out", str(out), "--merge", "--modes", "zigzag", "gpt2"])
    model_sweep.main()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["command"] for r in lines if "command" in r][0] == "first run" and len(lines) == 4
    assert [r for r in lines if "status" in r] == [new, old[1]]


def test_summary_groups(tmp_path: Path) -> None:
    refused = "ValueError('context parallel attention does not support attention sinks (x); use a model without.')"
    flag = (
        "ValueError(\"context parallel attention does not support XForCausalLM, which does not declare transformers' "
        "AttentionInterface (_supports_attention_backend), and whose decoder (XDecoder) takes no position_ids: it "
        'numbers its positions; use another.")'
    )
    mixers = (
        "ValueError('context parallel attention does not support these sequence mixers (m.a (RwkvBlock), m.b (Conv"
    )
    records = [
        {"command": "python benchmarks/model_sweep.py", "machine": "m", "minutes": 1.0},
        record("llama", "zigzag", "match", logit_err=1e-7, grad_err=1e-7),
        record("dsv3", "zigzag", "match", logit_err=1e-7, grad_err=1e-7),
        record("dsv3", "odysseus", "rejected_at_apply", why="ValueError('needs q_proj')"),
        record("gemma4", "zigzag", "MISMATCH", logit_err=1e-5, grad_err=1e-3,
               float64={"status": "MISMATCH", "logit_err": 1e-5, "grad_err": 1e-4,
                        "packed_without_cp": {"logit_err": 1e-6, "grad_err": 1e-6}}),
        record("gpt_oss", "zigzag", "rejected_at_apply", why=refused),
        record("biogpt", "zigzag", "rejected_at_apply", why=flag,
               declared_pluggable={"status": "match", "logit_err": 0.0, "grad_err": 0.0}),
        record("blt", "zigzag", "build_failed", why="ValueError('not tiny: `w`')"),
        record("rwkv", "zigzag", "rejected_at_apply", why=mixers),  # cut short, as the sweep cuts long messages
    ]  # fmt: skip
    path = tmp_path / "sweep.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    text = sweep_summary.summarize(str(path))
    assert "**Taken** (2 families; every mode run matches the per-document run): dsv3, llama." in text
    assert "- dsv3 (the other modes match): odysseus w2 refused: needs q_proj" in text
    assert "**Mismatch** (1 families" in text and "packed without CP 1.0e-06" in text
    assert "- attention sinks (x): gpt_oss" in text
    assert (
        "- AttentionInterface not declared (_supports_attention_backend), and its decoder takes no position_ids;"
        in text
    )
    assert "  - match: biogpt" in text
    assert "- sequence mixers with no exact path (RwkvBlock, ...): rwkv" in text
    assert "- blt (zigzag w2): build_failed: not tiny: 'w'" in text
    assert "`" not in text.split("\n", 1)[1]  # no code spans: the documentation tests would run them
