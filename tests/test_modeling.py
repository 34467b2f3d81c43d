"""apply_context_parallel on real HF models: logits and parameter gradients equal the model without CP."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import transformers
from distributed import run_distributed
from reference import assert_close
from trainer_cases import VOCAB, tiny_config

from transformers_cp import ContextParallelConfig
from transformers_cp.mesh import build_mesh
from transformers_cp.modeling import (
    ATTENTION_NAME,
    apply_context_parallel,
    context_parallel_mesh,
    remove_context_parallel,
)

SEQ = 48
DOC_LENGTHS = [5, 1, 22, 11, 9]


def _position_ids() -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in DOC_LENGTHS])[None]


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[0].float(), targets[0], reduction="sum", ignore_index=-100)


def _targets(input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token targets within documents (-100 at each document's last token)."""
    t = torch.full_like(input_ids, -100)
    t[:, :-1] = input_ids[:, 1:]
    ends = torch.tensor(DOC_LENGTHS).cumsum(0) - 1
    t[0, ends] = -100
    return t


def _reference_and_cp_model(world, family, mode, ulysses_size):
    """A tiny model, its logits and parameter gradients on the full packed row without CP, and the same model with
    CP applied (gradients zeroed), plus the inputs and this rank's sharding function."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="sdpa")
    model.config.use_cache = False
    input_ids = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(1))
    targets, position_ids = _targets(input_ids), _position_ids()
    ref_logits = model(input_ids=input_ids, position_ids=position_ids).logits
    _loss(ref_logits, targets).backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    config = ContextParallelConfig(size=world, mode=mode, ulysses_size=ulysses_size)
    if mode == "hybrid" and ulysses_size is None:  # the degree is chosen from the model, which builds the mesh
        mesh = context_parallel_mesh(apply_context_parallel(model, config))
    else:
        mesh = build_mesh(config, "cpu")
        apply_context_parallel(model, mesh.config, mesh=mesh)
    shard = lambda t: mesh.layout.shard(t, mesh.cp_rank, dim=1)  # noqa: E731
    inputs = dict(input_ids=shard(input_ids), position_ids=shard(position_ids))
    return model, mesh, shard, inputs, shard(targets), ref_logits.detach(), ref_grads


def _assert_grads(model, mesh, ref_grads, what: str) -> None:
    for name, p in model.named_parameters():
        dist.all_reduce(p.grad, group=mesh.cp_group)
        assert_close(p.grad, ref_grads[name], 1e-5, f"{what} grad {name}")


def _worker(rank, world, family, mode, ulysses_size):
    model, mesh, shard, inputs, targets, ref_logits, ref_grads = _reference_and_cp_model(
        world, family, mode, ulysses_size
    )
    assert model.config._attn_implementation == ATTENTION_NAME
    logits = model(**inputs).logits
    assert_close(logits, shard(ref_logits), 1e-5, f"{family} {mode} logits")
    _loss(logits, targets).backward()
    _assert_grads(model, mesh, ref_grads, f"{family} {mode}")
    remove_context_parallel(model)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("mode,ulysses_size", [("zigzag", None), ("llama3", None), ("ulysses", None), ("ring", None)])
def test_model_logits_and_grads_match(family, mode, ulysses_size):
    run_distributed(_worker, 2, family, mode, ulysses_size)


@pytest.mark.parametrize("mode", ["zigzag", "ulysses"])
def test_window_comes_from_the_models_mask(mode):
    """PhiMoE builds a sliding-window mask but passes its attention no `sliding_window`: CP takes the window from the
    mask, as sdpa does (the window, 6, is shorter than the longest document)."""
    run_distributed(_worker, 2, "phimoe", mode, None)


@pytest.mark.parametrize("mode", ["zigzag", "llama3", "ulysses"])
def test_values_of_another_head_size(mode):
    """DeepSeek-V3's latent attention: values narrower than queries and keys."""
    run_distributed(_worker, 2, "deepseek_v3", mode, None)


# hybrid without a Ulysses degree on 4 ranks: (family, processes per node, the degree chosen). qwen2: 4 query heads over
# 1 KV head (replicated), llama_gqa_bias: 6 query heads over 3 KV heads, llama: 4 heads.
AUTO_HYBRID = [("qwen2", "2", 2), ("llama_gqa_bias", "4", 2), ("llama", "4", 4)]


def _hybrid_worker(rank, world):
    _worker(rank, world, "qwen2", "hybrid", 2)
    for family, per_node, degree in AUTO_HYBRID:
        os.environ["LOCAL_WORLD_SIZE"] = per_node  # as torchrun sets it on nodes of that many processes
        model, mesh, shard, inputs, targets, ref_logits, ref_grads = _reference_and_cp_model(
            world, family, "hybrid", None
        )
        assert (mesh.config.ulysses_size, mesh.layout.ulysses, mesh.layout.ring) == (degree, degree, world // degree)
        logits = model(**inputs).logits
        assert_close(logits, shard(ref_logits), 1e-5, f"{family} auto hybrid logits")
        _loss(logits, targets).backward()
        _assert_grads(model, mesh, ref_grads, f"{family} auto hybrid")


def test_model_hybrid_four_ranks():
    """hybrid with a given Ulysses degree, and without one: the largest that divides the CP size and the heads and
    stays within a node is chosen from the model."""
    run_distributed(_hybrid_worker, 4)


def _shared_config_worker(rank, world):
    """Models made from one config object share it (transformers does not copy it); CP applied to one leaves the others
    on their own attention, and removing it gives the model its config back."""
    input_ids = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(1))
    full = dict(input_ids=input_ids, position_ids=_position_ids())
    for family in ("llama", "qwen3"):
        config = tiny_config(family)
        config.use_cache = False
        torch.manual_seed(0)
        cp_model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        other = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        assert cp_model.config is other.config is config
        with torch.no_grad():
            cp_before, other_before = cp_model(**full).logits, other(**full).logits
        mesh = build_mesh(ContextParallelConfig(size=world, mode="zigzag"), "cpu")
        apply_context_parallel(cp_model, mesh.config, mesh=mesh)
        assert config._attn_implementation == other.config._attn_implementation == "sdpa"
        assert cp_model.config._attn_implementation == ATTENTION_NAME
        shards = {k: mesh.layout.shard(v, mesh.cp_rank, dim=1) for k, v in full.items()}
        with torch.no_grad():
            other_after = other(**full).logits  # raised before: the shared config named the CP attention
            cp_after = cp_model(**shards).logits
        assert torch.equal(other_after, other_before), f"{family}: the other model changed"
        assert_close(cp_after, mesh.layout.shard(cp_before, mesh.cp_rank, dim=1), 1e-5, f"{family} CP model logits")
        remove_context_parallel(cp_model)
        holders = [m for m in cp_model.modules() if isinstance(vars(m).get("config"), transformers.PretrainedConfig)]
        assert len(holders) > 2 and all(m.config is config for m in holders), f"{family}: config not given back"
        with torch.no_grad():
            assert torch.equal(cp_model(**full).logits, cp_before), f"{family}: after remove"


def test_models_sharing_a_config_keep_their_own_attention():
    run_distributed(_shared_config_worker, 2)


def _count_kernel_calls():
    """Wrap MathKernel.forward to count calls; returns (counter list, restore function)."""
    from transformers_cp.kernels.math import MathKernel

    calls = []
    original = MathKernel.forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    MathKernel.forward = counting
    return calls, lambda: setattr(MathKernel, "forward", original)


def _checkpoint_worker(rank, world, family, mode, ulysses_size):
    model, mesh, _, inputs, targets, _, ref_grads = _reference_and_cp_model(world, family, mode, ulysses_size)
    calls, restore = _count_kernel_calls()
    try:
        model.train()
        _loss(model(**inputs).logits, targets).backward()
        plain_calls = len(calls)
        model.zero_grad()
        calls.clear()
        model.gradient_checkpointing_enable()
        _loss(model(**inputs).logits, targets).backward()
    finally:
        restore()
    # the recomputation under checkpointing reused the first forward's attention: no extra kernel calls
    assert len(calls) == plain_calls, (len(calls), plain_calls)
    assert not model._context_parallel_state.kept, "every kept attention result was taken by its recomputation"
    _assert_grads(model, mesh, ref_grads, f"{family} {mode} checkpointed")


@pytest.mark.parametrize("mode", ["zigzag", "llama3", "ulysses"])
def test_gradient_checkpointing_reuses_attention(mode):
    run_distributed(_checkpoint_worker, 2, "mistral", mode, None)
