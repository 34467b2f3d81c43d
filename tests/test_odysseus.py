"""context_parallel_mode='odysseus' equals the model without CP: logits and every parameter gradient (apply_context_parallel
on packed documents, sliding windows, GQA with a replicated KV head, q/k norms, activation checkpointing), and Trainer
runs (losses, eval loss, predictions, final weights) with DDP over dp ranks; checkpoints are ordinary HF weights.

Jobs: 2 processes (c=2: every family and a Llama with biases whose GQA groups straddle ranks, LoRA on some layers, checkpointing with mistral; Trainer c=2 d=1 llama; a save/load round trip),
4 processes (c=4: qwen2 with one KV head for four ranks; Trainer c=2 d=2 qwen3 under DDP, c=4 d=1 qwen2).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import transformers
from distributed import run_distributed
from reference import assert_close
from test_modeling import _assert_grads, _checkpoint_worker, _loss, _position_ids, _reference_and_cp_model, _targets
from test_trainer import PREDICT_FAMILY, _stock_dp_worker
from trainer_cases import (
    VOCAB,
    CPTrainer,
    arguments,
    assert_same_run,
    build_model,
    run_cp,
    run_stock,
    sft_dataset,
    tiny_config,
)

import transformers_cp
from transformers_cp import ContextParallelConfig, Layout, apply_context_parallel, remove_context_parallel
from transformers_cp.mesh import ContextParallelMesh, build_mesh

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def _equivalence(rank: int, world: int, family: str) -> None:
    model, mesh, shard, inputs, targets, ref_logits, ref_grads = _reference_and_cp_model(
        world, family, "odysseus", None
    )
    attention = model.model.layers[0].self_attn
    x = torch.randn(1, 3, model.config.hidden_size)
    heads = model.config.num_attention_heads
    assert attention.q_proj(x).shape[-1] == heads * attention.head_dim // world, "q_proj projects the local heads"
    logits = model(**inputs).logits
    assert_close(logits, shard(ref_logits), 1e-5, f"{family} odysseus c={world} logits")
    _loss(logits, targets).backward()
    _assert_grads(model, mesh, ref_grads, f"{family} odysseus c={world}")
    remove_context_parallel(model)
    assert attention.q_proj(x).shape[-1] == heads * attention.head_dim, "remove_context_parallel restores q_proj"
    assert "forward" not in vars(attention), "remove_context_parallel restores the attention forward"


def _lora(dropout: float = 0.0, **kwargs):
    """LoRA on every projection of the second layer only (the first keeps plain linear layers), with a bias on B and
    random B, so that the adapters change the output."""
    import peft

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama_gqa_bias"), attn_implementation="sdpa")
    model.config.use_cache = False
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]
    config = peft.LoraConfig(
        r=4, target_modules=targets, layers_to_transform=[1], lora_dropout=dropout, init_lora_weights=False, **kwargs
    )
    return peft.get_peft_model(model, config)


def _lora_equivalence(rank: int, world: int) -> None:
    """odysseus with LoRA on some layers equals the PEFT model without CP: logits and every adapter gradient."""
    model = _lora(lora_bias=True)
    input_ids = torch.randint(0, VOCAB, (1, 48), generator=torch.Generator().manual_seed(1))
    targets, position_ids = _targets(input_ids), _position_ids()
    ref_logits = model(input_ids=input_ids, position_ids=position_ids).logits
    _loss(ref_logits, targets).backward()
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(".lora_B." in n and "o_proj" in n for n in trained), list(trained)
    ref_grads = {n: p.grad.clone() for n, p in trained.items()}
    model.zero_grad()
    mesh = build_mesh(ContextParallelConfig(size=world, mode="odysseus"), "cpu")
    apply_context_parallel(model, mesh.config, mesh=mesh)
    shard = lambda t: mesh.layout.shard(t, mesh.cp_rank, dim=1)  # noqa: E731
    logits = model(input_ids=shard(input_ids), position_ids=shard(position_ids)).logits
    assert_close(logits, shard(ref_logits.detach()), 1e-5, "odysseus LoRA logits")
    _loss(logits, shard(targets)).backward()
    for name, p in trained.items():
        dist.all_reduce(p.grad, group=mesh.cp_group)
        assert_close(p.grad, ref_grads[name], 1e-5, f"odysseus LoRA grad {name}")


def _save_load(rank: int, world: int, out_dir: str) -> None:
    """A CP Trainer's checkpoint is ordinary HF weights that load without transformers_cp."""
    args = transformers_cp.TrainingArguments(
        **arguments(out_dir, context_parallel_size=world, context_parallel_mode="odysseus")
    )
    trainer = CPTrainer(model=build_model("qwen3", reference=False), args=args, train_dataset=sft_dataset(6, 0))
    trainer.step_losses = []
    trainer.train()
    path = os.path.join(out_dir, "saved")
    trainer.save_model(path)
    dist.barrier()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert loaded.config._attn_implementation != "context_parallel"
    stock_shapes = {k: v.shape for k, v in build_model("qwen3", reference=True).state_dict().items()}
    assert {k: v.shape for k, v in loaded.state_dict().items()} == stock_shapes
    for name, value in trainer.model.state_dict().items():
        assert_close(loaded.state_dict()[name], value, 0, f"saved {name}")


def _job(rank: int, world: int, ref_dir: str, equivalence: list, trainer_cases: list, out_dir: str | None) -> None:
    for family in equivalence:
        _equivalence(rank, world, family)
    for size, family in trainer_cases:
        dp = world // size
        expected = torch.load(os.path.join(ref_dir, f"dp{dp}_{family}.pt"))
        result = run_cp(family, size, "odysseus", predict=family == PREDICT_FAMILY)
        name = f"{family} odysseus c={size} d={dp} rank {rank}"
        assert_same_run(result, expected, name, dp_rank=rank // size if dp > 1 else None)
    if out_dir is not None:
        _lora_equivalence(rank, world)
        _checkpoint_worker(rank, world, "mistral", "odysseus", None)
        _save_load(rank, world, out_dir)


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> str:
    out_dir = str(tmp_path_factory.mktemp("stock"))
    for family in ("llama", "qwen2"):
        result = run_stock(family, predict=family == PREDICT_FAMILY)
        torch.save(result, os.path.join(out_dir, f"dp1_{family}.pt"))
    run_distributed(_stock_dp_worker, 2, out_dir, [("qwen3", True)])
    return out_dir


def test_odysseus_two_ranks(references, tmp_path):
    run_distributed(_job, 2, references, [*FAMILIES, "llama_gqa_bias"], [(2, "llama")], str(tmp_path))


def test_odysseus_four_ranks(references):
    run_distributed(_job, 4, references, ["qwen2"], [(2, "qwen3"), (4, "qwen2")], None)


def _fake_mesh(size: int) -> ContextParallelMesh:
    """A mesh object for the checks that run before any collective (no process group needed)."""
    config = ContextParallelConfig(size=size, mode="odysseus")
    return ContextParallelMesh(config, Layout.from_config(config), None, None, None, None, None, 0, 0, 1)


def test_heads_not_divisible_is_a_clear_error():
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama"))  # 4 query heads
    with pytest.raises(ValueError, match="context_parallel_size=3 ranks, which must divide them"):
        apply_context_parallel(model, _fake_mesh(3).config, mesh=_fake_mesh(3))


def test_norm_across_heads_is_a_clear_error():
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("qwen3"))
    attention = model.model.layers[0].self_attn
    attention.q_norm = torch.nn.RMSNorm(attention.q_proj.out_features)  # as models that normalise all of q at once
    with pytest.raises(ValueError, match="q_norm to normalise each head"):
        apply_context_parallel(model, _fake_mesh(2).config, mesh=_fake_mesh(2))


def test_fused_projections_are_a_clear_error():
    config = transformers.Phi3Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        pad_token_id=0,
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="separate q_proj, k_proj, v_proj and o_proj"):
        apply_context_parallel(model, _fake_mesh(2).config, mesh=_fake_mesh(2))


@pytest.mark.parametrize(
    "kwargs,words",
    [
        pytest.param(dict(dropout=0.1), ["LoRA dropout", "lora_dropout=0.1", "lora_dropout=0.0"], id="lora-dropout"),
        pytest.param(dict(use_dora=True), ["DoRA", "plain LoRA"], id="dora"),
    ],
)
def test_lora_that_heads_cannot_split_is_a_clear_error(kwargs, words):
    pytest.importorskip("peft")
    with pytest.raises(ValueError) as error:
        apply_context_parallel(_lora(**kwargs), _fake_mesh(2).config, mesh=_fake_mesh(2))
    for word in words:
        assert word in str(error.value), str(error.value)
