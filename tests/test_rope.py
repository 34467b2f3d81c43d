"""RoPE whose frequencies depend on the sequence: transformers_cp.Trainer equals the stock Trainer with
DataCollatorWithFlattening for dynamic NTK scaling (Llama) and longrope (Phi-3), whose rotary modules choose their
frequencies from the largest position id of each forward (the longest document of the packed row).

The documents (10-40 tokens) straddle the original length (24), so rows pick differently and the shards of one row
would pick differently from the row. c=2, d=1, float32, rtol 1e-5. At model level (logits and gradients): PhiMoE,
whose rotary module reads the positions' maximum itself, and Gemma 3, whose one rotary module has a RoPE type per
layer type.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import transformers
from distributed import run_distributed
from reference import assert_close
from trainer_cases import (
    VOCAB,
    CPTrainer,
    StockTrainer,
    arguments,
    assert_same_run,
    sft_dataset,
    tiny_config,
    train_and_record,
)

import transformers_cp
from transformers_cp import ContextParallelCollator, ContextParallelConfig, gather_sequence
from transformers_cp.mesh import build_mesh
from transformers_cp.model_info import max_positions
from transformers_cp.modeling import apply_context_parallel

ORIGINAL = 24
CASES = [
    ("dynamic", "zigzag"),
    ("dynamic", "ulysses"),
    ("dynamic", "llama3"),
    ("dynamic", "odysseus"),
    ("longrope", "zigzag"),
    ("longrope", "ulysses"),
    ("longrope", "llama3"),
]  # Phi-3's fused qkv_proj has no odysseus form


def rope_config(kind: str) -> transformers.PretrainedConfig:
    common = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        attention_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    if kind == "dynamic":  # the original length is max_position_embeddings
        rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
        return transformers.LlamaConfig(
            num_key_value_heads=4, max_position_embeddings=ORIGINAL, rope_parameters=rope, **common
        )
    rope = {
        "rope_type": "longrope",
        "short_factor": [1.0, 1.0, 1.0, 1.0],
        "long_factor": [3.0, 9.0, 27.0, 81.0],
        "rope_theta": 10000.0,
    }
    return transformers.Phi3Config(
        num_key_value_heads=2,
        max_position_embeddings=256,
        original_max_position_embeddings=ORIGINAL,
        rope_parameters=rope,
        **common,
    )


def build(kind: str, reference: bool) -> transformers.PreTrainedModel:
    config = rope_config(kind)
    config.use_cache = not reference  # stock sdpa honours packed position_ids only without a KV cache
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def _stock(kind: str) -> dict:
    trainer = StockTrainer(
        model=build(kind, reference=True),
        args=transformers.TrainingArguments(**arguments()),
        data_collator=transformers.DataCollatorWithFlattening(),
        train_dataset=sft_dataset(13, 0),
        eval_dataset=sft_dataset(7, 1),
    )
    return train_and_record(trainer)


def _cp_worker(rank, world, ref_dir):
    for kind, mode in CASES:
        args = transformers_cp.TrainingArguments(**arguments(context_parallel_size=world, context_parallel_mode=mode))
        trainer = CPTrainer(
            model=build(kind, reference=False),
            args=args,
            train_dataset=sft_dataset(13, 0),
            eval_dataset=sft_dataset(7, 1),
        )
        expected = torch.load(os.path.join(ref_dir, f"{kind}.pt"))
        assert_same_run(train_and_record(trainer), expected, f"{kind} RoPE {mode} rank {rank}")
    for name, model in (("phimoe longrope", _phimoe_longrope()), ("gemma3 dynamic", _gemma3_dynamic())):
        _one_row_matches_stock(model, world, name)


def _phimoe_longrope() -> transformers.PreTrainedModel:
    """PhiMoE's rotary module reads the positions' maximum itself (its long or short mscale), besides the decorator."""
    config = tiny_config("phimoe")
    config.rope_parameters = {
        "rope_type": "longrope", "short_factor": [1.0, 1.0, 1.5, 2.0], "long_factor": [1.0, 2.0, 4.0, 8.0],
        "rope_theta": 10000.0, "short_mscale": 1.0, "long_mscale": 1.3, "original_max_position_embeddings": ORIGINAL,
    }  # fmt: skip
    config.use_cache = False
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def _gemma3_dynamic() -> transformers.PreTrainedModel:
    """One rotary module with a RoPE type per layer type: dynamic for full attention, default for sliding windows."""
    config = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=ORIGINAL, sliding_window=6,
        layer_types=["sliding_attention", "full_attention"], attention_dropout=0.0, use_cache=False,
        rope_parameters={
            "full_attention": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def _one_row_matches_stock(model: transformers.PreTrainedModel, world: int, name: str) -> None:
    """Logits and gradients of one row whose longest document (30 tokens) passes the original length on one zigzag
    rank only, against the stock model on DataCollatorWithFlattening's row."""
    ids = torch.randint(0, VOCAB, (54,), generator=torch.Generator().manual_seed(2)).tolist()
    features = [{"input_ids": ids[a:b]} for a, b in ((0, 30), (30, 38), (38, 46), (46, 54))]
    row = transformers.DataCollatorWithFlattening(return_tensors="pt")(features)
    out = model(**row)
    out.loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    mesh = build_mesh(ContextParallelConfig(size=world, mode="zigzag"), "cpu")
    apply_context_parallel(model, mesh.config, mesh=mesh)
    shard = ContextParallelCollator(mesh)(features)
    inputs = {k: shard[k] for k in ("input_ids", "position_ids", "cu_seq_lens_q")}
    logits = gather_sequence(model(**inputs).logits, mesh)[:, :54]
    assert_close(logits, out.logits.detach(), 1e-5, f"{name} logits")
    targets = gather_sequence(shard["shift_labels"], mesh)[0, :54]
    torch.nn.functional.cross_entropy(logits[0], targets).backward()
    for n, p in model.named_parameters():
        dist.all_reduce(p.grad, group=mesh.cp_group)
        assert_close(p.grad, expected[n], 1e-5, f"{name} grad {n}")


def test_sequence_dependent_rope_equals_the_stock_trainer(tmp_path):
    for kind in ("dynamic", "longrope"):
        torch.save(_stock(kind), tmp_path / f"{kind}.pt")
    run_distributed(_cp_worker, 2, str(tmp_path))


def test_max_positions_of_sequence_dependent_rope():
    """Dynamic NTK rescales to any length: no limit. longrope's max_position_embeddings is the extended length (or
    original_max_position_embeddings times its factor, when larger)."""
    assert max_positions(build("dynamic", reference=True)) is None
    phi3 = build("longrope", reference=True)
    assert max_positions(phi3) == 256
    phi3.config.rope_parameters["factor"] = 32.0
    assert max_positions(phi3) == ORIGINAL * 32
