"""Long-sequence memory savings against their plain counterparts (float32, relative 1e-5): the chunked LM-head loss,
the tiled MLP, the offload of checkpointed layer inputs and partial recomputation give the loss and every gradient of
the plain model, alone and together, with activation checkpointing (reentrant and not), through the Trainer with and
without CP=2, under DDP (2 processes) and FSDP2 (fully_shard on CPU, 2 processes).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import transformers
from distributed import run_distributed
from reference import assert_close
from trainer_cases import (
    RTOL,
    VOCAB,
    arguments,
    assert_same_run,
    build_model,
    cp_trainer,
    flattening_cp_trainer,
    run_cp,
    run_stock,
    sft_dataset,
    tiny_config,
    train_and_record,
)

from transformers_cp import (
    ContextParallelConfig,
    ContextParallelConfigError,
    TrainingArguments,
    apply_context_parallel,
    build_mesh,
    shard_batch,
)
from transformers_cp.chunked_loss import apply_chunked_loss, chunked_cross_entropy_sum
from transformers_cp.memory import apply_memory_savings
from transformers_cp.offload import activation_offloader, apply_activation_offload
from transformers_cp.recompute import apply_partial_recompute, remove_partial_recompute
from transformers_cp.tiled_mlp import apply_tiled_mlp
from transformers_cp.training_args import CHECKPOINTING_FLAG

# Small chunks and tiles so that every row spans several of them, with ragged last ones.
SAVINGS = dict(context_parallel_loss_chunk_size=7, context_parallel_mlp_tile_size=5)


def _gemma2_config() -> transformers.PretrainedConfig:
    return transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, final_logit_softcapping=2.0, attention_dropout=0.0,
    )  # fmt: skip


def _model(family: str, layers: int = 2) -> transformers.PreTrainedModel:
    config = _gemma2_config() if family == "gemma2" else tiny_config(family, layers)
    config.use_cache = False
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def _batch(rows: int = 2, length: int = 23, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # a masked prompt
    labels[0, 10:13] = -100
    return ids, labels


def _loss_and_grads(model: torch.nn.Module, **inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(actual, expected, name: str) -> None:
    assert_close(actual[0], expected[0], RTOL, f"{name} loss")
    assert actual[1].keys() == expected[1].keys(), name
    for key, grad in expected[1].items():
        assert_close(actual[1][key], grad, RTOL, f"{name} gradient of {key}")


# ---- chunked LM-head loss ------------------------------------------------------------------------------------------


# untied head; tied embeddings; final soft-capping — with one-token chunks, ragged chunks, one chunk
@pytest.mark.parametrize("family,chunk", [("llama", 1), ("qwen2", 7), ("gemma2", 7), ("gemma2", 1000)])
def test_chunked_loss_is_the_models_loss(family, chunk):
    plain = _model(family)
    chunked = apply_chunked_loss(copy.deepcopy(plain), chunk)
    ids, labels = _batch()
    shift_labels = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    for extra in ({}, {"num_items_in_batch": torch.tensor(29)}):
        expected = _loss_and_grads(plain, input_ids=ids, labels=labels, **extra)
        _assert_same(_loss_and_grads(chunked, input_ids=ids, labels=labels, **extra), expected, f"{family} {extra}")
        got = _loss_and_grads(chunked, input_ids=ids, shift_labels=shift_labels, **extra)
        _assert_same(got, expected, f"{family} shift_labels {extra}")
    assert chunked(input_ids=ids, labels=labels).logits is None  # the logits are never formed
    with torch.no_grad():  # without labels the head runs as usual
        assert_close(chunked(input_ids=ids).logits, plain(input_ids=ids).logits, RTOL, "logits")


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_chunked_cross_entropy_is_autograds(softcap):
    """The gradient written by hand (softmax − one-hot, ignored rows zero, × (1 − tanh²) through the soft-capping,
    a head with a bias) against autograd on the same operations, over ragged chunks with and without ignored rows."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, VOCAB, bias=True)
    hidden = torch.randn(37, 16, requires_grad=True)
    labels = torch.randint(0, VOCAB, (37,))
    labels[3:9] = -100  # the first chunk of 8 has ignored rows, the next ones none, the last is short
    logits = head(hidden)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    expected = torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")
    inputs = (hidden, head.weight, head.bias)
    loss = chunked_cross_entropy_sum(hidden, head, labels, 8, softcap)
    assert_close(loss, expected, RTOL, "loss")
    for name, got, want in zip(("hidden", "weight", "bias"), torch.autograd.grad(loss, inputs),
                               torch.autograd.grad(expected, inputs)):  # fmt: skip
        assert_close(got, want, RTOL, f"gradient of the {name}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the float32-output matrix products are CUDA's")
def test_chunked_cross_entropy_in_bf16_is_as_close_to_float64_as_autograd():
    """In bf16 on CUDA (the weight gradient summed over chunks in float32 by the matrix product itself): loss and
    gradients as close to the float64 truth as autograd's bf16 gradients of the model's own loss, or closer."""
    torch.manual_seed(0)
    head = torch.nn.Linear(256, 4096, bias=False, device="cuda", dtype=torch.bfloat16)
    hidden = torch.randn(1000, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 4096, (1000,), device="cuda")
    labels[:100] = -100
    inputs = (hidden, head.weight)

    def model_loss(h, w):
        return torch.nn.functional.cross_entropy((h @ w.t()).float(), labels, reduction="sum")

    truth = [x.detach().double().requires_grad_() for x in inputs]
    truth_loss = model_loss(*truth)
    truth_grads = torch.autograd.grad(truth_loss, truth)
    stock_loss = model_loss(*inputs)
    stock_grads = torch.autograd.grad(stock_loss, inputs)
    loss = chunked_cross_entropy_sum(hidden, head, labels, 128)
    grads = torch.autograd.grad(loss, inputs)

    def error(x, t):
        return ((x.double() - t).norm() / t.norm()).item()

    assert error(loss, truth_loss) <= error(stock_loss, truth_loss) + 1e-6
    for name, got, stock, t in zip(("hidden", "weight"), grads, stock_grads, truth_grads):
        assert got.dtype == stock.dtype, name
        assert error(got, t) <= error(stock, t) * 1.05, (name, error(got, t), error(stock, t))


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_chunked_loss_without_targets_is_the_models_loss(family):
    """Labels all -100 (every chunk skipped): the loss 0 and zero gradients of the plain model over
    num_items_in_batch."""
    plain = _model(family)
    chunked = apply_chunked_loss(copy.deepcopy(plain), 7)
    ids, _ = _batch()
    inputs = dict(input_ids=ids, labels=torch.full_like(ids, -100), num_items_in_batch=torch.tensor(29))
    expected = _loss_and_grads(plain, **inputs)
    assert expected[0] == 0 and expected[1] and not any(g.any() for g in expected[1].values())
    _assert_same(_loss_and_grads(chunked, **inputs), expected, family)


def test_chunked_loss_rejects_logit_scaling():
    config = transformers.CohereConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        logit_scale=0.5,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="context_parallel_loss_chunk_size.*logit_scale"):
        apply_chunked_loss(model, 8)
    apply_memory_savings(model, ContextParallelConfig(size=1))  # auto: left off for this model
    assert (
        model(input_ids=torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long)).logits
        is not None
    )


# ---- tiled MLP and activation offload ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tile,offload,chunk,reentrant",
    [(5, False, 0, None), (5, False, 0, True), (0, True, 0, False), (0, True, 0, True), (3, True, 7, False)],
)
def test_tiled_mlp_and_offload_are_the_plain_model(tile, offload, chunk, reentrant):
    plain = _model("qwen2")
    model = copy.deepcopy(plain)
    apply_memory_savings(
        model, ContextParallelConfig(size=1, loss_chunk_size=chunk, mlp_tile_size=tile, offload_activations=offload)
    )
    if reentrant is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    plain.train(), model.train()
    accumulated = {}
    for name, param in model.named_parameters():  # DDP, FSDP2 and ZeRO reduce a gradient when it is accumulated
        param.register_post_accumulate_grad_hook(
            lambda p, name=name: accumulated.update({name: accumulated.get(name, 0) + 1})
        )
    ids, labels = _batch(rows=1, length=31)
    expected = _loss_and_grads(plain, input_ids=ids, labels=labels)
    if offload:  # the inputs of all checkpointed layers but the last are released until backward
        loss = model(input_ids=ids, labels=labels).loss
        records = list(activation_offloader(model).records.values())
        assert len(records) == len(model.model.layers)
        assert [r.tensor.untyped_storage().nbytes() == 0 for r in records] == [True] * (len(records) - 1) + [False]
        loss.backward()
        assert not activation_offloader(model).records  # every input came back
    accumulated.clear()
    _assert_same(_loss_and_grads(model, input_ids=ids, labels=labels), expected, f"tile {tile} offload {offload}")
    assert set(accumulated.values()) == {1} and len(accumulated) == len(expected[1]), accumulated


# ---- partial recomputation -----------------------------------------------------------------------------------------


def _count_calls(modules: list[torch.nn.Module]) -> list[int]:
    """A live count of each module's forward calls, recomputations included (module hooks do not fire in a
    non-reentrant checkpoint's recomputation, so the forward itself counts)."""
    counts = [0] * len(modules)

    def counting(i: int, forward):
        def counted(*args, **kwargs):
            counts[i] += 1
            return forward(*args, **kwargs)

        return counted

    for i, module in enumerate(modules):
        module.forward = counting(i, module.forward)
    return counts


def _flags(model: torch.nn.Module) -> list[bool]:
    return [layer.gradient_checkpointing for layer in model.model.layers]


# none, one, all and more than all of 3 layers checkpointed; reentrant; with every other saving on (offload moves only
# the checkpointed layers' inputs)
@pytest.mark.parametrize(
    "layers,reentrant,savings",
    [
        (0, False, {}),
        (1, False, {}),
        (3, False, {}),
        (5, True, {}),
        (1, True, {}),
        (2, False, dict(loss_chunk_size=7, mlp_tile_size=5, offload_activations=True)),
    ],
    ids=["none", "one", "all", "more-than-all-reentrant", "one-reentrant", "two-with-savings"],
)
def test_partial_recompute_is_the_plain_model(layers, reentrant, savings):
    plain = _model("qwen2", layers=3)
    model = copy.deepcopy(plain)
    # installed before checkpointing is enabled, as the Trainer does (it enables it when train() starts)
    apply_memory_savings(model, ContextParallelConfig(size=1, recompute_layers=layers, **savings))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    plain.train(), model.train()
    mlp_calls = _count_calls([layer.mlp for layer in model.model.layers])
    ids, labels = _batch(rows=1, length=31)
    expected = _loss_and_grads(plain, input_ids=ids, labels=labels)
    loss = model(input_ids=ids, labels=labels).loss
    checkpointed = min(layers, 3)
    assert _flags(model) == [True] * checkpointed + [False] * (3 - checkpointed)
    if savings.get("offload_activations"):  # the checkpointed layers' inputs, the last one not released
        records = activation_offloader(model).records
        assert list(records) == list(model.model.layers[:checkpointed])
        assert [r.tensor.untyped_storage().nbytes() == 0 for r in records.values()] == [True, False]
    loss.backward()
    # a checkpointed layer runs its MLP again in backward, the others once
    assert mlp_calls == [2] * checkpointed + [1] * (3 - checkpointed), mlp_calls
    got = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    _assert_same(got, expected, f"recompute {layers} reentrant {reentrant} {savings}")


def test_partial_recompute_is_removed_with_its_flags():
    model = _model("qwen2", layers=3)
    apply_partial_recompute(model, 1)
    model.gradient_checkpointing_enable()
    model.train()
    ids, labels = _batch(rows=1)
    model(input_ids=ids, labels=labels)
    assert _flags(model) == [True, False, False]
    remove_partial_recompute(model)
    assert _flags(model) == [True, True, True]  # checkpointing is still on: every layer is checkpointed again
    model(input_ids=ids, labels=labels)
    assert _flags(model) == [True, True, True]  # and the hook is gone
    apply_partial_recompute(model, 0)
    model(input_ids=ids, labels=labels)
    model.gradient_checkpointing_disable()
    remove_partial_recompute(model)
    assert _flags(model) == [False, False, False]  # checkpointing was turned off since: it stays off
    with pytest.raises(ValueError, match="context_parallel_recompute_layers"):
        apply_partial_recompute(torch.nn.Linear(2, 2), 1)


def test_settings_are_validated(tmp_path):
    with pytest.raises(ContextParallelConfigError, match="context_parallel_loss_chunk_size"):
        ContextParallelConfig(loss_chunk_size=-1)
    with pytest.raises(ContextParallelConfigError, match="context_parallel_mlp_tile_size"):
        ContextParallelConfig(mlp_tile_size=True)
    with pytest.raises(ContextParallelConfigError, match="context_parallel_offload_activations"):
        ContextParallelConfig(offload_activations="yes")
    with pytest.raises(ContextParallelConfigError, match="context_parallel_offload_activations=True"):
        ContextParallelConfig(offload_attention_outputs=True)
    with pytest.raises(ContextParallelConfigError, match=f"{CHECKPOINTING_FLAG}=True"):
        TrainingArguments(output_dir=str(tmp_path), context_parallel_offload_activations=True, use_cpu=True)
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, context_parallel_mlp_tile_size=0, context_parallel_recompute_layers=0
    )
    config = args.context_parallel_config
    assert (config.loss_chunk_size, config.mlp_tile_size, config.offload_activations) == (None, 0, False)
    assert config.recompute_layers == 0


# ---- through the Trainer: size 1, DDP, CP=2 ------------------------------------------------------------------------


def _run_without_cp(family: str, predict: bool = False, **kwargs) -> dict:
    """transformers_cp's Trainer with context_parallel_size=1, the savings on, and the stock run's collator."""
    args = TrainingArguments(
        **arguments(gradient_checkpointing=True, context_parallel_offload_activations=True, **SAVINGS, **kwargs)
    )
    return train_and_record(flattening_cp_trainer(family, args), predict)


def test_trainer_with_savings_is_the_stock_trainer():
    """Training, loss-only evaluation (chunked) and prediction (plain head, logits) equal the stock run."""
    assert_same_run(_run_without_cp("qwen2", predict=True), run_stock("qwen2", predict=True), "size 1 with savings")


def _distributed_worker(rank, world, ref_path):
    # DDP on 2 ranks: the stock run and ours in one job.
    stock = run_stock("llama")
    per_rank = [None] * world
    dist.all_gather_object(per_rank, stock["step_losses"])
    stock["step_losses"] = per_rank
    assert_same_run(_run_without_cp("llama"), stock, f"DDP rank {rank}", dp_rank=rank)
    # CP=2 against the single-process stock run, offloading the layer inputs and the kept attention outputs.
    offload = dict(context_parallel_offload_activations=True, context_parallel_offload_attention_outputs=True)
    cp = run_cp("qwen2", 2, "zigzag", predict=True, gradient_checkpointing=True, **offload, **SAVINGS)
    assert_same_run(cp, torch.load(ref_path), f"CP=2 rank {rank}")
    # What moves: each layer's input and its attention output, all but the last one released until backward.
    mesh = build_mesh(ContextParallelConfig(size=world, mode="ulysses"), "cpu")
    model = apply_context_parallel(build_model("llama", reference=False), mesh.config, mesh=mesh)
    apply_activation_offload(model, attention_outputs=True)
    model.gradient_checkpointing_enable()
    model.train()
    batch = shard_batch(transformers.DataCollatorWithFlattening(return_tensors="pt")(sft_dataset(3, 2)), mesh)
    loss = model(**{k: batch[k] for k in ("input_ids", "position_ids", "labels", "shift_labels")}).loss
    records = list(activation_offloader(model).records.values())
    assert len(records) == 2 * len(model.model.layers), len(records)
    assert sum(r.tensor.untyped_storage().nbytes() == 0 for r in records) == len(records) - 1
    loss.backward()
    assert not activation_offloader(model).records


def test_ddp_and_context_parallel_with_savings(tmp_path):
    ref_path = os.path.join(tmp_path, "stock.pt")
    torch.save(run_stock("qwen2", predict=True), ref_path)
    run_distributed(_distributed_worker, 2, ref_path)


def _recompute_worker(rank, world, ref_path):
    # CP=2 through the Trainer with the first of two layers checkpointed, against the single-process stock run.
    trainer = cp_trainer("qwen2", 2, "ulysses", gradient_checkpointing=True, context_parallel_recompute_layers=1)
    assert_same_run(train_and_record(trainer), torch.load(ref_path), f"CP=2 recompute 1 rank {rank}")
    assert _flags(trainer.model) == [True, False]  # train() enabled checkpointing on both, the hook took one back
    # Only the checkpointed layers' attention keeps its result (and, offloaded, its output) for the recomputation.
    mesh = build_mesh(ContextParallelConfig(size=world, mode="zigzag"), "cpu")
    model = apply_context_parallel(_model("llama", layers=3), mesh.config, mesh=mesh)
    apply_memory_savings(
        model, ContextParallelConfig(offload_activations=True, offload_attention_outputs=True, recompute_layers=2)
    )
    model.gradient_checkpointing_enable()
    model.train()
    batch = shard_batch(transformers.DataCollatorWithFlattening(return_tensors="pt")(sft_dataset(3, 2)), mesh)
    loss = model(**{k: batch[k] for k in ("input_ids", "position_ids", "labels", "shift_labels")}).loss
    kept = model._context_parallel_state.kept
    assert list(kept) == [layer.self_attn for layer in model.model.layers[:2]], list(kept)
    assert len(activation_offloader(model).records) == 4  # two layer inputs, two attention outputs
    loss.backward()
    assert not kept and not activation_offloader(model).records


def test_context_parallel_with_partial_recompute(tmp_path):
    ref_path = os.path.join(tmp_path, "stock.pt")
    torch.save(run_stock("qwen2"), ref_path)
    run_distributed(_recompute_worker, 2, ref_path)


# ---- FSDP2 ---------------------------------------------------------------------------------------------------------


def _fsdp_worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    reference = build_model("qwen2", reference=True)
    model = copy.deepcopy(reference)
    apply_tiled_mlp(model, 5)
    apply_chunked_loss(model, 7)
    apply_activation_offload(model)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.gradient_checkpointing_enable()
    model.train(), reference.train()
    batches = [_batch(rows=1, length=29, seed=seed) for seed in range(world)]
    ids, labels = batches[rank]
    model(input_ids=ids, labels=labels).loss.backward()  # FSDP2 averages the gradients over the ranks
    (sum(reference(input_ids=i, labels=lab).loss for i, lab in batches) / world).backward()
    for (name, param), expected in zip(model.named_parameters(), reference.parameters()):
        assert_close(param.grad.full_tensor(), expected.grad, RTOL, f"FSDP2 rank {rank} gradient of {name}")


def test_fsdp2_with_savings():
    run_distributed(_fsdp_worker, 2)
