"""A custom training loop with context parallelism, without the Trainer.

    torchrun --nproc_per_node 2 examples/custom_loop.py

The pieces are the ones the Trainer uses: `build_mesh` and `apply_context_parallel` (process groups and attention),
`ContextParallelSampler` (examples split over dp ranks only), `ContextParallelCollator` (one packed row per
micro-batch, this rank's shard), `count_label_tokens` / `context_parallel_loss` (the loss normalised over the whole
optimizer step and scaled for DDP's averaging) and `reduce_loss_for_logging` (the same value on every CP rank).
It computes the loss the stock Trainer computes with DataCollatorWithFlattening on the dp ranks.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import transformers
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from transformers_cp import (
    ContextParallelCollator,
    ContextParallelConfig,
    ContextParallelSampler,
    apply_context_parallel,
    build_mesh,
    context_parallel_loss,
    count_label_tokens,
    reduce_loss_for_logging,
)
from transformers_cp.mesh import init_distributed


def train(
    model: transformers.PreTrainedModel,
    dataset: list[dict],
    config: ContextParallelConfig,
    batch_size: int = 2,
    gradient_accumulation_steps: int = 2,
    learning_rate: float = 0.5,
    max_grad_norm: float = 1.0,
    shuffle: bool = True,
    seed: int = 0,
) -> list[float]:
    """One epoch of SGD; returns the loss of every optimizer step (the mean over dp ranks, as the Trainer logs)."""
    init_distributed()
    mesh = build_mesh(config)
    apply_context_parallel(model, mesh.config, mesh=mesh)
    world = dist.get_world_size() if dist.is_initialized() else 1
    wrapped = DistributedDataParallel(model) if world > 1 else model  # averages gradients over all c·d ranks

    sampler = ContextParallelSampler(dataset, mesh, shuffle=shuffle, seed=seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=ContextParallelCollator(mesh))
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)
    batches = list(loader)
    losses = []
    for start in range(0, len(batches), gradient_accumulation_steps):
        micro_batches = batches[start : start + gradient_accumulation_steps]
        # N: label tokens of the whole step, over the CP group and the dp ranks.
        num_items = count_label_tokens([b["shift_labels"] for b in micro_batches], mesh)
        step_loss = torch.zeros(())
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or wrapped is model else wrapped.no_sync()
            with sync:
                logits = wrapped(
                    input_ids=batch["input_ids"],
                    position_ids=batch["position_ids"],
                    cu_seq_lens_q=batch["cu_seq_lens_q"],
                ).logits
                loss = context_parallel_loss(logits, batch["shift_labels"], num_items, mesh)
                loss.backward()
            step_loss += reduce_loss_for_logging(loss, mesh)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)  # gradients are the full-batch ones
        optimizer.step()
        optimizer.zero_grad()
        if world > 1:
            dist.all_reduce(step_loss)
        losses.append(step_loss.item() / world)
    return losses


def synthetic_dataset(n: int, vocab_size: int, seed: int = 0) -> list[dict]:
    """Random documents of 16-256 tokens whose first 4 (prompt) tokens are masked with -100."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab_size, (int(torch.randint(16, 257, (1,), generator=g)),), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 4 + ids[4:]})
    return out


def main() -> None:
    config = transformers.Qwen2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    losses = train(model, synthetic_dataset(32, config.vocab_size), ContextParallelConfig(mode="zigzag"))
    if not dist.is_initialized() or dist.get_rank() == 0:
        print("step losses:", " ".join(f"{loss:.4f}" for loss in losses))
    if dist.is_initialized():
        dist.destroy_process_group()  # gloo aborts at interpreter exit if its groups are still alive


if __name__ == "__main__":
    main()
