"""Shared pieces of the TRL tests: a tiny word-level tokenizer over the tiny models' vocabulary, SFT and preference
data, and one run of a TRL trainer recorded as losses, logged metrics and final weights."""

from __future__ import annotations

import dataclasses

import torch
import transformers
from reference import assert_close
from trainer_cases import RTOL, VOCAB, arguments, build_model, sft_dataset

EOS = "<eos>"
DPO_BETA = 0.1  # TRL's default
RL_PERTURBATION = 0.02  # of the GRPO / RLOO policy's weights from its reference


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Words w0..w95 and <eos> (= pad): VOCAB ids, so the tiny models' embeddings cover them."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {EOS: VOCAB - 1}
    core = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=EOS)
    return tok


def preference_rows(n: int, seed: int) -> list[dict[str, str]]:
    """Prompts of 3-12 words, chosen and rejected completions of 1-15 words (different lengths)."""
    g = torch.Generator().manual_seed(seed)

    def words(lo: int, hi: int) -> str:
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        return " ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 1, (length,), generator=g))

    return [{"prompt": words(3, 12), "chosen": " " + words(1, 15), "rejected": " " + words(1, 15)} for _ in range(n)]


def saved_dataset(rows: list[dict], directory: str):
    """A dataset backed by files in `directory`, so that every process of a job finds the same cache files (TRL caches
    precomputed reference log-probabilities next to them)."""
    import datasets
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        datasets.Dataset.from_list(rows).save_to_disk(directory)
    if dist.is_initialized():
        dist.barrier()
    return datasets.load_from_disk(directory)


def trl_arguments(config_class, **kwargs):
    """trainer_cases' arguments in TRL's config; TRL's configs default to bf16 autocast, the comparison is in float32."""
    if "dataset_num_proc" in {f.name for f in dataclasses.fields(config_class)}:
        kwargs["dataset_num_proc"] = None
    return config_class(**arguments(bf16=False, **kwargs))


def lora_config(**kwargs):
    import peft

    targets = ["q_proj", "v_proj", "gate_proj"]
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, **kwargs)


def run_dpo(trainer_class, config_class, data_dir: str, case: dict, family: str = "llama", **cp) -> dict:
    """One DPO training and evaluation. `case`: loss_type, ref ("model" | "precompute" | "lora")."""
    ref = case["ref"]
    model = build_model(family, reference=not cp)
    args = trl_arguments(
        config_class,
        loss_type=[case["loss_type"]],
        beta=DPO_BETA,
        precompute_ref_log_probs=ref == "precompute",
        **cp,
    )
    trainer = trainer_class(
        model=model,
        ref_model=build_model(family, reference=not cp) if ref == "model" else None,
        args=args,
        train_dataset=saved_dataset(preference_rows(11, 0), f"{data_dir}/train"),
        eval_dataset=saved_dataset(preference_rows(5, 1), f"{data_dir}/eval"),
        processing_class=tokenizer(),
        peft_config=lora_config() if ref == "lora" else None,
    )
    return record(trainer)


def run_sft(trainer_class, config_class, case: dict, family: str = "llama", **cp) -> dict:
    """One SFT training and evaluation. `case`: packing, lora."""
    import datasets

    args = trl_arguments(
        config_class,
        padding_free=True,
        packing=case.get("packing", False),
        max_length=64 if case.get("packing") else None,
        average_tokens_across_devices=case.get("average_tokens", True),
        **cp,
    )
    trainer = trainer_class(
        model=build_model(family, reference=not cp),
        args=args,
        train_dataset=datasets.Dataset.from_list(sft_dataset(13, 0)),
        eval_dataset=datasets.Dataset.from_list(sft_dataset(7, 1)),
        processing_class=tokenizer(),
        peft_config=lora_config() if case.get("lora") else None,
    )
    return record(trainer)


def record(trainer) -> dict:
    trainer.train()
    history = [dict(entry) for entry in trainer.state.log_history]
    history.append(trainer.evaluate())
    return {
        "history": history,
        "weights": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
    }


_TIMING_KEYS = ("runtime", "per_second", "total_flos", "epoch", "step_time")


def assert_same_run(actual: dict, expected: dict, name: str) -> None:
    """Every logged number (loss, grad norm, DPO rewards/accuracies/margins/log-probs/logits, entropy, token counts,
    eval metrics) and every final weight of the CP run equal the run without CP (float32, relative 1e-5). A logged
    key is compared as the series of its values over the run, relative to the series' scale (as `assert_close`):
    mean logits of a random-init model cancel to ~1e-6, whose own digits are rounding. An eval metric's (and the mean
    train_loss's) scale is that of the same metric over training and evaluation: on-policy, GRPO's and RLOO's loss is
    a mean of advantages times ratios of 1 that cancels to its rounding, which evaluation (always on-policy) logs
    alone."""
    assert len(actual["history"]) == len(expected["history"]) > 2, name
    series: dict[str, tuple[list[float], list[float]]] = {}
    for step, (got, want) in enumerate(zip(actual["history"], expected["history"])):
        keys = {k for k in want if not any(t in k for t in _TIMING_KEYS)}
        assert keys <= got.keys(), f"{name} entry {step}: missing {keys - got.keys()}"
        for key in keys:
            series.setdefault(key, ([], []))
            series[key][0].append(float(got[key]))
            series[key][1].append(float(want[key]))
    assert {"loss", "grad_norm", "eval_loss"} <= series.keys(), name
    logps_scale = max((abs(v) for k, (_, want) in series.items() if "logps/" in k for v in want), default=0.0)
    for key, (got, want) in sorted(series.items()):
        base = key.removeprefix("eval_").removeprefix("train_")  # eval_loss, train_loss (its mean): the loss
        train = series[base][1] if base != key and base in series else []
        got, want = torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64)
        scale = max([want.abs().max().item(), *(abs(v) for v in train)])
        if "rewards/" in key and "accuracies" not in key:
            # β times a difference of two sequence log-probs: its rounding is that of the log-probs.
            scale = max(scale, DPO_BETA * logps_scale)
        torch.testing.assert_close(
            got, want, rtol=RTOL, atol=RTOL * scale, msg=lambda m, key=key: f"{name} {key}: {m}"
        )
    assert actual["weights"].keys() == expected["weights"].keys(), name
    for key, value in expected["weights"].items():
        assert_close(actual["weights"][key], value, RTOL, f"{name} weight {key}")


def prompt_rows(n: int, seed: int) -> list[dict[str, str]]:
    """Prompts of 2-9 words (different lengths, so TRL left-pads them)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(2, 10, (1,), generator=g))
        rows.append({"prompt": " ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 1, (length,), generator=g))})
    return rows


def token_reward(completion_ids: list[list[int]], **kwargs) -> list[float]:
    """Deterministic: the mean of (token id mod 7) over the completion (its length matters too)."""
    return [sum(i % 7 for i in ids) / (1 + len(ids)) for ids in completion_ids]


def length_reward(completion_ids: list[list[int]], **kwargs) -> list[float]:
    return [len(ids) / 8 for ids in completion_ids]


def saved_policy(family: str, directory: str) -> str:
    """The seed-0 tiny model saved where every process of a job finds it: TRL's GRPO and RLOO load their reference
    model from the policy's path."""
    import os

    import torch.distributed as dist

    if (not dist.is_initialized() or dist.get_rank() == 0) and not os.path.exists(f"{directory}/config.json"):
        build_model(family, reference=False).save_pretrained(directory)
    if dist.is_initialized():
        dist.barrier()
    return directory


def run_rl(trainer_class, config_class, model_dir: str, case: dict, family: str = "llama", **cp) -> dict:
    """One GRPO or RLOO training (3 optimizer steps of 2 accumulated micro-batches) and evaluation, with sampled
    completions of up to 6 tokens and deterministic rewards. `case`: trainer ("grpo" | "rloo"), loss_type, beta,
    lora, num_iterations, steps_per_generation, top_entropy_quantile, scale_rewards."""
    import datasets

    keys = ("loss_type", "top_entropy_quantile", "scale_rewards", "steps_per_generation")
    extra = {k: case[k] for k in keys if k in case}
    args = trl_arguments(
        config_class,
        max_steps=3,
        num_generations=2,
        max_completion_length=6,
        beta=case.get("beta", 0.0),
        num_iterations=case.get("num_iterations", 1),
        learning_rate=0.1,
        eval_strategy="no",
        **extra,
        **cp,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        saved_policy(family, model_dir), attn_implementation="sdpa", dtype=torch.float32
    )
    # The policy starts away from its reference (TRL loads that from the saved model; with LoRA it is the policy
    # without its randomly initialised adapter), so the KL terms are not differences of nearly equal log-probs, which
    # would keep little more than their rounding.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=g), alpha=RL_PERTURBATION)
    trainer = trainer_class(
        model=model,
        reward_funcs=[token_reward, length_reward],
        args=args,
        train_dataset=datasets.Dataset.from_list(prompt_rows(24, 0)),
        eval_dataset=datasets.Dataset.from_list(prompt_rows(4, 1)),
        processing_class=tokenizer(),
        peft_config=lora_config(init_lora_weights=False) if case.get("lora") else None,
    )
    return record(trainer)
