"""Every causal LM family of the installed transformers under CP on 2 CPU processes (gloo, float32), against the
same model run on each document alone: logits and every parameter gradient, for the zigzag and Ulysses modes.

    python benchmarks/model_sweep.py --out benchmarks/results/model_sweep_cpu.jsonl [family ...]

Each family gets a tiny random-init config (hidden 64, 4 heads over 2 KV heads, a sliding window of 8 where the
model reads one, latent attention with values wider than its queries and keys, hybrid layer patterns kept with one
layer of each kind) and one packed row of five documents
(5, 1, 22, 11 and 9 tokens). A line per family and mode: `match` (worst relative error below 1e-4; a gradient that is
zero in exact arithmetic is measured against 1e-3 of the largest one), `MISMATCH`, `rejected_at_apply` (check_model
refused it, with its message), `forward_error`, or `build_failed` / `reference_failed` where the tiny config does not
suit the family (the sweep's limit, not CP's). The first line records the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from distributed import run_distributed  # noqa: E402

DOCS = [5, 1, 22, 11, 9]
VOCAB = 128
TOLERANCE = 1e-4
TINY = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, max_position_embeddings=512, attention_dropout=0.0, hidden_dropout=0.0, dropout=0.0,
    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2, num_experts=4,
    num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
    first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=24,
    n_group=1, topk_group=1, sliding_window=8, use_cache=False,
)  # fmt: skip


def tiny_config(model_type: str):
    """The family's config at the TINY sizes; hybrids keep one layer of each kind, deep defaults get 4 layers."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    kw = dict(TINY, full_attn_idxs=[1, 3]) if model_type == "lfm2" else dict(TINY)  # lfm2 defaults to attention only
    if hasattr(cls(), "kv_lora_rank"):  # latent attention: a key per query head, head sizes of its own
        kw.update(num_key_value_heads=kw["num_attention_heads"])
        del kw["head_dim"]
    config = cls(**kw)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    kinds = getattr(text, "layer_types", None)
    if kinds and len(set(kinds)) > 1:
        distinct = list(dict.fromkeys(kinds))
        picked = (distinct * 4)[: max(4, len(distinct))]
        try:
            config = cls(**kw, num_hidden_layers=len(picked), layer_types=picked)
        except Exception:  # noqa: BLE001 - a config that derives its pattern otherwise keeps its default
            config = cls(**kw)
    elif (getattr(text, "num_hidden_layers", 0) or 0) > 8:
        config = cls(**kw, num_hidden_layers=4)
    sub = getattr(config, "text_config", None)
    if sub is not None and not isinstance(sub, dict):  # multimodal: the language model at the tiny sizes too
        config = cls(**kw, text_config={**kw, "model_type": sub.model_type})
    return config


def build(model_type: str) -> torch.nn.Module:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    torch.manual_seed(0)
    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    model = cls._from_config(tiny_config(model_type), attn_implementation="eager")
    return model.eval()


def per_document(model, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and gradients (summed next-token loss) of each document run alone: the meaning of a packed row."""
    logits, start = [], 0
    model.zero_grad()
    for n in DOCS:
        doc = ids[:, start : start + n]
        out = model(input_ids=doc, position_ids=torch.arange(n)[None], use_cache=False).logits
        logits.append(out.detach())
        if n > 1:
            torch.nn.functional.cross_entropy(out[0, :-1].float(), doc[0, 1:], reduction="sum").backward()
        start += n
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return torch.cat(logits, 1), grads


def _write(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def compare(rank: int, world: int, model_type: str, mode: str, out: str) -> None:
    """One family and mode on this rank; rank 0 appends the outcome to `out`."""
    import torch.distributed as dist

    from transformers_cp import ContextParallelConfig
    from transformers_cp.mesh import build_mesh
    from transformers_cp.modeling import apply_context_parallel

    record = {"family": model_type, "mode": mode}
    ids = torch.randint(3, VOCAB, (1, sum(DOCS)), generator=torch.Generator().manual_seed(1))
    stage = "build_failed"
    try:
        model = build(model_type)
        stage = "reference_failed"
        ref_logits, ref_grads = per_document(model, ids)
        stage = "rejected_at_apply"
        mesh = build_mesh(ContextParallelConfig(size=world, mode=mode), "cpu")
        apply_context_parallel(model, mesh.config, mesh=mesh)
        stage = "forward_error"
        shard = lambda t: mesh.layout.shard(t, mesh.cp_rank, dim=1)  # noqa: E731
        targets = torch.full_like(ids, -100)
        targets[:, :-1] = ids[:, 1:]
        targets[0, torch.tensor(DOCS).cumsum(0) - 1] = -100
        position_ids = torch.cat([torch.arange(n) for n in DOCS])[None]
        logits = model(input_ids=shard(ids), position_ids=shard(position_ids)).logits
        loss = torch.nn.functional.cross_entropy(logits[0].float(), shard(targets)[0], reduction="sum")
        loss.backward()
    except Exception as e:  # noqa: BLE001 - the outcome is the record; every rank fails alike or the job times out
        if rank == 0:
            _write(out, {**record, "status": stage, "why": repr(e)[:400]})
        return
    ref = shard(ref_logits)
    logit_err = ((logits.detach() - ref).abs().max() / ref.abs().max()).item()
    floor = 1e-3 * max(g.abs().max().item() for g in ref_grads.values())
    grad_err, worst = 0.0, None
    for name, p in model.named_parameters():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(grad, group=mesh.cp_group)
        expected = ref_grads.get(name, torch.zeros_like(p))
        err = ((grad - expected).abs().max() / expected.abs().max().clamp_min(floor)).item()
        if err > grad_err:
            grad_err, worst = err, name
    errors = torch.tensor([logit_err, grad_err])
    dist.all_reduce(errors, op=dist.ReduceOp.MAX, group=mesh.cp_group)
    status = "match" if errors.max() < TOLERANCE else "MISMATCH"
    if rank == 0:
        _write(out, {**record, "status": status, "logit_err": errors[0].item(), "grad_err": errors[1].item(),
                     "worst_grad": worst})  # fmt: skip


def main() -> None:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("families", nargs="*", help="model types (default: every causal LM family)")
    p.add_argument("--out", required=True, help="JSONL file the records are appended to")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per family and mode")
    a = p.parse_args()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    _write(a.out, {"command": " ".join(["python", *sys.argv]), "machine": machine,
                   "transformers": transformers.__version__})  # fmt: skip
    for family in a.families or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        for mode in ("zigzag", "ulysses"):
            try:
                run_distributed(compare, 2, family, mode, a.out, timeout=a.timeout)
            except Exception as e:  # noqa: BLE001 - a hang or a crash is an outcome too
                _write(a.out, {"family": family, "mode": mode, "status": "job_failed", "why": repr(e)[-400:]})
            print(family, mode, flush=True)


if __name__ == "__main__":
    main()
