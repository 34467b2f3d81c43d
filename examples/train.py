"""Supervised fine-tuning with context parallelism.

    torchrun --nproc_per_node 2 examples/train.py --output_dir out                # CPU (gloo) or GPUs (nccl, bf16)
    torchrun --nproc_per_node 8 examples/train.py --output_dir out --model Qwen/Qwen2.5-0.5B-local-copy \\
        --data train.jsonl --context_parallel_size 4 --context_parallel_mode zigzag

`--model` is a local model directory (its weights are loaded when present, else it is built from its config), a
config.json file, or a model type (`qwen2`, `llama`, `mistral`, ...) built from scratch with the `--hidden_size`,
`--num_layers`, ... overrides. `--data` is a jsonl file, one JSON object per line: `input_ids` (and optionally
`labels`, -100 on prompt tokens) or, with a tokenizer in the model directory, `text` (every token trained) or `prompt`
and `completion` (the completion trained). Without `--data` a synthetic long-document dataset is generated from a
sparse Markov chain, so the loss visibly falls within a short run.

Every TrainingArguments flag works; `--context_parallel_size` defaults to all processes. A checkpoint is saved every
tenth of the run (the last two are kept; `--save_strategy`, `--save_steps`, `--save_total_limit` change that), and
`--resume_from_checkpoint last` (or a checkpoint directory) continues an interrupted run from its last saved step with
the same losses. The tokenizer of a local model directory is saved with the trained model.
"""

from __future__ import annotations

import json
import os
import re
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


CHECKPOINT = re.compile(r"checkpoint-(\d+)")
RECORD_FORMS = (
    'each line must be one JSON object: {"input_ids": [...]} (optionally with "labels", -100 where no target), or, '
    'with a tokenizer in the --model directory, {"text": "..."} or {"prompt": "...", "completion": "..."}'
)


def load_jsonl(path: str, tokenizer) -> list[dict]:
    """Every record as `input_ids` and `labels` (the same length); a malformed record is an error naming its line."""
    docs = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"--data {path}, line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where} is not JSON ({e}); {RECORD_FORMS}.") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where} is a {type(record).__name__}, not an object; {RECORD_FORMS}.")
            docs.append(record_to_example(record, tokenizer, where))
    if not docs:
        raise ValueError(f"--data {path} holds no records; {RECORD_FORMS}.")
    return docs


def record_to_example(record: dict, tokenizer, where: str) -> dict:
    if "input_ids" in record:
        ids = record["input_ids"]
        labels = record.get("labels", ids)
        if not ids or len(labels) != len(ids):
            raise ValueError(
                f"{where}: input_ids must be a non-empty list and labels (when given) as long as it; got "
                f"{len(ids)} input_ids and {len(labels)} labels."
            )
        return {"input_ids": ids, "labels": labels}
    if "text" in record or ("prompt" in record and "completion" in record):
        if tokenizer is None:
            raise ValueError(
                f"{where}: text records need a tokenizer, and --model has none (pass a local model directory with "
                "its tokenizer files, or give the records as input_ids)."
            )
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        if "text" in record:
            ids = tokenizer(record["text"], add_special_tokens=True)["input_ids"] + eos
            return {"input_ids": ids, "labels": list(ids)}
        prompt = tokenizer(record["prompt"], add_special_tokens=True)["input_ids"]
        completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"] + eos
        return {"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion}
    raise ValueError(f"{where} has the keys {sorted(record)}; {RECORD_FORMS}.")


def check_engine(args: transformers.TrainingArguments) -> None:
    """Refuse `--fsdp` on CPU: accelerate enables FSDP only on accelerator devices and would train the CPU processes
    under DDP instead, with every parameter on every process. For ZeRO-3, start DeepSpeed's communication layer
    before the model is built: transformers builds it inside `deepspeed.zero.Init`, which reads the world size from
    that layer, and accelerate starts it only for accelerator processes (on CPU zero.Init would see one process)."""
    if args.fsdp and args.device.type == "cpu":
        raise ValueError(
            "--fsdp needs GPUs: on CPU accelerate runs the processes under DDP (every parameter on every process). "
            "Drop --fsdp to train with DDP on CPU (the same results), or run on GPUs."
        )
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        import deepspeed

        deepspeed.init_distributed()  # joins the process group the arguments started; a no-op when already joined


def checkpoints(output_dir: str) -> list[str]:
    """The complete `checkpoint-<step>` directories of output_dir, oldest first. The Trainer writes a checkpoint's
    trainer_state.json last, so a directory without it is one that a killed run left half-written."""
    if not os.path.isdir(output_dir):
        return []
    steps = [int(m.group(1)) for m in map(CHECKPOINT.fullmatch, os.listdir(output_dir)) if m]
    paths = [os.path.join(output_dir, f"checkpoint-{step}") for step in sorted(steps)]
    return [p for p in paths if os.path.isfile(os.path.join(p, "trainer_state.json"))]


def checkpoint_to_resume(args: transformers.TrainingArguments) -> str | None:
    """`--resume_from_checkpoint`: a checkpoint directory, or `last` / `true` for the newest complete one in
    output_dir."""
    value = args.resume_from_checkpoint
    if value is None or value.lower() not in ("last", "true"):
        return value
    complete = checkpoints(args.output_dir)
    if not complete:
        raise ValueError(
            f"--resume_from_checkpoint {value}: {args.output_dir} holds no complete checkpoint-<step> directory; pass "
            "a checkpoint directory, or the --output_dir of the run to continue."
        )
    return complete[-1]


def main(argv: list[str] | None = None) -> transformers.Trainer:
    """Train, evaluate and save; returns the Trainer (for scripts and tests that read its state)."""
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
        save_strategy="steps",
        save_steps=0.1,  # a fraction of the run's optimizer steps
        save_total_limit=2,  # a kill during a save can leave the newest incomplete: keep the one before
        report_to="none",
        bf16=cuda and torch.cuda.is_bf16_supported(),
        use_cpu=not cuda,  # accelerate runs CPU processes as one job only when asked to
    )
    script, args = parser.parse_args_into_dataclasses(args=argv)
    check_engine(args)
    resume = checkpoint_to_resume(args)

    torch.manual_seed(args.seed)
    model, tokenizer = build_model(script)
    if script.data is not None:
        docs = load_jsonl(script.data, tokenizer)
    else:
        docs = synthetic_documents(script, model.config.vocab_size, script.num_examples, args.seed)
    n_eval = max(1, int(len(docs) * script.eval_fraction))
    if len(docs) <= n_eval:
        source = f"--data {script.data}" if script.data is not None else f"--num_examples {script.num_examples}"
        raise ValueError(
            f"{source}: {len(docs)} example(s), of which {n_eval} held out for evaluation (--eval_fraction), leave "
            "none to train on; give more examples."
        )
    train, held_out = docs[n_eval:], docs[:n_eval]

    # Packs each micro-batch into one row; under CP the Trainer shards that row (with --context_parallel_size 1 this
    # is plain padding-free training).
    collator = transformers.DataCollatorWithFlattening()
    trainer = transformers_cp.Trainer(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=train,
        eval_dataset=held_out,
        processing_class=tokenizer,  # saved with every checkpoint and the final model
    )
    if trainer.is_world_process_zero():
        mesh = trainer.cp_mesh
        layout = "off" if mesh is None else f"{mesh.config.mode}, {mesh.cp_size} CP x {mesh.dp_size} DP ranks"
        tokens = sum(len(d["input_ids"]) for d in train)
        print(
            f"model: {model.config.model_type}, {model.num_parameters():,} parameters; context parallelism: {layout}"
        )
        print(f"data: {len(train)} training documents ({tokens:,} tokens), {len(held_out)} held out")
        if resume is not None:
            print(f"resuming from {resume}")
        elif checkpoints(args.output_dir):
            print(
                f"{args.output_dir} holds checkpoints of an earlier run, which this one replaces; "
                "--resume_from_checkpoint last continues that run instead"
            )
    trainer.train(resume_from_checkpoint=resume)
    metrics = trainer.evaluate()
    trainer.save_model()
    if trainer.is_world_process_zero():
        print(f"eval loss {metrics['eval_loss']:.4f}; model saved to {args.output_dir}")
    return trainer


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # gloo aborts at interpreter exit if its groups are still alive
