"""Supervised fine-tuning with context parallelism.

    torchrun --nproc_per_node 2 examples/train.py --output_dir out                # CPU (gloo) or GPUs (nccl, bf16)
    torchrun --nproc_per_node 8 examples/train.py --output_dir out --model Qwen/Qwen2.5-0.5B-local-copy \\
        --data train.jsonl --context_parallel_size 4 --context_parallel_mode zigzag

`--model` is a local model directory (its weights are loaded when present, else it is built from its config), a
config.json file, or a model type (`qwen2`, `llama`, `mistral`, ...) built from scratch with the `--hidden_size`,
`--num_layers`, ... overrides. `--data` is a jsonl file with `input_ids` (and optionally `labels`, -100 on prompt
tokens) or, with a tokenizer in the model directory, `prompt` and `completion` text. Without `--data` a synthetic
long-document dataset is generated from a sparse Markov chain, so the loss visibly falls within a short run. Every
TrainingArguments flag works; `--context_parallel_size` defaults to all processes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
import transformers

import transformers_cp


@dataclass
class ScriptArguments:
    model: str = field(default="qwen2", metadata={"help": "Local model dir, config.json path, or model type."})
    data: str | None = field(default=None, metadata={"help": "jsonl file; omit for a synthetic dataset."})
    hidden_size: int = field(default=128, metadata={"help": "For a model type: hidden size."})
    num_layers: int = field(default=2, metadata={"help": "For a model type: decoder layers."})
    num_heads: int = field(default=8, metadata={"help": "For a model type: attention heads."})
    num_kv_heads: int = field(default=2, metadata={"help": "For a model type: key/value heads."})
    vocab_size: int = field(default=128, metadata={"help": "For a model type: vocabulary size."})
    num_examples: int = field(default=96, metadata={"help": "Synthetic documents for training."})
    min_length: int = field(default=64, metadata={"help": "Shortest synthetic document."})
    max_length: int = field(default=512, metadata={"help": "Longest synthetic document."})
    eval_fraction: float = field(default=0.1, metadata={"help": "Share of the data held out for evaluation."})


def build_model(script: ScriptArguments) -> tuple[transformers.PreTrainedModel, object | None]:
    """The model (random init unless a local directory has weights) and its tokenizer when it has one."""
    if os.path.isdir(script.model):
        config = transformers.AutoConfig.from_pretrained(script.model)
        has_weights = any(f.endswith((".safetensors", ".bin")) for f in os.listdir(script.model))
        if has_weights:
            model = transformers.AutoModelForCausalLM.from_pretrained(script.model, dtype=torch.float32)
        else:
            model = transformers.AutoModelForCausalLM.from_config(config)
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(script.model)
        except (OSError, ValueError):
            tokenizer = None
        return model, tokenizer
    if os.path.isfile(script.model):
        config = transformers.AutoConfig.from_pretrained(script.model)
    else:
        config = transformers.AutoConfig.for_model(
            script.model,
            vocab_size=script.vocab_size,
            hidden_size=script.hidden_size,
            intermediate_size=script.hidden_size * 3,
            num_hidden_layers=script.num_layers,
            num_attention_heads=script.num_heads,
            num_key_value_heads=script.num_kv_heads,
            max_position_embeddings=max(4096, script.max_length),
        )
    return transformers.AutoModelForCausalLM.from_config(config), None


def synthetic_documents(script: ScriptArguments, vocab_size: int, n: int, seed: int) -> list[dict]:
    """Documents drawn from one fixed sparse Markov chain (each token has 4 successors), so the loss can fall from
    ln(vocab) towards ln(4) on held-out documents too; each document's first 16 (prompt) tokens are masked."""
    chain = torch.randint(1, vocab_size, (vocab_size, 4), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n):
        length = int(torch.randint(script.min_length, script.max_length + 1, (1,), generator=g))
        choices = torch.randint(0, 4, (length,), generator=g)
        ids = [int(torch.randint(1, vocab_size, (1,), generator=g))]
        for i in range(1, length):
            ids.append(int(chain[ids[-1], choices[i]]))
        docs.append({"input_ids": ids, "labels": [-100] * 16 + ids[16:]})
    return docs


def load_jsonl(path: str, tokenizer) -> list[dict]:
    docs = []
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if "input_ids" in record:
                docs.append({k: record[k] for k in ("input_ids", "labels") if k in record})
                continue
            if tokenizer is None:
                raise ValueError(f"{path}: records without input_ids need a tokenizer in the --model directory")
            prompt = tokenizer(record["prompt"], add_special_tokens=True)["input_ids"]
            completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                completion = completion + [tokenizer.eos_token_id]
            docs.append({"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion})
    return docs


def main() -> None:
    parser = transformers.HfArgumentParser((ScriptArguments, transformers_cp.TrainingArguments))
    cuda = torch.cuda.is_available()
    parser.set_defaults(
        context_parallel_size=int(os.environ.get("WORLD_SIZE", "1")),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        gradient_accumulation_steps=2,
        num_train_epochs=3,
        learning_rate=1e-2,
        warmup_steps=2,
        logging_steps=1,
        eval_strategy="epoch",
        save_strategy="no",
        report_to="none",
        bf16=cuda and torch.cuda.is_bf16_supported(),
        use_cpu=not cuda,  # accelerate runs CPU processes as one job only when asked to
    )
    script, args = parser.parse_args_into_dataclasses()

    torch.manual_seed(args.seed)
    model, tokenizer = build_model(script)
    if script.data is not None:
        docs = load_jsonl(script.data, tokenizer)
    else:
        docs = synthetic_documents(script, model.config.vocab_size, script.num_examples, args.seed)
    n_eval = max(1, int(len(docs) * script.eval_fraction))
    train, held_out = docs[n_eval:], docs[:n_eval]

    # Packs each micro-batch into one row; under CP the Trainer shards that row (with --context_parallel_size 1 this
    # is plain padding-free training).
    collator = transformers.DataCollatorWithFlattening()
    trainer = transformers_cp.Trainer(
        model=model, args=args, data_collator=collator, train_dataset=train, eval_dataset=held_out
    )
    if trainer.is_world_process_zero():
        mesh = trainer.cp_mesh
        layout = "off" if mesh is None else f"{mesh.config.mode}, {mesh.cp_size} CP x {mesh.dp_size} DP ranks"
        tokens = sum(len(d["input_ids"]) for d in train)
        print(
            f"model: {model.config.model_type}, {model.num_parameters():,} parameters; context parallelism: {layout}"
        )
        print(f"data: {len(train)} training documents ({tokens:,} tokens), {len(held_out)} held out")
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model()
    if trainer.is_world_process_zero():
        print(f"eval loss {metrics['eval_loss']:.4f}; model saved to {args.output_dir}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # gloo aborts at interpreter exit if its groups are still alive


if __name__ == "__main__":
    main()
