"""GRPO or RLOO with context parallelism: a tiny random-init Qwen2 is rewarded for even-numbered words.

    torchrun --nproc_per_node 2 examples/rl.py --trainer grpo --output_dir out/grpo   # CPU (gloo) or GPUs (bf16)
    torchrun --nproc_per_node 2 examples/rl.py --trainer rloo --output_dir out/rloo

Completions are generated without CP by the policy itself (every rank of a CP group generates; CP rank 0's are
kept), then the prompt+completion sequences are scored under CP (`context_parallel_size`, default: all processes),
for the policy and the reference model (loaded by TRL from the saved initial model: `beta` > 0). The tokenizer is a
word-level one over the words w0..w254 and <eos>, so the script needs no download.
"""

from __future__ import annotations

import argparse
import os

import datasets
import torch
import torch.distributed as dist
import transformers

from transformers_cp.mesh import init_distributed

WORDS = 255


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    core = Tokenizer(models.WordLevel({f"w{i}": i for i in range(WORDS)} | {"<eos>": WORDS}, unk_token="<eos>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>")


def even_words(completion_ids: list[list[int]], **kwargs) -> list[float]:
    """The share of the completion's words whose number is even."""
    return [sum(i % 2 == 0 for i in ids) / max(len(ids), 1) for ids in completion_ids]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trainer", choices=["grpo", "rloo"], default="grpo")
    p.add_argument("--output_dir", default="out/rl")
    p.add_argument("--max_steps", type=int, default=4)
    p.add_argument("--context_parallel_size", type=int, default=None, help="default: all processes")
    p.add_argument("--context_parallel_mode", default="zigzag")
    a = p.parse_args()
    init_distributed()
    world = dist.get_world_size() if dist.is_initialized() else 1
    cuda = torch.cuda.is_available()

    # The initial policy, saved: TRL loads the reference model from the policy's path.
    model_dir = os.path.join(a.output_dir, "initial_model")
    if not dist.is_initialized() or dist.get_rank() == 0:
        config = transformers.Qwen2Config(
            vocab_size=WORDS + 1, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, eos_token_id=WORDS, pad_token_id=WORDS,
        )  # fmt: skip
        torch.manual_seed(0)
        transformers.Qwen2ForCausalLM(config).save_pretrained(model_dir)
    if dist.is_initialized():
        dist.barrier()

    g = torch.Generator().manual_seed(0)
    prompts = [
        {"prompt": " ".join(f"w{i}" for i in torch.randint(0, WORDS, (int(n),), generator=g).tolist())}
        for n in torch.randint(4, 13, (64,), generator=g)
    ]
    from transformers_cp.trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    config_class, trainer_class = (GRPOConfig, GRPOTrainer) if a.trainer == "grpo" else (RLOOConfig, RLOOTrainer)
    args = config_class(
        output_dir=a.output_dir, max_steps=a.max_steps, per_device_train_batch_size=4, num_generations=4,
        max_completion_length=16, beta=0.04, learning_rate=5e-3, logging_steps=1, save_strategy="no", report_to=[],
        bf16=cuda, use_cpu=not cuda, disable_tqdm=True,
        context_parallel_size=a.context_parallel_size or world, context_parallel_mode=a.context_parallel_mode,
    )  # fmt: skip
    trainer = trainer_class(
        model=model_dir, reward_funcs=even_words, args=args, train_dataset=datasets.Dataset.from_list(prompts),
        processing_class=tokenizer(),
    )  # fmt: skip
    trainer.train()
    if trainer.is_world_process_zero():
        for entry in trainer.state.log_history:
            if "reward" in entry:
                # On-policy, the loss is ~0 by construction (advantages times ratios of 1); the gradient is not.
                print(
                    f"step {entry['step']}: reward {entry['reward']:.3f}, KL {entry['kl']:.5f}, grad norm "
                    f"{entry['grad_norm']:.3f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
