"""Every causal LM family of the installed transformers under CP on 2 (or 4) CPU processes (gloo), against the same
model run on each document alone: logits and every parameter gradient, in each mode asked for.

    python benchmarks/model_sweep.py --out benchmarks/results/model_sweep_cpu.jsonl [family ...]

Each family gets a tiny random-init config (hidden 64, 4 heads over 2 KV heads, a sliding window of 8 where the
model reads one, latent attention with values wider than its queries and keys, hybrid and recurrent models with one
layer of each kind or more; `OVERRIDES` holds the few settings a family needs on top, each with its reason) and one
packed row of the documents in `DOCS`. A line per family and mode: `match` (worst relative error below 1e-4; a
gradient that is zero in exact arithmetic is measured against 1e-3 of the largest one), `MISMATCH` (then checked
again in float64, with the model's own packed run without CP as the yardstick: the record's `float64`),
`rejected_at_apply` (check_model refused it, with its message), `forward_error`, `build_failed` /
`reference_failed` (the family does not build or run at the tiny sizes: the sweep's limit, not CP's), or
`job_failed` (a crash or a hang, killed after `--timeout` seconds without progress). The first lines record the
command and the machine of each run that wrote the file. With no family named, every causal LM family runs; with
`--merge`, the named families' records replace theirs in an existing file and the others stay.
`benchmarks/sweep_summary.py` turns the file into the family table of docs/reliability.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from distributed import _entry  # noqa: E402
from reference import per_document  # noqa: E402

# Shorter than a shard (5, 11, 7), one token (1), and longer than a rank's shard (40 of 64: 32 tokens per rank at
# world 2, 16 at world 4), so documents start, end and span across shard boundaries at both world sizes.
DOCS = [5, 1, 40, 11, 7]
VOCAB = 128
TOLERANCE = 1e-4
MODES = ("ring", "zigzag", "llama3", "ulysses", "odysseus")
TINY = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, max_position_embeddings=512, attention_dropout=0.0, hidden_dropout=0.0, dropout=0.0,
    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2, num_experts=4,
    num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
    first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=24,
    n_group=1, topk_group=1, sliding_window=8, use_cache=False, vocab_size_per_layer_input=VOCAB,
    hidden_size_per_layer_input=16, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0, is_decoder=True,
    d_model=64, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
    encoder_layers=2, decoder_layers=2, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
    linear_value_head_dim=16,
)  # fmt: skip
DROP = "drop"  # an OVERRIDES value that removes the TINY setting (the family's config derives it)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
NO_PER_LAYER = dict(hidden_size_per_layer_input=0, vocab_size_per_layer_input=0)
BLT_LOCAL = dict(hidden_size=64, hidden_size_global=64, num_attention_heads=4, intermediate_size=64)
MAX_PARAMETERS = 10_000_000  # a tiny model far above this kept a default size the sweep did not shrink
# Family -> (settings on top of TINY, why). A dict value for a sub-config (`vision_config`, ...) is merged into it.
_SMALL_MAMBA2 = dict(mamba_n_heads=8, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=2, mamba_chunk_size=8)
_SMALL_MAMBA2_WHY = "Mamba2 defaults (128 heads, state 256) take minutes a forward on CPU; SSM chunks of 8 tokens"
OVERRIDES: dict[str, tuple[dict, str]] = {
    "lfm2": (dict(full_attn_idxs=[1, 3]), "defaults to attention only; two conv and two attention layers"),
    "bamba": (dict(_SMALL_MAMBA2), _SMALL_MAMBA2_WHY),
    "granitemoehybrid": (dict(_SMALL_MAMBA2), _SMALL_MAMBA2_WHY),
    "falcon_h1": (dict(_SMALL_MAMBA2, mamba_d_ssm=128), _SMALL_MAMBA2_WHY),
    "nemotron_h": (
        dict(mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=8, n_groups=2, chunk_size=8),
        _SMALL_MAMBA2_WHY,
    ),
    "lfm2_moe": (
        dict(num_hidden_layers=4, layer_types=["conv", "full_attention"] * 2),
        "derives no layer pattern by default; two conv and two attention layers",
    ),
    "longcat_flash": (dict(head_dim=8), "its RoPE width is head_dim, which must equal qk_rope_head_dim"),
    "blt": (
        dict(
            encoder_config=dict(BLT_LOCAL, num_hidden_layers=1),
            decoder_config=dict(BLT_LOCAL, num_hidden_layers=1),
            global_config=dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, intermediate_size=64),
            patcher_config=dict(TINY_VISION),
            encoder_hash_byte_group_vocab=VOCAB,
        ),
        "four sub-models (patcher, local encoder and decoder, global transformer) of 2.5B parameters by default",
    ),
    "codegen": (dict(rotary_dim=8), "rotary_dim defaults to 64, wider than the tiny heads"),
    "gptj": (dict(rotary_dim=8), "rotary_dim defaults to 64, wider than the tiny heads"),
    "cohere_compass_text": (
        dict(rope_parameters=dict(full_attention=dict(rope_type="default", rope_theta=1e4))),
        "its default rope parameters name no layer type (it does not build at its defaults)",
    ),
    "dbrx": (
        dict(
            attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
            ffn_config=dict(ffn_hidden_size=64, moe_num_experts=4, moe_top_k=2),
        ),
        "its sizes sit in sub-configs; DbrxAttention reads rope_theta, "
        "and clamps by clip_qkv, which its attention config lacks or leaves None in 5.24 (it does not run at its "
        "defaults either)",
    ),
    "dots3_note_text": (dict(num_key_value_heads=4), "requires as many key/value heads as heads"),
    "xlnet": (
        dict(max_position_embeddings=DROP, n_head=4, d_head=16),
        "no position limit (it refuses one); d_head must be d_model / n_head",
    ),
    "falcon": (dict(head_dim=DROP), "head_dim is derived"),
    "xlstm": (dict(head_dim=DROP, v_head_dim=DROP), "head sizes are derived"),
    "gemma3": (
        dict(vision_config=dict(TINY_VISION, image_size=224, patch_size=14)),
        "a SigLIP tower of 400M parameters by default; 16×16 patches still pool to its 256 image tokens",
    ),
    "git": (dict(vision_config=dict(TINY_VISION, image_size=28, patch_size=14)), "a CLIP tower by default"),
    "got_ocr2": (
        dict(
            vision_config=dict(
                hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_dim=64, global_attn_indexes=[0]
            )
        ),
        "a SAM tower by default",
    ),
    "gemma3n_text": (dict(num_kv_shared_layers=2), "15 layers share KV by default; two of the four here"),
    "gemma4_assistant": (
        dict(**NO_PER_LAYER, text_config=NO_PER_LAYER),
        "the drafter has no per-layer inputs",
    ),
    "gpt_neo": (
        dict(num_layers=4, attention_types=[[["global", "local"], 2]], window_size=8),
        "its layer pattern must list num_layers layers",
    ),
    "mamba2": (dict(num_heads=8), "num_heads × head_dim must equal 2 × hidden_size"),
    "prophetnet": (dict(num_encoder_layers=2, num_decoder_layers=2), "sets its layers per stack"),
    "roc_bert": (dict(shape_embed_dim=16, pronunciation_embed_dim=16), "large shape / pronunciation embeddings"),
    "xmod": (dict(default_language="en_XX"), "needs a default language adapter"),
    "zaya": (dict(num_experts_per_tok=1), "supports one expert per token only"),
    "inkling2_text": (dict(unpadded_vocab_size=VOCAB), "its head has unpadded_vocab_size outputs"),
    "inkling2_loop_text": (dict(unpadded_vocab_size=VOCAB), "its head has unpadded_vocab_size outputs"),
    "qwen4_exp_text": (
        dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=16, indexer_compress_ratio=4),
        "its QSA indexer layers need their sizes",
    ),
    "qwen4_exp": (
        dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=16, indexer_compress_ratio=4),
        "as qwen4_exp_text",
    ),
    "reformer": (dict(axial_pos_embds_dim=[32, 32], axial_pos_shape=[8, 8]), "axial positions must sum to hidden"),
    "musicgen": (
        dict(decoder=dict(hidden_size=64, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, num_codebooks=1)),
        "its causal LM is the audio decoder (24 layers of 1024, 4 codebook rows per example by default)",
    ),
    "musicgen_melody": (
        dict(decoder=dict(hidden_size=64, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, num_codebooks=1)),
        "as musicgen",
    ),
    "phi4_multimodal": (
        dict(
            audio_config=dict(hidden_size=32, intermediate_size=64, num_blocks=1, num_attention_heads=2),
            vision_config=TINY_VISION,
        ),
        "audio and vision towers of 460M parameters by default",
    ),
    "moss_transcribe_diarize": (
        dict(audio_config=dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64)),
        "a Whisper-size audio tower",
    ),
}


def _with_subconfigs(cls, kw: dict) -> dict:
    """`kw` with the dict-valued overrides merged into the family's default sub-configs."""
    subs = {k: v for k, v in kw.items() if isinstance(v, dict)}
    if not subs:
        return kw
    try:
        default = cls()
    except Exception:  # noqa: BLE001 - defaults that do not validate (Gemma 4's assistant): the overrides alone
        default = None
    for key, extra in subs.items():
        base = getattr(default, key, None)
        base = base.to_dict() if hasattr(base, "to_dict") else dict(base or {})
        kw = {**kw, key: {**base, **extra}}
    return kw


def tiny_config(model_type: str):
    """The family's config at the TINY sizes; hybrids keep one layer of each kind, deep defaults get 4 layers."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    kw = dict(TINY)
    try:
        latent = getattr(cls(), "kv_lora_rank", None) is not None
    except Exception:  # noqa: BLE001 - a per-layer setting (the layers hold it), or defaults that do not validate
        latent = False
    if latent:  # latent attention: a key per query head, head sizes of its own
        kw.update(num_key_value_heads=kw["num_attention_heads"], head_dim=DROP)
    kw.update(OVERRIDES.get(model_type, ({}, ""))[0])
    kw = _with_subconfigs(cls, {k: v for k, v in kw.items() if v is not DROP})
    config = cls(**kw)
    try:
        text = config.get_text_config()
    except Exception:  # noqa: BLE001 - e.g. ProphetNet's, which sets num_hidden_layers and refuses it
        text = config
    kinds = getattr(text, "layer_types", None)
    if "num_hidden_layers" in kw:
        pass
    elif kinds and len(set(kinds)) > 1:
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
        flat = {k: v for k, v in kw.items() if not isinstance(v, dict)}
        own = OVERRIDES.get(model_type, ({}, ""))[0].get("text_config", {})
        config = cls(**{**kw, "text_config": {**flat, **own, "model_type": sub.model_type}})
    return config


def build(model_type: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    torch.manual_seed(0)
    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    config = tiny_config(model_type)
    if not isinstance(config, cls.config_class):  # a composite model whose causal LM is its language model
        config = config.get_text_config(decoder=True)
    model = cls._from_config(config, attn_implementation="eager")
    if sum(p.numel() for p in model.parameters()) > MAX_PARAMETERS:
        name, p = max(model.named_parameters(), key=lambda item: item[1].numel())
        raise ValueError(f"not tiny: {name} {tuple(p.shape)}; shrink the setting behind it in OVERRIDES")
    return model.to(dtype).eval()


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The summed next-token loss in the logits' own dtype, as `reference.per_document` computes it."""
    return torch.nn.functional.cross_entropy(logits[0], targets[0], reduction="sum", ignore_index=-100)


def _take_grads(model) -> dict[str, torch.Tensor]:
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


def _targets(ids: torch.Tensor) -> torch.Tensor:
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    targets[0, torch.tensor(DOCS).cumsum(0) - 1] = -100
    return targets


def _errors(logits, grads, ref_logits, ref_grads, names) -> tuple[float, float, str | None]:
    """Worst relative error of the logits and of any gradient (zero gradients against 1e-3 of the largest)."""
    logit_err = ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item()
    floor = 1e-3 * max(g.abs().max().item() for g in ref_grads.values())
    grad_err, worst = 0.0, None
    for name, p in names:
        grad = grads.get(name, torch.zeros_like(p))
        expected = ref_grads.get(name, torch.zeros_like(p))
        err = ((grad - expected).abs().max() / expected.abs().max().clamp_min(floor)).item()
        if err > grad_err:
            grad_err, worst = err, name
    return logit_err, grad_err, worst


_REFERENCES: dict = {}


def reference(model, ids: torch.Tensor, dtype: torch.dtype) -> tuple:
    """Per-document logits and gradients; in float64 also the errors of the model's own packed row without CP (the
    rounding it does by itself, e.g. in its float32 casts)."""
    ref_logits, ref_grads = per_document(model, ids, DOCS)
    packed = None
    if dtype == torch.float64:
        position_ids = torch.cat([torch.arange(n) for n in DOCS])[None]
        out = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits
        _loss(out, _targets(ids)).backward()
        packed = _errors(out.detach(), _take_grads(model), ref_logits, ref_grads, model.named_parameters())
    return ref_logits, ref_grads, packed


def calls_attention_interface(model: torch.nn.Module) -> bool:
    """Whether the model's modeling file dispatches attention through transformers' AttentionInterface, although the
    model does not declare `_supports_attention_backend` (the flag check_model reads)."""
    import inspect

    return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(inspect.getmodule(type(model)))


def compare(rank: int, world: int, model_type: str, mode: str, dtype: torch.dtype, pluggable: bool = False) -> dict:
    """One family and mode in `dtype` on this rank; the outcome as a record (the same on every rank). `pluggable`
    declares the model's attention pluggable first (for a refusal on that flag alone)."""
    import torch.distributed as dist

    from transformers_cp import ContextParallelConfig
    from transformers_cp.mesh import build_mesh
    from transformers_cp.modeling import apply_context_parallel

    ids = torch.randint(3, VOCAB, (1, sum(DOCS)), generator=torch.Generator().manual_seed(1))
    stage = "build_failed"
    try:
        model = build(model_type, dtype)
        stage = "reference_failed"
        if (model_type, dtype) not in _REFERENCES:  # the same for every mode: computed once per job
            _REFERENCES.clear()
            _REFERENCES[model_type, dtype] = reference(model, ids, dtype)
        ref_logits, ref_grads, packed = _REFERENCES[model_type, dtype]
        stage = "rejected_at_apply"
        if pluggable:
            model._supports_attention_backend = True
        mesh = build_mesh(ContextParallelConfig(size=world, mode=mode), "cpu")
        apply_context_parallel(model, mesh.config, mesh=mesh)
        stage = "forward_error"
        shard = lambda t: mesh.layout.shard(t, mesh.cp_rank, dim=1)  # noqa: E731
        position_ids = torch.cat([torch.arange(n) for n in DOCS])[None]
        logits = model(input_ids=shard(ids), position_ids=shard(position_ids)).logits
        _loss(logits, shard(_targets(ids))).backward()
    except Exception as e:  # noqa: BLE001 - the outcome is the record; every rank fails alike or the job stalls
        record = {"status": stage, "why": repr(e)[:400]}
        if (
            stage == "rejected_at_apply"
            and "_supports_attention_backend" in str(e)
            and calls_attention_interface(model)
        ):
            record["declared_pluggable"] = compare(rank, world, model_type, mode, dtype, pluggable=True)
        return record
    grads = {}
    for name, p in model.named_parameters():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(grad, group=mesh.cp_group)
        grads[name] = grad
    logit_err, grad_err, worst = _errors(
        logits.detach(), grads, shard(ref_logits), ref_grads, model.named_parameters()
    )
    errors = torch.tensor([logit_err, grad_err], dtype=torch.float64)
    dist.all_reduce(errors, op=dist.ReduceOp.MAX, group=mesh.cp_group)
    record = {"status": "match" if errors.max() < TOLERANCE else "MISMATCH", "logit_err": errors[0].item(),
              "grad_err": errors[1].item(), "worst_grad": worst}  # fmt: skip
    if packed is not None:
        record["packed_without_cp"] = {"logit_err": packed[0], "grad_err": packed[1], "worst_grad": packed[2]}
    return record


def job(rank: int, world: int, pairs: list, dtype: str, results: str, progress: str) -> None:
    """Every (family, mode) of `pairs` in one process group; rank 0 appends each record to `results` and marks the
    pair it starts in `progress` (so that a crash or a hang is pinned to its pair and the rest run on)."""
    for family, mode in pairs:
        if rank == 0:
            with open(progress, "w") as f:
                f.write(f"{family} {mode}\n")
        record = {"family": family, "mode": mode, "world": world, "dtype": dtype}
        record.update(compare(rank, world, family, mode, getattr(torch, dtype)))
        if record["status"] == "MISMATCH" and dtype == "float32":  # rounding, or a real difference?
            record["float64"] = compare(rank, world, family, mode, torch.float64)
        if rank == 0:
            with open(results, "a") as f:
                f.write(json.dumps(record) + "\n")
        gc.collect()


def _read(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_pairs(pairs: list, world: int, dtype: str, timeout: float) -> list[dict]:
    """Run `pairs` in as few spawned jobs as crashes allow: a job that dies or makes no progress for `timeout` seconds
    is killed, its pair recorded as `job_failed`, and a fresh job takes the pairs after it."""
    records: list[dict] = []
    while pairs:
        results = tempfile.mktemp(prefix="cp_sweep_results_")
        progress = tempfile.mktemp(prefix="cp_sweep_progress_")
        store = tempfile.mktemp(prefix="cp_sweep_store_")
        errors = mp.get_context("spawn").SimpleQueue()
        port = 29500  # unused: the rendezvous is the file store
        procs = mp.start_processes(_entry, args=(world, port, store, job, (pairs, dtype, results, progress), errors),
                                   nprocs=world, join=False, start_method="spawn")  # fmt: skip
        why, last, seen = None, time.monotonic(), (0, "")
        try:
            while not procs.join(timeout=2.0):
                now = (len(_read(results)), open(progress).read() if os.path.exists(progress) else "")
                if now != seen:
                    for r in _read(results)[seen[0] : now[0]]:
                        print(r["family"], r["mode"], r["status"], flush=True)
                    seen, last = now, time.monotonic()
                elif time.monotonic() - last > timeout:
                    for p in procs.processes:
                        p.kill()
                    why = f"no progress for {timeout:.0f}s (a hang, or too slow at the tiny sizes)"
                    break
        except Exception as e:  # noqa: BLE001 - a crashed rank: its pair is the outcome
            why = repr(e)[-400:]
        if why is None and not errors.empty():
            why = errors.get()[1][-400:]
        done = _read(results)
        for path in (results, progress, store):
            if os.path.exists(path):
                os.remove(path)
        records += done
        pairs = pairs[len(done) :]
        if why is not None and pairs:
            family, mode = pairs[0]
            records.append({"family": family, "mode": mode, "world": world, "dtype": dtype, "status": "job_failed",
                            "why": why})  # fmt: skip
            print(family, mode, "job_failed", flush=True)
            pairs = pairs[1:]
    return records


def main() -> None:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("families", nargs="*", help="model types (default: every causal LM family)")
    p.add_argument("--out", required=True, help="JSONL file the records are written to")
    p.add_argument("--modes", default="zigzag,ulysses", help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--world", type=int, default=2, choices=(2, 4), help="CP ranks (CPU processes)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--merge", action="store_true", help="replace only these families' records in an existing --out")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds without progress before a job is killed")
    a = p.parse_args()
    modes = a.modes.split(",")
    unknown = [m for m in modes if m not in MODES] + [
        f for f in a.families if f not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    ]
    if unknown:
        p.error(f"unknown mode or family: {', '.join(unknown)}")
    families = a.families or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    start = time.monotonic()
    records = run_pairs([(f, m) for f in families for m in modes], a.world, a.dtype, a.timeout)
    header = {"command": " ".join(["python", *sys.argv]), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "torch": torch.__version__, "transformers": transformers.__version__,
              "minutes": round((time.monotonic() - start) / 60, 1)}  # fmt: skip
    old = _read(a.out) if a.merge else []
    key = lambda r: (r["family"], r["mode"], r.get("world", 2), r.get("dtype", "float32"))  # noqa: E731
    replaced = {key(r) for r in records}
    kept = [r for r in old if "status" in r and key(r) not in replaced]
    rows = sorted(kept + records, key=lambda r: (r["family"], MODES.index(r["mode"]), r.get("world", 2)))
    with open(a.out, "w") as f:
        for r in [*(r for r in old if "command" in r), header, *rows]:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
